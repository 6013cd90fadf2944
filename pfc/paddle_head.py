"""The paddle backend of Partial FC: centres, optimizer state and every per-step operation on the device.

The same math as the numpy backend, written in Paddle tensor ops so that the code a GPU runs is the code the CPU tests
prove: labels all-gathered as tensors, seeded sampling by top-k over hashed scores (pfc.sampling), cosine logits, the
margin on the target column (indexed, no one-hot), a softmax cross-entropy over all ranks with our own log-sum-exp
(all_reduce of the max, the sum of exponentials and the target logit), a hand-written backward, and sparse SGD-momentum
or AdamW on the sampled rows only. Nothing in forward, backward or step reads a tensor's value on the host: shapes are
static functions of (num_local, sample_rate, batch), and the skip of a non-finite update is decided on the device.

`kernel="fused"` swaps the margin + softmax cross-entropy for Paddle's `margin_cross_entropy` (GPU only, see
`_fused_loss`), after a first-step check against the portable path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from pfc.comm import AllGather, TensorComm
from pfc.sampling import choose_paddle, sample_size
from pfc.shards import init_centres, shard_range
from pfc.spec import EXP_FLOOR, NORM_EPS, HeadSpec

KERNELS = ("portable", "fused")
_INIT_ROWS = 1 << 14  # centres initialised (and loaded) per host block: 32 MB at 512-d, small beside the state
_STEP_ROWS = 1 << 14  # rows per block of the optimizer update (bounds its temporaries: 32 MB each at 512-d)
FUSED_TOLERANCE = 1e-3  # relative difference of loss and embedding gradient above which the fused path is refused
log = logging.getLogger(__name__)


@dataclass
class _Pass:
    """One backward pass's head gradient: dL/dw_j = grad_t[:, j] . emb - beta_j * w_j on the sampled rows `idx`
    (None = all rows), or the .grad of `leaf` (the fused path: Paddle's autograd differentiates the rows)."""

    idx: paddle.Tensor | None
    rows: paddle.Tensor                  # [S, D] weight rows of the sample (unchanged until step)
    grad_t: paddle.Tensor | None = None  # [N, S] dL/dcos / |w|
    emb: paddle.Tensor | None = None     # [N, D] normalised embeddings
    beta: paddle.Tensor | None = None    # [S]
    leaf: paddle.Tensor | None = None    # [S, D] rows as an autograd leaf (fused path)

    def gradient(self, a: int, b: int) -> paddle.Tensor:
        """The gradient of sampled rows a:b."""
        if self.leaf is not None:
            return self.leaf.grad[a:b]
        return (paddle.matmul(self.grad_t[:, a:b], self.emb, transpose_x=True)
                - self.beta[a:b].unsqueeze(1) * self.rows[a:b])


class _HeadFunction(paddle.autograd.PyLayer):
    """loss = the head on the embeddings; backward returns their gradient and records the head's."""

    @staticmethod
    def forward(ctx: Any, embeddings: paddle.Tensor, head: PaddleHead, labels: paddle.Tensor, size: int,
                keys: tuple[int, int]) -> paddle.Tensor:
        loss, ctx.saved = head._forward(embeddings, labels, size, keys)
        ctx.head, ctx.dtype = head, embeddings.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad: paddle.Tensor) -> paddle.Tensor:
        saved, ctx.saved = ctx.saved, None
        return ctx.head._backward(saved, grad).astype(ctx.dtype)


