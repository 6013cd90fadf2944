"""The numpy backend of Partial FC: the fast CPU head.

On CPU the head is a few big BLAS products and row gathers. Done in place in NumPy (one buffer per role, reused
every step, BLAS gemm accumulating straight into the momentum) it is several times faster than Paddle ops and than
arcface_torch, and needs no full-matrix temporaries. The head's gradient is never materialised: it stays factored
(dL/dcos [S, N] + the normalised embeddings) until step(). The Paddle side is a PyLayer: the loss is a Paddle scalar
whose backward returns the embedding gradient, so `loss.backward()` trains the backbone as usual.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

from pfc.comm import NumpyComm
from pfc.sampling import choose_numpy
from pfc.shards import init_centres
from pfc.spec import EXP_FLOOR, NORM_EPS, HeadSpec
from utils.distributed import cores_per_rank

_BLOCK = 4096         # class rows per parallel task: small enough to balance 2 threads on a busy machine
_BLAS_LIMIT = ThreadpoolController()  # BLAS runs single-threaded inside the head's own thread pool


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
    """Autograd bridge: loss = the NumPy head on the embeddings; backward returns their gradient."""

    @staticmethod
    def forward(ctx: Any, embeddings: paddle.Tensor, head: NumpyHead, labels: np.ndarray, size: int,
                keys: tuple[int, int]) -> paddle.Tensor:
        emb = embeddings.numpy().astype(np.float32, copy=False)
        loss, ctx.saved = head._forward_numpy(emb, labels, size, keys)
        ctx.head, ctx.dtype = head, embeddings.dtype
        return paddle.to_tensor(np.float32(loss))

    @staticmethod
    def backward(ctx: Any, grad: paddle.Tensor) -> paddle.Tensor:
        saved, ctx.saved = ctx.saved, None
        with np.errstate(invalid="ignore", over="ignore"):  # an AMP overflow: step() will see it and skip
            grad_emb = ctx.head._backward_numpy(saved, float(grad))
        return paddle.to_tensor(grad_emb).astype(ctx.dtype)


class NumpyHead:
    """Centres and optimizer state as NumPy arrays; forward/backward/step in NumPy blocks on a thread pool."""

    def __init__(self, spec: HeadSpec) -> None:
        self.spec = spec
        self.margin_loss, self.embedding_size = spec.margin, spec.embedding_size
        self.class_start, self.num_local = spec.class_start, spec.num_local
        self.rank, self.world_size, self.optimizer = spec.rank, spec.world_size, spec.optimizer
        self.momentum, self.weight_decay, self.betas, self.eps = spec.momentum, spec.weight_decay, spec.betas, spec.eps
        self.comm = NumpyComm(spec.world_size)
        self.weight = np.empty((spec.num_local, spec.embedding_size), np.float32)
        init_centres(self.weight, spec.class_start, spec.seed)
        self.opt_state = {name: np.zeros_like(self.weight) for name in spec.state_names}
        self.num_updates = 0  # optimizer steps taken (AdamW bias correction)
        self._pending: _HeadGrad | None = None
        self._spare: dict[str, np.ndarray] = {}
        self.threads = cores_per_rank()  # worker threads: this host's cores shared by its ranks
        self._pool: ThreadPoolExecutor | None = None

    def forward(self, local_embeddings: paddle.Tensor, labels: np.ndarray, size: int,
                keys: tuple[int, int]) -> paddle.Tensor:
        """labels: every rank's labels (host int64, already gathered and checked by the facade)."""
        return _HeadFunction.apply(local_embeddings, self, labels, size, keys)

    # --------------------------------------------------------------- state
    def arrays(self) -> dict[str, np.ndarray]:
        """weight and optimizer state (the live arrays)."""
        return {"weight": self.weight, **self.opt_state}

    def load_arrays(self, arrays: dict[str, np.ndarray], num_updates: int) -> None:
        for name, target in self.arrays().items():
            target[...] = arrays[name]
        self.num_updates = num_updates
        self._pending = None

    def workspace_bytes(self, size: int, batch: int) -> int:
        """Per-step working memory from the shapes (size sampled classes, batch gathered embeddings): the gathered
        rows, the two [S, N] matrices and the filter mask, the embeddings, each thread's update blocks."""
        d, states = self.embedding_size, len(self.opt_state)
        rows = size * d if size < self.num_local else 0
        return 4 * (rows + 2 * size * batch + 2 * batch * d) + size * batch + 4 * self.threads * _BLOCK * d * (
            states + 2)

    def grads_finite(self) -> paddle.Tensor:
        """Whether the pending head gradient is finite (a bool tensor, as the paddle backend's)."""
        return paddle.to_tensor(self._pending is None or bool(self._finite(self._pending)))

    def _finite(self, grad: _HeadGrad) -> bool:
        count = self.num_local if grad.idx is None else grad.idx.size
        return bool(np.isfinite(grad.beta).all() and all(self._map(lambda a, b: np.isfinite(grad.grad_t[a:b]).all(),
                                                                   count)))

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

    def _forward_numpy(self, local_emb: np.ndarray, labels: np.ndarray, size: int,
                       keys: tuple[int, int]) -> tuple[float, dict]:
        comm, margin = self.comm, self.margin_loss
        emb = comm.all_gather(local_emb)
        n = emb.shape[0]
        norms = np.maximum(np.linalg.norm(emb, axis=1), NORM_EPS).astype(np.float32)
        emb_n = emb / norms[:, None]
        local = labels - self.class_start
        t_rows = np.flatnonzero((local >= 0) & (local < self.num_local))
        t_cls = local[t_rows]
        idx = choose_numpy(np.unique(t_cls), self.num_local, size, keys)
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
            inv_w[a:b] = 1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", r, r)), NORM_EPS)
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
            np.maximum(logit, np.float32(EXP_FLOOR), out=logit)
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
        grad, self._pending = self._pending, None
        if grad is None:
            return True
        if not self._finite(grad):
            return False
        count = self.num_local if grad.idx is None else grad.idx.size
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

