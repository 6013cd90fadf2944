"""Shared helpers: image preprocessing, safe unpickling, checkpoints, logging, distributed glue, synthetic faces."""
