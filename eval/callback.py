"""Periodic verification during training: evaluate the .bin targets, log, keep the best backbone per target.

One process: `cb(step, backbone)` evaluates everything itself. Several ranks (`world_size > 1`): build and call the
callback on EVERY rank. Each rank embeds its share of the images and the shares are gathered; rank 0 scores, logs
and saves. Nobody waits while another rank works alone: gloo gives up on a collective after 30 s, so "rank 0
evaluates while the others wait at a barrier" fails as soon as an evaluation takes longer than that on CPU.
Before embedding, the BatchNorm running statistics (the backbone's non-trainable tensors) are broadcast from rank 0,
so every share is embedded by rank 0's model -- the one that is saved (PyTorch DDP keeps them in sync the same way;
training itself never reads them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from eval.bin_io import BinSet, load_bin
from eval.verification import describe, embed_images, score
from utils.atomic import atomic_output


class VerificationCallback:
    """`cb(step, backbone) -> {target: accuracy}`; never raises into the training loop.

    Targets are file names without `.bin` in `data_dir` (e.g. "lfw", "cfp_fp", "agedb_30"); a missing file is
    skipped with a warning, an unreadable one fails here, at start-up, rather than hours into training.
    When a target's accuracy beats its best so far, rank 0 writes the backbone's state_dict atomically to
    `output_dir/best_<target>.pdparams`. `best` maps target -> (accuracy, step); `latest` holds the full
    summary of the last evaluation per target (accuracy, accuracy_std, val, val_std, far, xnorm, best, step),
    ready for metrics.jsonl. Every rank returns the same accuracies.
    """

    def __init__(self, data_dir: str | Path, targets: list[str], batch_size: int, output_dir: str | Path,
                 logger: logging.Logger | None = None, flip: bool = True, rank: int = 0, world_size: int = 1):
        self.log = logger or logging.getLogger(__name__)
        self.batch_size = batch_size
        self.output_dir = Path(output_dir)
        self.flip = flip
        self.rank, self.world_size = rank, world_size
        self.sets: list[BinSet] = []
        for target in targets:
            path = Path(data_dir) / f"{target}.bin"
            if not path.is_file():
                self.log.warning("verification target %s: %s not found, skipped", target, path)
                continue
            binset = load_bin(path, progress=rank == 0)
            self.log.info("verification target %s: %s", target, describe(binset))
            self.sets.append(binset)
        self.best: dict[str, tuple[float, int]] = {}
        self.latest: dict[str, dict[str, Any]] = {}

    def __call__(self, step: int, backbone) -> dict[str, float]:
        """Evaluate every target with `backbone` (unwrapped from paddle.DataParallel); failures are logged only."""
        backbone = getattr(backbone, "_layers", backbone)  # DataParallel keeps the real network in _layers
        if self.world_size > 1 and not self._sync_statistics(backbone):
            return {}
        results: dict[str, float] = {}
        for binset in self.sets:
            accuracy = self._evaluate(step, binset, backbone)
            if accuracy is not None:
                results[binset.name] = accuracy
        return results

    def _evaluate(self, step: int, binset: BinSet, backbone) -> float | None:
        start = time.perf_counter()
        try:
            share = np.array_split(np.arange(len(binset.images)), self.world_size)[self.rank]
            part = embed_images(binset.images[share], backbone, self.batch_size, self.flip, self.rank == 0,
                                f"verify {binset.path.name}") if len(share) else None
            ok = True
        except Exception:  # an evaluation problem must never end a training run
            part, ok = None, False
            self.log.exception("step %d: verification on %s failed on rank %d", step, describe(binset), self.rank)
        try:
            parts = self._gather((part, ok))
        except Exception:  # a rank died or timed out: the next training collective will say so, not this
            self.log.exception("step %d: gathering the %s embeddings failed", step, describe(binset))
            return None
        if not all(flag for _, flag in parts):
            if self.rank == 0:
                self.log.error("step %d: verification on %s failed; training goes on", step, describe(binset))
            return None
        try:
            summed = np.concatenate([p[0] for p, _ in parts if p is not None])
            norms = np.concatenate([p[1] for p, _ in parts if p is not None])
            result = score(binset, summed, norms, time.perf_counter() - start, log=self.log)
            accuracy = result["accuracy_mean"]
            if binset.name not in self.best or accuracy > self.best[binset.name][0]:
                if self.rank == 0:
                    self._save_best(binset.name, backbone)
                self.best[binset.name] = (accuracy, step)
        except Exception:
            self.log.exception("step %d: verification on %s failed; training goes on", step, describe(binset))
            return None
        self.latest[binset.name] = {
            "step": step, "accuracy": accuracy, "accuracy_std": result["accuracy_std"], "val": result["val"],
            "val_std": result["val_std"], "far": result["far"], "xnorm": result["xnorm"],
            "best": self.best[binset.name][0]}
        self.log.info("step %d: %s accuracy %.5f (best %.5f at step %d)", step, describe(binset), accuracy,
                      *self.best[binset.name])
        return accuracy

    def _gather(self, item: Any) -> list[Any]:
        if self.world_size == 1:
            return [item]
        import paddle.distributed as dist

        items: list[Any] = []
        dist.all_gather_object(items, item)
        return items

    def _sync_statistics(self, backbone) -> bool:
        """Broadcast rank 0's non-trainable tensors (BatchNorm running mean/variance) to every rank."""
        import paddle.distributed as dist

        try:
            for tensor in backbone.state_dict().values():
                if tensor.stop_gradient:
                    dist.broadcast(tensor, src=0)
            return True
        except Exception:
            self.log.exception("verification: broadcasting the BatchNorm statistics failed; evaluation skipped")
            return False

    def _save_best(self, target: str, backbone) -> None:
        """Write best_<target>.pdparams through a temp file in the same directory, fsync, rename."""
        import paddle

        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"best_{target}.pdparams"
        with atomic_output(path) as tmp:
            paddle.save(backbone.state_dict(), str(tmp))
