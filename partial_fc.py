"""Partial FC: class centres sharded over ranks, sampled negatives, distributed softmax cross-entropy, sparse updates.

Rank r of W holds `num_local` centres from `class_start` (the first C % W ranks one more). Each step all-gathers the
embeddings and labels, keeps every positive local class plus seeded random negatives (pfc.sampling), computes cosine
logits with the margin, and a softmax cross-entropy over all ranks' columns (all_reduce of the max, the sum of
exponentials and the target logit). Only the sampled rows get a gradient, and only they (and their optimizer state)
change in `step()`: no dense gradient exists, so the state is weight + momentum = 4 KB per class at 512-d fp32.

This module is the facade: argument and input checks, the class range, the sampling policy, state and shard I/O.
The math runs in one backend chosen at construction:
  numpy   the fast CPU head (pfc.numpy_head): NumPy blocks on a thread pool;
  paddle  device tensors only (pfc.paddle_head), no host synchronisation in forward, backward or step: the GPU head,
          tested equal to the numpy backend on CPU. kernel="fused" uses Paddle's margin_cross_entropy (GPU only).
  auto    paddle on a GPU, numpy on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist

from losses import CombinedMarginLoss
from pfc.comm import NumpyComm, world
from pfc.numpy_head import NumpyHead
from pfc.paddle_head import KERNELS, PaddleHead
from pfc.sampling import draw_keys, sample_size
from pfc.shards import MANIFEST, init_centres, read_manifest, read_rows, shard_range, write_manifest, write_shard
from pfc.spec import OPTIMIZERS, HeadSpec

__all__ = ["BACKENDS", "KERNELS", "PartialFC", "init_centres", "shard_range"]
BACKENDS = ("auto", "numpy", "paddle")


def resolve_backend(backend: str) -> str:
    """auto -> paddle when Paddle runs on a GPU, else numpy."""
    if backend != "auto":
        return backend
    on_gpu = paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu")
    return "paddle" if on_gpu else "numpy"


class PartialFC:
    """Model-parallel margin-softmax head with sampled negatives and sparse updates.

    loss = pfc(local_embeddings [B, D], local_labels [B]) is the mean over the global batch (W * B); its backward gives
    the embedding gradients, scaled by W so that paddle.DataParallel's averaging yields the full-batch gradient.
    pfc.step(lr) then updates the rows sampled since the last step (several backward passes accumulate).
    """

    def __init__(self, margin_loss: CombinedMarginLoss, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, fp16: bool = False, optimizer: str = "sgd", momentum: float = 0.9,
                 weight_decay: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 seed: int = 0, backend: str = "auto", kernel: str = "portable") -> None:
        self.rank, self.world_size = world()
        checks = [
            (isinstance(margin_loss, CombinedMarginLoss), "margin_loss must be a losses.CombinedMarginLoss"),
            (int(embedding_size) == embedding_size > 0, f"embedding_size={embedding_size} must be a positive int"),
            (int(num_classes) == num_classes >= self.world_size,
             f"num_classes={num_classes} must be an int >= the world size {self.world_size}"),
            (0 < sample_rate <= 1, f"sample_rate={sample_rate} must be in (0, 1]"),
            (optimizer in OPTIMIZERS, f"optimizer={optimizer!r} must be one of {tuple(OPTIMIZERS)}"),
            (0 <= momentum < 1, f"momentum={momentum} must be in [0, 1)"),
            (weight_decay >= 0, f"weight_decay={weight_decay} must be >= 0"),
            (all(0 <= b < 1 for b in betas) and eps > 0, f"betas={betas} must be in [0, 1) and eps={eps} > 0"),
            (backend in BACKENDS, f"backend={backend!r} must be one of {BACKENDS}"),
            (kernel in KERNELS, f"kernel={kernel!r} must be one of {KERNELS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PartialFC: {message}")
        self.backend = resolve_backend(backend)
        if kernel == "fused" and self.backend != "paddle":
            raise ValueError(f"PartialFC: kernel='fused' needs backend='paddle' (got backend={self.backend!r})")
        self.margin_loss = margin_loss
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate, self.fp16, self.optimizer = float(sample_rate), bool(fp16), optimizer
        self.seed = int(seed)
        self.class_start, self.num_local = shard_range(self.num_classes, self.world_size, self.rank)
        self.spec = HeadSpec(margin_loss, self.embedding_size, self.num_classes, self.class_start, self.num_local,
                             self.sample_rate, self.rank, self.world_size, optimizer, float(momentum),
                             float(weight_decay), tuple(betas), float(eps), self.seed)
        self.head = NumpyHead(self.spec) if self.backend == "numpy" else PaddleHead(self.spec, kernel, self.fp16)
        self.comm = NumpyComm(self.world_size)
        self.num_draws = 0    # forward passes (with seed and rank, keys each draw of negatives)
        self.batch_size: int | None = None
        self._checked_shape: tuple[int, int] | None = None

    # The backend's live state: NumPy arrays (numpy) or device tensors (paddle).
    @property
    def weight(self) -> Any:
        return self.head.weight

    @property
    def opt_state(self) -> dict[str, Any]:
        return self.head.opt_state

    @property
    def kernel(self) -> str:
        """The path in use: "portable", or "fused" (paddle backend; after the first step only if its check passed)."""
        return getattr(self.head, "kernel", "portable")

    @property
    def num_updates(self) -> int:
        """Optimizer steps applied (a host read on the paddle backend: call it outside the training step)."""
        return int(self.head.num_updates)

    # ------------------------------------------------------------------ forward
    def __call__(self, local_embeddings: paddle.Tensor, local_labels: paddle.Tensor | np.ndarray) -> paddle.Tensor:
        return self.forward(local_embeddings, local_labels)

    def forward(self, local_embeddings: paddle.Tensor, local_labels: paddle.Tensor | np.ndarray) -> paddle.Tensor:
        """Mean margin-softmax loss over the global batch (a Paddle scalar with autograd to the embeddings)."""
        if self.backend == "numpy":
            labels = self._check_inputs(local_embeddings, _host(local_labels))
            size = sample_size(self.num_local, self.sample_rate, labels.size)
        else:
            labels = self._device_labels(local_embeddings, local_labels)
            size = sample_size(self.num_local, self.sample_rate, self.batch_size * self.world_size)
        self.num_draws += 1
        return self.head.forward(local_embeddings, labels, size, draw_keys(self.seed, self.rank, self.num_draws))

    def _device_labels(self, embeddings: paddle.Tensor, labels: Any) -> paddle.Tensor:
        """The paddle backend's input checks without reading the device: shapes and dtypes (host metadata) every
        call; label values across all ranks only on the first call and when the batch shape changes (one host read
        then). Later, a label outside [0, num_classes) makes the loss NaN on the device, which the trainer's
        non-finite loss guard reports (the numpy backend, which holds the labels on the host, raises at once)."""
        labels = labels if isinstance(labels, paddle.Tensor) else paddle.to_tensor(np.asarray(labels))
        shape = tuple(embeddings.shape)
        count = int(np.prod(labels.shape)) if labels.ndim else 1
        integer = labels.dtype in (paddle.int32, paddle.int64, paddle.int16, paddle.int8, paddle.uint8)
        signature = (shape, count, integer)
        if signature != self._checked_shape:
            self._check_inputs(embeddings, _host(labels))
            self._checked_shape = signature
        return labels

    def _check_inputs(self, embeddings: Any, labels: np.ndarray) -> np.ndarray:
        """All ranks' labels, after checking every rank's inputs collectively so that all ranks fail together."""
        shape = tuple(getattr(embeddings, "shape", ()))
        labels = labels.reshape(-1)
        integer = labels.dtype.kind in "iu"
        meta = np.array([[shape[0] if len(shape) == 2 else -1, shape[1] if len(shape) == 2 else -1, labels.size,
                          int(labels.min()) if integer and labels.size else 0,
                          int(labels.max()) if integer and labels.size else 0, integer]], np.int64)
        metas = self.comm.all_gather(meta)
        problems = []
        for rank, (batch, dim, count, low, high, is_int) in enumerate(metas.tolist()):
            where = f"rank {rank}: " if self.world_size > 1 else ""
            if batch <= 0:
                problems.append(f"{where}embeddings must be a non-empty [B, {self.embedding_size}] tensor")
            elif dim != self.embedding_size:
                problems.append(f"{where}embedding size {dim} != PartialFC embedding_size {self.embedding_size}")
            if count != batch:
                problems.append(f"{where}{count} labels for {batch} embeddings")
            if not is_int:
                problems.append(f"{where}labels must be integers")
            elif low < 0 or high >= self.num_classes:
                problems.append(f"{where}labels must be in [0, {self.num_classes}), got values in [{low}, {high}]")
        sizes = sorted({int(m[0]) for m in metas})
        if not problems and len(sizes) > 1:
            problems.append(f"batch sizes differ across ranks {metas[:, 0].tolist()}: all_gather needs equal batches")
        if not problems and self.batch_size not in (None, sizes[0]):
            problems.append(f"batch size changed from {self.batch_size} to {sizes[0]} between steps (all ranks "
                            f"all-gather equal-sized batches; use drop_last=True)")
        if problems:
            raise ValueError("PartialFC: " + "; ".join(problems))
        self.batch_size = sizes[0]
        return self.comm.all_gather(labels.astype(np.int64))

    # --------------------------------------------------------------------- step
    def step(self, lr: float, loss_scale: float | paddle.Tensor = 1.0) -> bool:
        """Apply the optimizer to the rows sampled since the last step. loss_scale divides the accumulated gradient
        (AMP; a tensor is used as is, without reading it). A non-finite gradient skips the update: the numpy backend
        returns False; the paddle backend decides on the device and returns True (ask grads_finite() first when the
        host must know)."""
        scale_ok = isinstance(loss_scale, paddle.Tensor) or (np.isfinite(loss_scale) and loss_scale > 0)
        if not (np.isfinite(lr) and lr >= 0 and scale_ok):
            raise ValueError(f"PartialFC.step: lr={lr} and loss_scale={loss_scale} must be finite, lr >= 0, scale > 0")
        return self.head.step(lr, loss_scale)

    def zero_grad(self) -> None:
        """Drop the accumulated head gradient (e.g. when AMP skips a step)."""
        self.head.zero_grad()

    def grads_finite(self) -> paddle.Tensor:
        """A bool tensor: is the pending head gradient finite? (On the paddle backend it stays on the device.)"""
        return self.head.grads_finite()

    def pending_gradient(self) -> tuple[np.ndarray, np.ndarray]:
        """(local row indices, their accumulated loss gradient [S, D]) on the host, for checks and tests."""
        return self.head.pending_gradient()

    def memory_plan(self, batch_size: int) -> dict[str, int]:
        """What the head needs on this rank, from the shapes alone (for the training plan line): state bytes per
        class (weight + optimizer state, float32), the classes sampled per step and the per-step working memory at
        a local batch of `batch_size`."""
        batch = batch_size * self.world_size
        size = sample_size(self.num_local, self.sample_rate, batch)
        return {"state_bytes_per_class": 4 * self.embedding_size * (1 + len(self.spec.state_names)),
                "sampled_classes": size, "step_peak_bytes": self.head.workspace_bytes(size, batch)}

    # ---------------------------------------------------------------- state I/O
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: arrays (weight, optimizer state; host NumPy) and the counters needed to resume exactly."""
        return {**self.head.arrays(), "class_start": self.class_start, "num_classes": self.num_classes,
                "num_updates": self.num_updates, "num_draws": self.num_draws}

    def set_state_dict(self, state: dict[str, Any]) -> None:
        """Load this rank's shard (same class range); use load() to re-shard from another world size."""
        for key in ("class_start", "num_classes"):
            if int(state.get(key, -1)) != getattr(self, key):
                raise ValueError(f"PartialFC.set_state_dict: {key}={state.get(key)} does not match this shard's "
                                 f"{getattr(self, key)} (use load(dir) to re-shard)")
        arrays = {}
        for name in ("weight", *self.spec.state_names):
            if name not in state:
                raise ValueError(f"PartialFC.set_state_dict: missing {name!r} (optimizer {self.optimizer!r})")
            arrays[name] = np.asarray(state[name])
            if arrays[name].shape != (self.num_local, self.embedding_size):
                raise ValueError(f"PartialFC.set_state_dict: {name} has shape {arrays[name].shape}, expected "
                                 f"{(self.num_local, self.embedding_size)}")
        self.head.load_arrays(arrays, int(state["num_updates"]))
        self.num_draws = int(state["num_draws"])

    def save(self, directory: str | Path) -> None:
        """Write this rank's shard files and (rank 0) manifest.json; collective when W > 1."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        names = ["weight", *self.spec.state_names]
        write_shard(directory, self.rank, {name: state[name] for name in names})
        if self.world_size > 1:
            dist.barrier()
        if self.rank == 0:
            write_manifest(directory, world_size=self.world_size, num_classes=self.num_classes,
                           embedding_size=self.embedding_size, optimizer=self.optimizer, names=names,
                           num_updates=state["num_updates"], num_draws=self.num_draws)
        if self.world_size > 1:
            dist.barrier()

    def load(self, directory: str | Path) -> None:
        """Read this rank's class range from shards saved with any world size and either backend (no pickle)."""
        directory = Path(directory)
        manifest = read_manifest(directory / MANIFEST)
        for key in ("num_classes", "embedding_size", "optimizer"):
            if manifest[key] != getattr(self, key):
                raise ValueError(f"PartialFC.load: {directory / MANIFEST}: {key}={manifest[key]!r} but this head has "
                                 f"{key}={getattr(self, key)!r}")
        arrays = read_rows(directory, manifest, ["weight", *self.spec.state_names], self.class_start, self.num_local,
                           self.embedding_size)
        self.head.load_arrays(arrays, int(manifest["num_updates"]))
        self.num_draws = int(manifest["num_draws"])


def _host(labels: Any) -> np.ndarray:
    """Labels as a host array (a tensor's values are read: the numpy backend, and the paddle backend's first check)."""
    return np.asarray(labels.numpy() if isinstance(labels, paddle.Tensor) else labels).reshape(-1)