class PaddleHead:
    """Centres and optimizer state as device tensors; forward/backward/step in Paddle ops, no host reads."""

    def __init__(self, spec: HeadSpec, kernel: str = "portable", fp16: bool = False) -> None:
        self.spec, self.kernel, self.fp16 = spec, kernel, fp16
        self.comm = TensorComm(spec.world_size)
        self.weight = paddle.empty([spec.num_local, spec.embedding_size], "float32")
        for a in range(0, spec.num_local, _INIT_ROWS):  # by blocks: no full host copy of the matrix
            block = np.empty((min(_INIT_ROWS, spec.num_local - a), spec.embedding_size), np.float32)
            init_centres(block, spec.class_start + a, spec.seed)
            self.weight[a:a + block.shape[0]] = paddle.to_tensor(block)
        self.opt_state = {name: paddle.zeros_like(self.weight) for name in spec.state_names}
        self.num_updates = paddle.zeros([], "int64")  # steps applied (AdamW bias correction), counted on the device
        self._pending: list[_Pass] = []
        self._fused_checked = kernel == "portable"

    def forward(self, local_embeddings: paddle.Tensor, labels: paddle.Tensor, size: int,
                keys: tuple[int, int]) -> paddle.Tensor:
        """labels: this rank's labels (a tensor; a host-side one is copied to the head's device, never read)."""
        if labels.place != self.weight.place:  # e.g. a DataLoader's CPU tensor while the head is on a GPU
            labels = labels.to(self.weight.place)
        labels = labels.reshape([-1]).astype("int64")
        if not self._fused_checked:
            self._check_fused(local_embeddings, labels, size, keys)
        if self.kernel == "fused":
            return self._fused_loss(local_embeddings, labels, size, keys)
        return _HeadFunction.apply(local_embeddings, self, labels, size, keys)

    # ------------------------------------------------------------------ forward
    def _sample(self, labels: paddle.Tensor, size: int, keys: tuple[int, int]):
        """All ranks' labels gathered; the sample (None: all rows), its weight rows, each sample's target column,
        and whether any label is outside [0, num_classes) (a device bool: it makes the loss NaN)."""
        spec = self.spec
        local = self.comm.all_gather(labels) - spec.class_start
        invalid = ((local < -spec.class_start) | (local >= spec.num_classes - spec.class_start)).any()
        idx = choose_paddle(local, spec.num_local, size, keys)
        if idx is None:
            has_target = (local >= 0) & (local < spec.num_local)
            column = local
        else:
            column = paddle.clip(paddle.searchsorted(idx, local), max=size - 1)
            has_target = paddle.index_select(idx, column) == local
        column = paddle.where(has_target, column, paddle.zeros_like(column)).unsqueeze(1)
        rows = self.weight if idx is None else paddle.index_select(self.weight, idx)
        return idx, rows, column, has_target.unsqueeze(1), invalid

    def _forward(self, local_emb: paddle.Tensor, labels: paddle.Tensor, size: int,
                 keys: tuple[int, int]) -> tuple[paddle.Tensor, dict]:
        margin, comm = self.spec.margin, self.comm
        emb = comm.all_gather(local_emb.astype("float32"))
        idx, rows, column, has_target, invalid = self._sample(labels, size, keys)
        norms = _row_norms(emb, keepdim=True)
        emb_n = emb / norms
        inv_w = 1.0 / _row_norms(rows)
        cos = paddle.matmul(emb_n, rows, transpose_y=True)  # [N, S]; in place from here on: one [N, S] per role
        cos.multiply_(inv_w).clip_(-1.0, 1.0)
        cos_t = paddle.take_along_axis(cos, column, 1)
        target_logit = margin.target_logit_tensor(cos_t)
        exps = cos * margin.s  # the logits, turned into exp(logit - max) in place below
        mask = None
        if margin.interclass_filtering_threshold > 0:  # negatives above the threshold: logit 0, no gradient
            mask = cos > margin.interclass_filtering_threshold
            exps.masked_fill_(mask, 0.0)
        _put_column(exps, column, has_target, target_logit)
        top = comm.all_reduce(exps.max(axis=1, keepdim=True), dist.ReduceOp.MAX)
        exps.subtract_(top).clip_(min=EXP_FLOOR).exp_()  # floor: see numpy_head (denormals)
        sumexp = comm.all_reduce(exps.sum(axis=1, keepdim=True))
        target = comm.all_reduce(paddle.where(has_target, target_logit, paddle.zeros_like(target_logit)))
        loss = (paddle.log(sumexp) + top - target).mean()
        loss = paddle.where(invalid, paddle.full_like(loss, float("nan")), loss)  # a label out of range
        saved = dict(emb_n=emb_n, norms=norms, idx=idx, rows=rows, inv_w=inv_w, cos=cos, exps=exps, sumexp=sumexp,
                     column=column, has_target=has_target, target_grad=margin.target_grad_tensor(cos_t), mask=mask)
        return loss, saved

    # ----------------------------------------------------------------- backward
    def _backward(self, saved: dict, grad_loss: paddle.Tensor) -> paddle.Tensor:
        """Embedding gradient of this rank's samples (x W: DataParallel averages); the head's is kept for step()."""
        spec, column, has_target = self.spec, saved["column"], saved["has_target"]
        n = saved["emb_n"].shape[0]
        grad_loss = grad_loss.reshape([]).astype("float32")
        grad_t = saved["exps"].divide_(saved["sumexp"])  # the softmax, turned into dL/dcos / |w| in place
        grad_target = (paddle.take_along_axis(grad_t, column, 1) - 1.0) * (grad_loss / n) * saved["target_grad"]
        grad_t.multiply_(grad_loss * (spec.margin.s / n))  # dL/dcos of the negatives
        if saved["mask"] is not None:
            grad_t.masked_fill_(saved["mask"], 0.0)
        _put_column(grad_t, column, has_target, grad_target)
        grad_t.multiply_(saved["inv_w"])  # through w / |w|: the cosine is (e_n . w) / |w|
        beta = saved["inv_w"] * paddle.einsum("ij,ij->j", grad_t, saved["cos"])  # no [N, S] temporary
        grad_emb_n = self.comm.all_reduce(paddle.matmul(grad_t, saved["rows"]))
        b = n // spec.world_size
        e, g = saved["emb_n"][spec.rank * b:(spec.rank + 1) * b], grad_emb_n[spec.rank * b:(spec.rank + 1) * b]
        grad_emb = (g - (g * e).sum(axis=1, keepdim=True) * e) / saved["norms"][spec.rank * b:(spec.rank + 1) * b]
        self._pending.append(_Pass(saved["idx"], saved["rows"], grad_t, saved["emb_n"], beta))
        return grad_emb * float(spec.world_size)

    # --------------------------------------------------------------------- step
    def zero_grad(self) -> None:
        self._pending = []

    def workspace_bytes(self, size: int, batch: int) -> int:
        """Per-step device memory from the shapes, one backward pass per step (size sampled classes, batch gathered
        embeddings): the larger of forward + backward (gathered rows, embeddings, three [N, S] matrices: cosines,
        exponentials turned in place into the gradient, one temporary; the filter mask) and the step (the pass's
        saved factors, and per block of _STEP_ROWS rows four temporaries for SGD in place, or the gradient and, per
        array, the old, new and guarded rows for AdamW)."""
        d, states = self.spec.embedding_size, len(self.opt_state)
        rows = size * d if size < self.spec.num_local else 0
        passes = 4 * (rows + 3 * batch * d + 3 * batch * size) + batch * size
        per_row = 4 if self.spec.optimizer == "sgd" else 1 + 3 * (1 + states)
        step = 4 * (rows + batch * size + batch * d + min(size, _STEP_ROWS) * d * per_row)
        return max(passes, step)

    def grads_finite(self) -> paddle.Tensor:
        """Whether the pending head gradient is finite: a bool tensor on the device (nothing is read). Checked on
        its factors (dL/dcos and beta; the fused path: the rows' gradient), as the numpy backend does."""
        checks = [paddle.isfinite(p.leaf.grad).all() if p.leaf is not None
                  else paddle.isfinite(p.grad_t).all() & paddle.isfinite(p.beta).all() for p in self._pending]
        return paddle.stack(checks).all() if checks else paddle.full([], True, "bool")

    def _combined(self) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Several passes: (rows of all passes, sorted, with repeats; their weights; at each position its row's
        summed gradient). Static shapes; repeated rows compute and write the same values."""
        arange = paddle.arange(self.spec.num_local, dtype="int64")
        idx = paddle.concat([arange if p.idx is None else p.idx for p in self._pending])
        grad = paddle.concat([p.gradient(0, p.rows.shape[0]) for p in self._pending])
        order = paddle.argsort(idx, stable=True)
        idx, grad = paddle.index_select(idx, order), paddle.index_select(grad, order)
        first = paddle.concat([paddle.ones([1], "int64"), (idx[1:] != idx[:-1]).astype("int64")])
        group = paddle.cumsum(first) - 1
        total = paddle.zeros_like(grad).index_add(group, 0, grad)
        return idx, paddle.index_select(self.weight, idx), paddle.index_select(total, group)

    def step(self, lr: float, loss_scale: float | paddle.Tensor = 1.0) -> bool:
        """Update the rows sampled since the last step, in blocks of _STEP_ROWS (bounded temporaries). A non-finite
        gradient leaves every row and state unchanged, decided on the device: the host is not told (returns True;
        ask grads_finite() first when it must know). Several accumulated passes are updated as one block (all old
        values are read before any is written: a row may appear in several passes)."""
        if not self._pending:
            return True
        ok, inverse = self.grads_finite(), 1.0 / loss_scale
        if len(self._pending) == 1:
            (only,) = self._pending
            idx, count, block = only.idx, only.rows.shape[0], _STEP_ROWS
            parts = lambda a, b: (only.rows[a:b], only.gradient(a, b))  # noqa: E731
        else:
            idx, rows, grad = self._combined()
            count = block = idx.shape[0]
            parts = lambda a, b: (rows, grad)  # noqa: E731
        factored = len(self._pending) == 1 and self._pending[0].leaf is None and self.spec.optimizer == "sgd"
        self._pending = []
        for a in range(0, count, block):
            b = min(a + block, count)
            block_idx = None if idx is None else idx[a:b]
            if factored:
                self._sgd_in_place(ok, block_idx, a, b, only, inverse, lr)
            else:
                w, grad = parts(a, b)
                self._update(ok, block_idx, a, b, w, grad * inverse, lr)
        self.num_updates += ok.astype("int64")
        return True

    def _sgd_in_place(self, ok: paddle.Tensor, idx: paddle.Tensor | None, a: int, b: int, grad: _Pass,
                      inverse: float | paddle.Tensor, lr: float) -> None:
        """SGD on rows a:b of one pass from its factors, in place (each new [rows, D] temporary costs page faults on
        CPU, memory on GPU): m = mu*m + G^T E; m += (wd - beta) * w; w -= lr * m, the numpy backend's sequence.
        Not ok (non-finite): the factors become 0 and (mu, lr) = (1, 0), which leaves m and w bitwise unchanged."""
        spec = self.spec
        grad_t = paddle.where(ok, grad.grad_t[:, a:b] * inverse, paddle.zeros([1], "float32"))
        coef = paddle.where(ok, spec.weight_decay - grad.beta[a:b] * inverse, paddle.zeros([1], "float32"))
        momentum = paddle.where(ok, paddle.full([], spec.momentum, "float32"), paddle.full([], 1.0, "float32"))
        step = paddle.where(ok, paddle.full([], lr, "float32"), paddle.full([], 0.0, "float32"))
        mom_all = self.opt_state["momentum"]
        w, mom = grad.rows[a:b], _read_rows(mom_all, idx, a, b)  # views of the saved rows (idx None: of the state)
        mom.multiply_(momentum)
        mom.add_(paddle.matmul(grad_t, grad.emb, transpose_x=True))
        mom.add_(w * coef.unsqueeze(1))
        w.subtract_(mom * step)
        if idx is not None:
            paddle.scatter_(self.weight, idx, w)
            paddle.scatter_(mom_all, idx, mom)

    def _update(self, ok: paddle.Tensor, idx: paddle.Tensor | None, a: int, b: int, w: paddle.Tensor,
                grad: paddle.Tensor, lr: float) -> None:
        """One block of the optimizer: rows idx (None: rows a:b of the matrices) with weights w and gradient grad."""
        spec = self.spec
        states = [_read_rows(s, idx, a, b) for s in self.opt_state.values()]
        if spec.optimizer == "sgd":
            (mom,) = states
            mom_new = spec.momentum * mom + grad + spec.weight_decay * w  # Paddle Momentum / torch SGD, L2 decay
            new = [w - lr * mom_new, mom_new]
        else:  # lazy AdamW, torch's formula (decoupled decay), step count on the device
            (b1, b2), t = spec.betas, (self.num_updates + 1).astype("float64")
            exp_avg = b1 * states[0] + (1 - b1) * grad
            exp_avg_sq = b2 * states[1] + (1 - b2) * grad * grad
            step_size = (lr / (1.0 - paddle.pow(paddle.full([], b1, "float64"), t))).astype("float32")
            debias = (1.0 - paddle.pow(paddle.full([], b2, "float64"), t)).astype("float32")
            denom = paddle.sqrt(exp_avg_sq / debias) + spec.eps
            new = [w * (1.0 - lr * spec.weight_decay) - step_size * exp_avg / denom, exp_avg, exp_avg_sq]
        for target, old, value in zip([self.weight, *self.opt_state.values()], [w, *states], new, strict=True):
            _write_rows(target, idx, a, b, paddle.where(ok, value, old))

    def pending_gradient(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted local rows, their summed gradient) on the host: for tests and checks, never called in training."""
        if not self._pending:
            return np.zeros(0, np.int64), np.zeros((0, self.spec.embedding_size), np.float32)
        if len(self._pending) == 1:
            (only,) = self._pending
            idx, grad = only.idx, only.gradient(0, only.rows.shape[0])
        else:
            idx, _, grad = self._combined()
        idx = np.arange(self.spec.num_local) if idx is None else idx.numpy()
        rows, first = np.unique(idx, return_index=True)
        return rows, grad.numpy()[first]

    # -------------------------------------------------------------------- state
    def arrays(self) -> dict[str, np.ndarray]:
        """Host copies of the weight and optimizer state."""
        return {"weight": self.weight.numpy(), **{k: v.numpy() for k, v in self.opt_state.items()}}

    def load_arrays(self, arrays: dict[str, np.ndarray], num_updates: int) -> None:
        for name, target in [("weight", self.weight), *self.opt_state.items()]:
            for a in range(0, self.spec.num_local, _INIT_ROWS):
                target[a:a + _INIT_ROWS] = paddle.to_tensor(np.ascontiguousarray(arrays[name][a:a + _INIT_ROWS]))
        self.num_updates = paddle.full([], num_updates, "int64")
        self._pending = []

    # ------------------------------------------------------------ fused kernels
    def _fused_loss(self, local_emb: paddle.Tensor, labels: paddle.Tensor, size: int,
                    keys: tuple[int, int]) -> paddle.Tensor:
        """Paddle's margin_cross_entropy (CUDA kernel, NCCL) on the portable path's sample. GPU only: not run here.

        Paddle's class_center_sample is not used: its draw is not seeded per step, so a resumed run would sample
        other classes; the portable sampler is exact on resume and equal to the numpy backend's."""
        spec, margin = self.spec, self.spec.margin
        emb = AllGather.apply(local_emb, self.comm, spec.rank) if spec.world_size > 1 else local_emb
        idx, rows, column, has_target, invalid = self._sample(labels, size, keys)
        rows = rows.detach()
        rows.stop_gradient = False
        with paddle.amp.auto_cast(self.fp16):
            cos = paddle.matmul(F.normalize(emb), F.normalize(rows), transpose_y=True)
        batch = emb.shape[0]
        offset = sum(sample_size(shard_range(spec.num_classes, spec.world_size, r)[1], spec.sample_rate, batch)
                     for r in range(spec.rank))  # columns of the ranks before this one (static)
        label = self.comm.all_reduce(paddle.where(has_target, column + offset, paddle.zeros_like(column)).squeeze(1))
        loss = F.margin_cross_entropy(cos.astype("float32"), label, margin.m1, margin.m2, margin.m3, margin.s,
                                      group=None if spec.world_size > 1 else False)
        self._pending.append(_Pass(idx, rows.detach(), leaf=rows))
        return paddle.where(invalid, paddle.full_like(loss, float("nan")), loss)

    def _check_fused(self, local_emb: paddle.Tensor, labels: paddle.Tensor, size: int,
                     keys: tuple[int, int]) -> None:
        """First step with kernel="fused": loss and embedding gradient of both paths on the same sample; the fused
        path is refused (one log line, portable from then on) if they differ by more than FUSED_TOLERANCE relative.
        A one-time host read, before training proper."""
        self._fused_checked = True
        threshold = self.spec.margin.interclass_filtering_threshold
        if threshold > 0:
            self.kernel = "portable"
            log.warning("pfc_kernel fused refused: margin_cross_entropy has no inter-class filtering "
                        "(interclass_filtering_threshold=%g); using the portable path", threshold)
            return
        results = []
        for use_fused in (False, True):
            emb = local_emb.detach()
            emb.stop_gradient = False
            try:
                loss = (self._fused_loss(emb, labels, size, keys) if use_fused
                        else _HeadFunction.apply(emb, self, labels, size, keys))
                (grad,) = paddle.grad([loss], [emb])
                results.append((loss.astype("float64"), grad.astype("float64")))
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # no kernel on this device
                self.kernel = "portable"
                log.warning("pfc_kernel fused refused: margin_cross_entropy failed (%s); using the portable path",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                break
        self._pending = []
        if self.kernel != "fused":
            return
        (loss_p, grad_p), (loss_f, grad_f) = results
        diff = paddle.stack([paddle.abs(loss_f - loss_p) / paddle.abs(loss_p).clip(min=1e-12),
                             paddle.abs(grad_f - grad_p).max() / paddle.abs(grad_p).max().clip(min=1e-12)])
        worst = float(self.comm.all_reduce(diff.max(), dist.ReduceOp.MAX))
        if worst > FUSED_TOLERANCE:
            self.kernel = "portable"
            log.warning("pfc_kernel fused refused: fused margin_cross_entropy differs from the portable path by "
                        "%.2e relative (> %g) on the first step; using the portable path", worst, FUSED_TOLERANCE)


def _row_norms(x: paddle.Tensor, keepdim: bool = False) -> paddle.Tensor:
    """max(|x_i|, eps) per row. einsum makes no [rows, D] temporary (square().sum() does: 200 MB for 100k x 512)
    and is faster than paddle.linalg.norm on CPU (bench/partial_fc.py --breakdown times it)."""
    norms = paddle.sqrt(paddle.einsum("ij,ij->i", x, x)).clip(min=NORM_EPS)
    return norms.unsqueeze(1) if keepdim else norms


def _put_column(matrix: paddle.Tensor, column: paddle.Tensor, has_target: paddle.Tensor,
                value: paddle.Tensor) -> None:
    """matrix[i, column[i]] = value[i] where has_target[i] (other rows keep their entry), in place."""
    keep = paddle.take_along_axis(matrix, column, 1)
    matrix.put_along_axis_(column, paddle.where(has_target, value, keep), 1)


def _read_rows(source: paddle.Tensor, idx: paddle.Tensor | None, a: int, b: int) -> paddle.Tensor:
    """source[idx] (idx None: rows a:b)."""
    return source[a:b] if idx is None else paddle.index_select(source, idx)


def _write_rows(target: paddle.Tensor, idx: paddle.Tensor | None, a: int, b: int, value: paddle.Tensor) -> None:
    """target[idx] = value in place (idx None: rows a:b)."""
    if idx is None:
        target[a:b] = value
    else:
        paddle.scatter_(target, idx, value)
