"""Periodic verification during training: evaluate the .bin targets, log, keep the best backbone per target.

Used by train.py on rank 0 only (the other ranks wait at a barrier); build it on rank 0 only, since it holds the
decoded images of every target in memory (an lfw set is ~225 MB as uint8).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from eval.bin_io import BinSet, load_bin
from eval.verification import describe, test


class VerificationCallback:
    """`cb(step, backbone) -> {target: accuracy}`; never raises into the training loop.

    Targets are file names without `.bin` in `data_dir` (e.g. "lfw", "cfp_fp", "agedb_30"); a missing file is
    skipped with a warning, an unreadable one fails here, at start-up, rather than hours into training.
    When a target's accuracy beats its best so far, the backbone's state_dict is written atomically to
    `output_dir/best_<target>.pdparams`. `best` maps target -> (accuracy, step); `latest` holds the full
    summary of the last evaluation per target (accuracy, accuracy_std, val, val_std, far, xnorm, best, step),
    ready for metrics.jsonl.
    """

    def __init__(self, data_dir: str | Path, targets: list[str], batch_size: int, output_dir: str | Path,
                 logger: logging.Logger | None = None, flip: bool = True):
        self.log = logger or logging.getLogger(__name__)
        self.batch_size = batch_size
        self.output_dir = Path(output_dir)
        self.flip = flip
        self.sets: list[BinSet] = []
        for target in targets:
            path = Path(data_dir) / f"{target}.bin"
            if not path.is_file():
                self.log.warning("verification target %s: %s not found, skipped", target, path)
                continue
            binset = load_bin(path)
            self.log.info("verification target %s: %s", target, describe(binset))
            self.sets.append(binset)
        self.best: dict[str, tuple[float, int]] = {}
        self.latest: dict[str, dict[str, Any]] = {}

    def __call__(self, step: int, backbone) -> dict[str, float]:
        """Evaluate every target with `backbone` (unwrapped from paddle.DataParallel); failures are logged only."""
        backbone = getattr(backbone, "_layers", backbone)  # DataParallel keeps the real network in _layers
        results: dict[str, float] = {}
        for binset in self.sets:
            try:
                result = test(binset, backbone, batch_size=self.batch_size, flip=self.flip, log=self.log)
                accuracy = result["accuracy_mean"]
                if binset.name not in self.best or accuracy > self.best[binset.name][0]:
                    self._save_best(binset.name, backbone)
                    self.best[binset.name] = (accuracy, step)
            except Exception:  # an evaluation problem must never end a training run
                self.log.exception("step %d: verification on %s failed; training goes on", step, describe(binset))
                continue
            results[binset.name] = accuracy
            self.latest[binset.name] = {
                "step": step, "accuracy": accuracy, "accuracy_std": result["accuracy_std"], "val": result["val"],
                "val_std": result["val_std"], "far": result["far"], "xnorm": result["xnorm"],
                "best": self.best[binset.name][0]}
            self.log.info("step %d: %s accuracy %.5f (best %.5f at step %d)", step, describe(binset), accuracy,
                          *self.best[binset.name])
        return results

    def _save_best(self, target: str, backbone) -> None:
        """Write best_<target>.pdparams through a temp file in the same directory, fsync, rename."""
        import paddle

        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"best_{target}.pdparams"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            paddle.save(backbone.state_dict(), str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
