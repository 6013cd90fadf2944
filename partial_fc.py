"""Partial FC: class centres sharded over ranks, sampled negatives, distributed softmax cross-entropy, sparse updates.

Rank r of W holds `num_local` centres from `class_start` (the first C % W ranks one more). Each step all-gathers the
embeddings and labels, keeps every positive local class plus random negatives up to int(sample_rate * num_local),
computes cosine logits with the margin, and a softmax cross-entropy over all ranks' columns (all_reduce of the max,
the sum of exponentials and the target logit). Only the sampled rows get a gradient, and only they (and their optimizer
state) change in `step()`: no dense gradient exists, so the state is weight + momentum = 4 KB per class at 512-d fp32.

Why NumPy: on CPU the head is a few big BLAS products and row gathers. Done in place in NumPy (one buffer per role,
reused every step, BLAS gemm accumulating straight into the momentum) it is several times faster than Paddle ops and
than arcface_torch, and needs no full-matrix temporaries. The Paddle side is a PyLayer: the loss is a Paddle scalar
whose backward returns the embedding gradient, so `loss.backward()` trains the backbone as usual.

On a GPU, Paddle's fused `class_center_sample` + `margin_cross_entropy` kernels run instead (see `_forward_gpu`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

from losses import CombinedMarginLoss
from utils.atomic import atomic_output, write_bytes_atomic

OPTIMIZERS = {"sgd": ("momentum",), "adamw": ("exp_avg", "exp_avg_sq")}
MANIFEST = "manifest.json"
_SHARD_FILES = {"weight": "softmax_weight", "momentum": "softmax_mom", "exp_avg": "softmax_exp_avg",
                "exp_avg_sq": "softmax_exp_avg_sq"}
_INIT_BLOCK = 4096    # rows per seeded block of the initial matrix: the same full matrix for any world size
_BLOCK = 4096         # class rows per parallel task: small enough to balance 2 threads on a busy machine
_NORM_EPS = 1e-12     # as paddle/torch normalize
_BLAS_LIMIT = ThreadpoolController()  # BLAS runs single-threaded inside the head's own thread pool
_EXP_FLOOR = -57.0    # exp(logit - max) floor: e^-57 = 1.8e-25 keeps every product above float32's denormals


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local) of `rank`: contiguous split, the first num_classes % world_size ranks get one more."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def init_centres(out: np.ndarray, class_start: int, seed: int) -> None:
    """Fill `out` with rows class_start.. of the N(0, 0.01) centre matrix defined by `seed` alone (not by sharding)."""
    stop = class_start + out.shape[0]
    for block in range(class_start // _INIT_BLOCK, -(-stop // _INIT_BLOCK)):
        lo, hi = block * _INIT_BLOCK, (block + 1) * _INIT_BLOCK
        rows = np.random.default_rng([seed, block]).standard_normal((_INIT_BLOCK, out.shape[1]), dtype=np.float32)
        rows *= np.float32(0.01)
        a, b = max(lo, class_start), min(hi, stop)
        out[a - class_start:b - class_start] = rows[a - lo:b - lo]


def _world() -> tuple[int, int]:
    """(rank, world_size): the initialised process group's, else a single process."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Comm:
    """The few collectives of the head, on NumPy arrays (gloo: no reduce_scatter, no float16 sums)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def all_gather(self, array: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return array
        parts: list[paddle.Tensor] = []
        dist.all_gather(parts, paddle.to_tensor(np.ascontiguousarray(array)))
        return np.concatenate([p.numpy() for p in parts])

    def all_reduce(self, array: np.ndarray, op: Any = None) -> np.ndarray:
        if self.world_size == 1:
            return array
        tensor = paddle.to_tensor(np.ascontiguousarray(array))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
        return tensor.numpy()


@dataclass
class _HeadGrad:
    """The head gradient of one or more backward passes, kept factored until step() (never a dense [C, D] array).

    dL/dw_j = sum_i grad_t[j, i] * emb[i] - beta[j] * w_j for the rows `idx` (None = all local rows).
    """

    idx: np.ndarray | None
    grad_t: np.ndarray             # [S, N] dL/dcos, divided by the row norms
    emb: np.ndarray                # [N, D] normalised embeddings
    beta: np.ndarray               # [S]
    rows: np.ndarray | None = None  # [S, D] the gathered weight rows, still valid (None: gather again)


class _HeadFunction(paddle.autograd.PyLayer):
    """Autograd bridge: loss = pfc's NumPy head on the embeddings; backward returns their gradient."""

    @staticmethod
    def forward(ctx: Any, embeddings: paddle.Tensor, pfc: PartialFC, labels: np.ndarray) -> paddle.Tensor:
        loss, ctx.saved = pfc._forward_numpy(embeddings.numpy().astype(np.float32, copy=False), labels)
        ctx.pfc, ctx.dtype = pfc, embeddings.dtype
        return paddle.to_tensor(np.float32(loss))

    @staticmethod
    def backward(ctx: Any, grad: paddle.Tensor) -> paddle.Tensor:
        saved, ctx.saved = ctx.saved, None
        with np.errstate(invalid="ignore", over="ignore"):  # an AMP overflow: step() will see it and skip
            grad_emb = ctx.pfc._backward_numpy(saved, float(grad))
        return paddle.to_tensor(grad_emb).astype(ctx.dtype)


