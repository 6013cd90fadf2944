"""Shared helpers: image preprocessing, safe unpickling, and (later) logging, checkpoints, distributed glue."""
