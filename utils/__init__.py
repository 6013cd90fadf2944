"""Shared helpers, the leaf layer (imports no other package of the project): image decoding and preprocessing,
restricted unpickling, atomic writes, weights and checkpoint files, the training sampler and loader, logging,
locks, distributed glue, lr schedule, the procedural face renderer, CPU settings and command-line helpers."""