class _AllGather(paddle.autograd.PyLayer):
    """all_gather along the batch with a gradient: all_reduce + own slice, times W (DataParallel averages ranks)."""

    @staticmethod
    def forward(ctx: Any, tensor: paddle.Tensor) -> paddle.Tensor:
        parts: list[paddle.Tensor] = []
        dist.all_gather(parts, tensor)
        ctx.batch, ctx.dtype = tensor.shape[0], tensor.dtype
        return paddle.concat(parts)

    @staticmethod
    def backward(ctx: Any, grad: paddle.Tensor) -> paddle.Tensor:
        grad = grad.astype("float32")  # gloo/nccl fp16 sums overflow
        dist.all_reduce(grad)
        rank, world = _world()
        return (grad[rank * ctx.batch:(rank + 1) * ctx.batch] * world).astype(ctx.dtype)


class PartialFC:
    """Model-parallel margin-softmax head with sampled negatives and sparse updates.

    loss = pfc(local_embeddings [B, D], local_labels [B]) is the mean over the global batch (W * B); its backward gives
    the embedding gradients, scaled by W so that paddle.DataParallel's averaging yields the full-batch gradient.
    pfc.step(lr) then updates the rows sampled since the last step (several backward passes accumulate).
    """

    def __init__(self, margin_loss: CombinedMarginLoss, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, fp16: bool = False, optimizer: str = "sgd", momentum: float = 0.9,
                 weight_decay: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 seed: int = 0) -> None:
        self.rank, self.world_size = _world()
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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PartialFC: {message}")
        self.margin_loss = margin_loss
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate, self.fp16, self.optimizer = float(sample_rate), bool(fp16), optimizer
        self.momentum, self.weight_decay, self.betas, self.eps = float(momentum), float(weight_decay), betas, eps
        self.seed = int(seed)
        self.class_start, self.num_local = shard_range(self.num_classes, self.world_size, self.rank)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.comm = _Comm(self.world_size)
        self.weight = np.empty((self.num_local, self.embedding_size), np.float32)
        init_centres(self.weight, self.class_start, self.seed)
        self.opt_state = {name: np.zeros_like(self.weight) for name in OPTIMIZERS[optimizer]}
        self.num_updates = 0  # optimizer steps taken (AdamW bias correction)
        self.num_draws = 0    # forward passes (seeds each step's negative sample)
        self.batch_size: int | None = None
        self._pending: _HeadGrad | None = None
        self._spare: dict[str, np.ndarray] = {}
        # worker threads of the NumPy head: this host's cores shared by its ranks (the launcher's PADDLE_LOCAL_SIZE)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = max(1, cores // int(os.environ.get("PADDLE_LOCAL_SIZE", "1")))
        self._pool: ThreadPoolExecutor | None = None
        self._gpu = _use_gpu_kernels() and optimizer == "sgd"
        if self._gpu:
            self._to_device()

    # ------------------------------------------------------------------ forward
    def __call__(self, local_embeddings: paddle.Tensor, local_labels: paddle.Tensor | np.ndarray) -> paddle.Tensor:
        return self.forward(local_embeddings, local_labels)

    def forward(self, local_embeddings: paddle.Tensor, local_labels: paddle.Tensor | np.ndarray) -> paddle.Tensor:
        """Mean margin-softmax loss over the global batch (a Paddle scalar with autograd to the embeddings)."""
        labels = self._gather_labels(local_embeddings, local_labels)
        if self._gpu:
            return self._forward_gpu(local_embeddings, labels)
        return _HeadFunction.apply(local_embeddings, self, labels)

    def _gather_labels(self, embeddings: Any, labels: Any) -> np.ndarray:
        """All ranks' labels, after checking every rank's inputs collectively so that all ranks fail together."""
        shape = tuple(getattr(embeddings, "shape", ()))
        labels = np.asarray(labels.numpy() if isinstance(labels, paddle.Tensor) else labels).reshape(-1)
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

    def _sample(self, positives: np.ndarray) -> np.ndarray | None:
        """Sorted local rows to use this step: every positive + random negatives up to num_sample (None = all)."""
        self.num_draws += 1
        if self.num_sample >= self.num_local:
            return None
        if positives.size >= self.num_sample:
            return positives
        scores = np.random.default_rng([self.seed, self.rank, self.num_draws]).random(self.num_local, np.float32)
        scores[positives] = -1.0  # below every random score: always among the num_sample smallest
        index = np.argpartition(scores, self.num_sample - 1)[:self.num_sample]
        index.sort()
        return index

    def _buffer(self, role: str, shape: tuple[int, ...], per_thread: bool = False) -> np.ndarray:
        """A float32 work array for `role`, reusing last step's memory (fresh pages cost more than the math)."""
        role = f"{role}@{threading.get_ident()}" if per_thread else role
        size = int(np.prod(shape))
        base = self._spare.pop(role, None)
        if base is None or base.size < size:
            base = np.empty(size, np.float32)
        return base[:size].reshape(shape)

    def _release(self, role: str, array: np.ndarray | None, per_thread: bool = False) -> None:
        if array is not None and array.base is not None and array.base.ndim == 1:
            self._spare[f"{role}@{threading.get_ident()}" if per_thread else role] = array.base

    def _map(self, fn: Callable[[int, int], Any], count: int) -> list:
        """fn(a, b) over blocks of _BLOCK class rows of [0, count), on all cores, BLAS single-threaded inside.

        Coarse-grained: on 2 busy cores, 2-thread OpenBLAS on these shapes was measured 5x slower than 1 thread,
        while independent blocks in 2 Python threads (NumPy and BLAS release the GIL) keep both cores useful.
        """
        blocks = [(a, min(a + _BLOCK, count)) for a in range(0, count, _BLOCK)]
        with _BLAS_LIMIT.limit(limits=1, user_api="blas"):
            if self.threads == 1 or len(blocks) <= 1:
                return [fn(a, b) for a, b in blocks]
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="partial_fc")
            return list(self._pool.map(lambda block: fn(*block), blocks))

    def _forward_numpy(self, local_emb: np.ndarray, labels: np.ndarray) -> tuple[float, dict]:
        comm, margin = self.comm, self.margin_loss
        emb = comm.all_gather(local_emb)
        n = emb.shape[0]
        norms = np.maximum(np.linalg.norm(emb, axis=1), _NORM_EPS).astype(np.float32)
        emb_n = emb / norms[:, None]
        local = labels - self.class_start
        t_rows = np.flatnonzero((local >= 0) & (local < self.num_local))
        t_cls = local[t_rows]
        idx = self._sample(np.unique(t_cls))
        t_cols = t_cls if idx is None else np.searchsorted(idx, t_cls)
        count = self.num_local if idx is None else idx.size
        rows = self.weight if idx is None else self._buffer("rows", (count, emb.shape[1]))
        # class-major [S, N] layout: blocks of classes are contiguous row ranges, reductions run over axis 0
        cos_t, logit_t = self._buffer("cos", (count, n)), self._buffer("logits", (count, n))
        inv_w = np.empty(count, np.float32)
        mask = None if margin.interclass_filtering_threshold <= 0 else np.empty((count, n), bool)
        order = np.argsort(t_cols, kind="stable")  # targets by column, so that each block finds its own
        col_sorted = t_cols[order]
        target_cos, target_logit = np.empty(t_rows.size, np.float32), np.empty(t_rows.size)

        def targets_in(a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            k = order[np.searchsorted(col_sorted, a):np.searchsorted(col_sorted, b)]
            return k, t_cols[k] - a, t_rows[k]

        def logits_block(a: int, b: int) -> np.ndarray:
            if idx is not None:
                np.take(self.weight, idx[a:b], axis=0, mode="clip", out=rows[a:b])
            r = rows[a:b]
            inv_w[a:b] = 1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", r, r)), _NORM_EPS)
            cos = np.matmul(r, emb_n.T, out=cos_t[a:b])
            cos *= inv_w[a:b, None]
            np.clip(cos, -1.0, 1.0, out=cos)
            logit = np.multiply(cos, np.float32(margin.s), out=logit_t[a:b])
            k, cols, rws = targets_in(a, b)
            if mask is not None:  # inter-class filtering: negatives above the threshold -> logit 0, no gradient
                np.greater(cos, margin.interclass_filtering_threshold, out=mask[a:b])
                mask[a:b][cols, rws] = False
                logit[mask[a:b]] = 0.0
            target_cos[k] = cos[cols, rws]
            target_logit[k] = margin.target_logit(target_cos[k])
            logit[cols, rws] = target_logit[k]
            return logit.max(axis=0)

        parts = self._map(logits_block, count)
        top = comm.all_reduce(np.max(parts, axis=0) if parts else np.full(n, -np.inf, np.float32),
                              dist.ReduceOp.MAX)

        def exp_block(a: int, b: int) -> np.ndarray:
            logit = logit_t[a:b]
            logit -= top
            # Flush to zero by hand: exp below ~1e-38 gives float32 denormals, which make every later BLAS call and
            # elementwise pass ~50x slower. e^-57 = 2e-25 instead of a smaller term changes no float32 result.
            np.maximum(logit, np.float32(_EXP_FLOOR), out=logit)
            np.exp(logit, out=logit)  # logit_t now holds exp(logit - max)
            return logit.sum(axis=0, dtype=np.float64)

        sumexp = comm.all_reduce(np.sum(self._map(exp_block, count), axis=0) + np.zeros(n))
        target = np.zeros(n)
        target[t_rows] = target_logit
        target = comm.all_reduce(target)
        loss = float(np.mean(np.log(sumexp) + top - target))
        saved = dict(emb_n=emb_n, norms=norms, idx=idx, rows=rows, inv_w=inv_w, cos_t=cos_t, logit_t=logit_t,
                     sumexp=sumexp, target_cos=target_cos, mask=mask, targets_in=targets_in)
        return loss, saved

    # ----------------------------------------------------------------- backward
    def _backward_numpy(self, saved: dict, grad_loss: float) -> np.ndarray:
        """Embedding gradient of this rank's samples; the head's gradient is kept (factored) for step()."""
        margin, emb_n, logit_t, cos_t = self.margin_loss, saved["emb_n"], saved["logit_t"], saved["cos_t"]
        inv_w, rows, mask, sumexp = saved["inv_w"], saved["rows"], saved["mask"], saved["sumexp"]
        n = emb_n.shape[0]
        col_scale = (grad_loss * margin.s / n / sumexp).astype(np.float32)
        beta = np.empty(inv_w.size, np.float32)

        def grad_block(a: int, b: int) -> np.ndarray:
            # dL/dcos = (softmax - onehot) / N * dlogit/dcos: s for negatives, 0 if filtered, the margin's for targets
            g = logit_t[a:b]
            k, cols, rws = saved["targets_in"](a, b)
            p_target = g[cols, rws] / sumexp[rws]
            g *= col_scale
            if mask is not None:
                g[mask[a:b]] = 0.0
            g[cols, rws] = (p_target - 1.0) * (grad_loss / n) * margin.target_grad(saved["target_cos"][k])
            g *= inv_w[a:b, None]  # through w / |w|: the cosine is (e_n . w) / |w|
            beta[a:b] = inv_w[a:b] * np.einsum("ji,ji->j", g, cos_t[a:b])
            return g.T @ rows[a:b]

        parts = self._map(grad_block, inv_w.size)
        grad_emb_n = self.comm.all_reduce(np.sum(parts, axis=0) if parts else np.zeros_like(emb_n))
        self._release("cos", cos_t)
        b = n // self.world_size
        local = slice(self.rank * b, (self.rank + 1) * b)
        e, g = emb_n[local], grad_emb_n[local]
        grad_emb = (g - np.einsum("ij,ij->i", g, e)[:, None] * e) / saved["norms"][local, None]
        idx = saved["idx"]
        self._accumulate(_HeadGrad(idx, logit_t, emb_n, beta, rows if idx is not None else None))
        return grad_emb * np.float32(self.world_size)  # DataParallel divides backbone gradients by W

    def _accumulate(self, grad: _HeadGrad) -> None:
        """Add a backward pass's head gradient to the pending one (gradient accumulation): union of the rows."""
        old = self._pending
        if old is None:
            self._pending = grad
            return
        if old.idx is None or grad.idx is None:
            idx, size = None, self.num_local
            pos_a = np.arange(size) if old.idx is None else old.idx
            pos_b = np.arange(size) if grad.idx is None else grad.idx
        else:
            idx = np.union1d(old.idx, grad.idx)
            size, pos_a, pos_b = idx.size, np.searchsorted(idx, old.idx), np.searchsorted(idx, grad.idx)
        na = old.emb.shape[0]
        grad_t = np.zeros((size, na + grad.emb.shape[0]), np.float32)
        grad_t[pos_a, :na] = old.grad_t
        grad_t[pos_b, na:] = grad.grad_t
        beta = np.zeros(size, np.float32)
        beta[pos_a] += old.beta
        beta[pos_b] += grad.beta
        self._pending = _HeadGrad(idx, grad_t, np.concatenate([old.emb, grad.emb]), beta)

    # --------------------------------------------------------------------- step
    def zero_grad(self) -> None:
        """Drop the accumulated head gradient (e.g. when AMP skips a step)."""
        self._pending = None
        if self._gpu:
            self._gpu_pending = []

    def pending_gradient(self) -> tuple[np.ndarray, np.ndarray]:
        """(local row indices, their accumulated loss gradient [S, D]) materialised (CPU path; for checks/tests)."""
        grad = self._pending
        if grad is None:
            return np.zeros(0, np.int64), np.zeros((0, self.embedding_size), np.float32)
        idx = np.arange(self.num_local) if grad.idx is None else grad.idx
        rows = self.weight[idx]
        out = np.zeros_like(rows)
        self._row_grad_into(out, grad, 0, idx.size, np.float32(1.0), 0.0)
        return idx, out - grad.beta[:, None] * rows

    def step(self, lr: float, loss_scale: float = 1.0) -> bool:
        """Apply the optimizer to the rows sampled since the last step; returns False (and skips) on a non-finite
        gradient. loss_scale divides the accumulated gradient (AMP loss scaling)."""
        if not (np.isfinite(lr) and lr >= 0 and np.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"PartialFC.step: lr={lr} and loss_scale={loss_scale} must be finite, lr >= 0, scale > 0")
        if self._gpu:
            return self._step_gpu(lr, loss_scale)
        grad, self._pending = self._pending, None
        if grad is None:
            return True
        count = self.num_local if grad.idx is None else grad.idx.size
        if not (np.isfinite(grad.beta).all() and all(self._map(lambda a, b: np.isfinite(grad.grad_t[a:b]).all(),
                                                               count))):
            return False
        self.num_updates += 1
        update = self._update_sgd if self.optimizer == "sgd" else self._update_adamw
        scale = np.float32(1.0 / loss_scale)

        def update_block(a: int, b: int) -> None:
            if grad.idx is None:
                update(self.weight[a:b], [s[a:b] for s in self.opt_state.values()], grad, a, b, lr, scale)
                return
            rows = grad.idx[a:b]
            w = grad.rows[a:b] if grad.rows is not None else np.take(
                self.weight, rows, axis=0, mode="clip", out=self._buffer("w", (b - a, self.embedding_size), True))
            states = [np.take(s, rows, axis=0, mode="clip", out=self._buffer(name, w.shape, True))
                      for name, s in self.opt_state.items()]
            update(w, states, grad, a, b, lr, scale)
            self.weight[rows] = w  # rows are unique: plain scatter, no np.add.at
            for (name, full), part in zip(self.opt_state.items(), states, strict=True):
                full[rows] = part
                self._release(name, part, True)
            if grad.rows is None:
                self._release("w", w, True)

        self._map(update_block, count)
        self._release("rows", grad.rows)
        self._release("logits", grad.grad_t)
        return True

    def _row_grad_into(self, out: np.ndarray, grad: _HeadGrad, a: int, b: int, scale: np.float32,
                       keep: float) -> None:
        """out = keep * out + scale * grad_t[a:b] @ emb, in place (BLAS gemm accumulating into out)."""
        result = blas.sgemm(scale, grad.emb.T, grad.grad_t[a:b].T, beta=keep, c=out.T, overwrite_c=True)
        if not np.shares_memory(result, out):  # not expected for contiguous float32 chunks; stay correct anyway
            out[...] = result.T

    def _update_sgd(self, w: np.ndarray, states: list[np.ndarray], grad: _HeadGrad, a: int, b: int, lr: float,
                    scale: np.float32) -> None:
        """Paddle Momentum / torch SGD with L2 weight decay: m = mu*m + g + wd*w; w -= lr*m."""
        (mom,) = states
        self._row_grad_into(mom, grad, a, b, scale, self.momentum)
        tmp = self._buffer("tmp", w.shape, True)
        mom += np.multiply(w, (self.weight_decay - scale * grad.beta[a:b])[:, None], out=tmp)
        self._release("tmp", tmp, True)
        blas.saxpy(mom.reshape(-1), w.reshape(-1), a=-lr)  # w -= lr * mom in one pass, in place

    def _update_adamw(self, w: np.ndarray, states: list[np.ndarray], grad: _HeadGrad, a: int, b: int, lr: float,
                      scale: np.float32) -> None:
        """Lazy AdamW (torch's formula, decoupled decay) on the sampled rows only."""
        exp_avg, exp_avg_sq = states
        (b1, b2), t = self.betas, self.num_updates
        g = self._buffer("tmp", w.shape, True)
        self._row_grad_into(g, grad, a, b, scale, 0.0)
        g -= w * (scale * grad.beta[a:b])[:, None]
        w *= np.float32(1.0 - lr * self.weight_decay)
        exp_avg *= np.float32(b1)
        exp_avg += np.float32(1 - b1) * g
        exp_avg_sq *= np.float32(b2)
        exp_avg_sq += np.float32(1 - b2) * g * g
        denom = np.sqrt(exp_avg_sq / np.float32(1 - b2 ** t)) + np.float32(self.eps)
        w -= np.float32(lr / (1 - b1 ** t)) * exp_avg / denom
        self._release("tmp", g, True)

    # ---------------------------------------------------------------- state I/O
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: arrays (weight, optimizer state) and the counters needed to resume exactly."""
        self._from_device()
        return {"weight": self.weight, **self.opt_state, "class_start": self.class_start,
                "num_classes": self.num_classes, "num_updates": self.num_updates, "num_draws": self.num_draws}

    def set_state_dict(self, state: dict[str, Any]) -> None:
        """Load this rank's shard (same class range); use load() to re-shard from another world size."""
        for key in ("class_start", "num_classes"):
            if int(state.get(key, -1)) != getattr(self, key):
                raise ValueError(f"PartialFC.set_state_dict: {key}={state.get(key)} does not match this shard's "
                                 f"{getattr(self, key)} (use load(dir) to re-shard)")
        for name, target in [("weight", self.weight), *self.opt_state.items()]:
            if name not in state:
                raise ValueError(f"PartialFC.set_state_dict: missing {name!r} (optimizer {self.optimizer!r})")
            array = np.asarray(state[name])
            if array.shape != target.shape:
                raise ValueError(f"PartialFC.set_state_dict: {name} has shape {array.shape}, expected {target.shape}")
            target[...] = array
        self.num_updates, self.num_draws = int(state["num_updates"]), int(state["num_draws"])
        self._pending = None
        if self._gpu:
            self._to_device()

    def save(self, directory: str | Path) -> None:
        """Write this rank's shard files and (rank 0) manifest.json; collective when W > 1."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        for name in ("weight", *self.opt_state):
            _atomic_save(directory / f"{_SHARD_FILES[name]}.r{self.rank}.npy", state[name])
        if self.world_size > 1:
            dist.barrier()
        if self.rank == 0:
            shards = [dict(zip(("class_start", "num_local"), shard_range(self.num_classes, self.world_size, r),
                               strict=True)) for r in range(self.world_size)]
            manifest = {"format": "partial_fc/1", "world_size": self.world_size, "num_classes": self.num_classes,
                        "embedding_size": self.embedding_size, "dtype": "float32", "optimizer": self.optimizer,
                        "arrays": {n: _SHARD_FILES[n] for n in ("weight", *self.opt_state)},
                        "num_updates": self.num_updates, "num_draws": self.num_draws, "shards": shards}
            write_bytes_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        if self.world_size > 1:
            dist.barrier()

    def load(self, directory: str | Path) -> None:
        """Read this rank's class range from shards saved with any world size (memory-mapped, no pickle)."""
        directory = Path(directory)
        manifest = _read_manifest(directory / MANIFEST)
        for key in ("num_classes", "embedding_size", "optimizer"):
            if manifest[key] != getattr(self, key):
                raise ValueError(f"PartialFC.load: {directory / MANIFEST}: {key}={manifest[key]!r} but this head has "
                                 f"{key}={getattr(self, key)!r}")
        stop = self.class_start + self.num_local
        pieces = []  # (target array, rows in target, source memmap, rows in source): all checked before any copy
        for name, target in [("weight", self.weight), *self.opt_state.items()]:
            for rank, shard in enumerate(manifest["shards"]):
                lo, hi = shard["class_start"], shard["class_start"] + shard["num_local"]
                a, b = max(lo, self.class_start), min(hi, stop)
                if a >= b:
                    continue
                path = directory / f"{manifest['arrays'][name]}.r{rank}.npy"
                try:
                    array = np.load(path, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise ValueError(f"PartialFC.load: cannot read {path}: {exc}") from exc
                if array.shape != (hi - lo, self.embedding_size) or array.dtype != np.float32:
                    raise ValueError(f"PartialFC.load: {path} holds {array.dtype}{list(array.shape)}, manifest says "
                                     f"float32[{hi - lo}, {self.embedding_size}]")
                pieces.append((target, slice(a - self.class_start, b - self.class_start), array, slice(a - lo, b - lo)))
        for target, target_rows, array, source_rows in pieces:
            target[target_rows] = array[source_rows]
        self.num_updates, self.num_draws = int(manifest["num_updates"]), int(manifest["num_draws"])
        self._pending = None
        if self._gpu:
            self._to_device()

    # ------------------------------------------------------- GPU (fused kernels)
    def _to_device(self) -> None:
        """GPU path: keep the centres and momentum as device tensors (NumPy arrays stay the canonical CPU form)."""
        self._dev = {name: paddle.to_tensor(a) for name, a in [("weight", self.weight), *self.opt_state.items()]}
        self._gpu_pending: list[tuple[paddle.Tensor | None, paddle.Tensor]] = []

    def _from_device(self) -> None:
        if self._gpu:
            for name, target in [("weight", self.weight), *self.opt_state.items()]:
                target[...] = self._dev[name].numpy()

    def _forward_gpu(self, local_embeddings: paddle.Tensor, labels: np.ndarray) -> paddle.Tensor:
        """Paddle's fused class_center_sample + margin_cross_entropy (NCCL). Not runnable on this CPU-only machine.

        The margin (either grad mode, filtering) comes from CombinedMarginLoss.forward on this rank's sampled columns;
        margin_cross_entropy then runs with margins (1, 0, 0) as the distributed softmax cross-entropy.
        """
        functional = paddle.nn.functional
        group = None if self.world_size > 1 else False
        emb = _AllGather.apply(local_embeddings) if self.world_size > 1 else local_embeddings
        label = paddle.to_tensor(labels)
        weight = self._dev["weight"]
        self.num_draws += 1
        if self.num_sample < self.num_local:
            label, idx = functional.class_center_sample(label, self.num_local, self.num_sample, group=group)
            rows = paddle.gather(weight, idx)
        else:
            idx, rows = None, weight
        rows = rows.detach()
        rows.stop_gradient = False
        with paddle.amp.auto_cast(self.fp16):
            cos = paddle.matmul(functional.normalize(emb), functional.normalize(rows), transpose_y=True)
        cos = cos.astype("float32")
        counts = self.comm.all_gather(np.array([rows.shape[0]], np.int64))  # columns of each rank in label space
        offset = int(counts[:self.rank].sum())
        local = label - offset
        local = paddle.where((local >= 0) & (local < rows.shape[0]), local, paddle.full_like(local, -1))
        logits = self.margin_loss(cos, local) / self.margin_loss.s
        self._gpu_pending.append((idx, rows))
        return functional.margin_cross_entropy(logits, label, 1.0, 0.0, 0.0, self.margin_loss.s, group=group)

    def _step_gpu(self, lr: float, loss_scale: float) -> bool:
        """Sparse SGD on the device: unique rows of all pending passes, summed gradients, scatter back."""
        pending, self._gpu_pending = self._gpu_pending, []
        if not pending:
            return True
        weight, mom = self._dev["weight"], self._dev["momentum"]
        grads = paddle.concat([rows.grad for _, rows in pending]) / loss_scale
        if not bool(paddle.isfinite(grads).all()):
            return False
        idx = paddle.concat([paddle.arange(self.num_local) if i is None else i for i, _ in pending])
        unique, inverse = paddle.unique(idx, return_inverse=True)
        grad = paddle.zeros([unique.shape[0], self.embedding_size]).index_add(inverse, 0, grads)
        w, m = paddle.gather(weight, unique), paddle.gather(mom, unique)
        m = self.momentum * m + grad + self.weight_decay * w
        paddle.scatter_(mom, unique, m)
        paddle.scatter_(weight, unique, w - lr * m)
        self.num_updates += 1
        return True


def _use_gpu_kernels() -> bool:
    """Paddle's fused kernels exist on CUDA builds only; margin_cross_entropy has no CPU kernel."""
    return paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu")


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """np.save through utils.atomic: a crash never leaves half a shard."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"PartialFC.load: cannot read {path}: {exc}") from exc
    required = ("world_size", "num_classes", "embedding_size", "dtype", "optimizer", "arrays", "shards",
                "num_updates", "num_draws")
    missing = [k for k in required if k not in manifest]
    if missing or manifest.get("dtype") != "float32":
        raise ValueError(f"PartialFC.load: {path}: missing keys {missing} or unsupported dtype {manifest.get('dtype')}")
    expected = [shard_range(manifest["num_classes"], manifest["world_size"], r) for r in range(manifest["world_size"])]
    got = [(s.get("class_start"), s.get("num_local")) for s in manifest["shards"]]
    if got != expected:
        raise ValueError(f"PartialFC.load: {path}: shard ranges {got} are not the contiguous split {expected}")
    return manifest
