"""Training logs: console + train.log, metrics.jsonl, VisualDL scalars, and the meters behind the log line.

Rank 0 writes the files; other ranks log warnings and errors to their console (the launcher's workerlog.N).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from utils.atomic import errors_name

LOGGER_NAME = "arcface"


def setup_logger(run_dir: Path | None, rank: int = 0) -> logging.Logger:
    """The training logger: INFO to console and `run_dir/train.log` (appended on resume) on rank 0."""
    log = logging.getLogger(LOGGER_NAME)
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if run_dir is not None and rank == 0:
        file = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H-%M-%S"))
        log.addHandler(file)
    return log


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl, and scalars to VisualDL when it imports."""

    def __init__(self, run_dir: Path, use_visualdl: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.vdl = None
        if use_visualdl:
            try:
                from visualdl import LogWriter
            except ImportError:
                pass
            else:
                self.vdl = LogWriter(logdir=str(run_dir / "visualdl"))

    def write(self, record: dict[str, Any]) -> None:
        with errors_name(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        if self.vdl is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.vdl.add_scalar(tag=key.replace("/", "_"), value=float(value), step=step)

    def close(self) -> None:
        if self.vdl is not None:
            self.vdl.close()


class StepMeter:
    """Loss average, samples/s and the split of wall time into data wait vs compute, over one log interval."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.steps = 0
        self.data_time = 0.0
        self.step_time = 0.0

    def update(self, loss: float, data_time: float, step_time: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.data_time += data_time
        self.step_time += step_time

    def summary(self) -> dict[str, float]:
        n = max(1, self.steps)
        wall = self.data_time + self.step_time
        return {"loss": self.loss_sum / n,
                "samples_per_s": self.samples_per_step * self.steps / wall if wall > 0 else 0.0,
                "data_time": self.data_time / n, "step_time": self.step_time / n}


def format_eta(seconds: float) -> str:
    """`1h02m03s` (no ':' so it can go anywhere, file names included)."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Timer:
    """`with Timer() as t: ...; t.elapsed` in seconds (perf_counter)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start
