"""Shared helpers, the leaf layer (imports no other package of the project): image preprocessing, safe unpickling,
atomic writes, weights and checkpoint files, logging, distributed glue, lr schedule, the procedural face renderer."""
