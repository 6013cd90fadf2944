"""Worker for tests/test_partial_fc_dist.py, run on 2 CPU ranks by tests/launch.py (paddle.distributed.launch, gloo).

`check IN_DIR OUT_DIR`: W=2 equals the single-process float64 full softmax (loss, embedding, backbone-after-
DataParallel and shard gradients) on both backends, sample_rate=0.5 sparsity, collective input errors, the paddle
backend equal to the numpy backend in every case of tests/pfc_backends.py, three paddle-backend steps without a host
read, the AMP skip decision agreed by both ranks, load of a W=1 save into the paddle backend and a W=2 save.
`die`: rank 1 exits mid-training; rank 0 must not hang.
"""

import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

from losses import CombinedMarginLoss
from partial_fc import PartialFC, init_centres
from pfc.amp import DynamicLossScale
from pfc.sampling import sample_size
from tests.host_reads import forbid_host_reads
from tests.pfc_backends import PASSES, STEPS, batches, cases, compare_backends
from tests.pfc_reference import full_softmax

C, D, D_IN, B = 37, 8, 6, 5
CASES = [(64.0, 1.0, 0.5, 0.0, "straight_through"), (64.0, 1.0, 0.5, 0.0, "exact"), (64.0, 1.0, 0.0, 0.4, "exact")]


def close(name: str, ours: np.ndarray, ref: np.ndarray, tol: float = 1e-5) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = float(np.abs(ours - ref).max()) if ref.size else 0.0
    assert err <= tol * max(float(np.abs(ref).max()), 1e-12), f"{name}: max error {err} vs scale {np.abs(ref).max()}"


def expect_error(fn, message: str) -> None:
    try:
        fn()
    except ValueError as exc:
        assert message in str(exc), f"wrong error: {exc}"
        return
    raise AssertionError(f"no ValueError containing {message!r}")


class Setup:
    """The same global batch and backbone on every rank; each rank feeds its slice through DataParallel."""

    def __init__(self, rank: int, world: int) -> None:
        rng = np.random.default_rng(0)
        self.rank, self.world = rank, world
        self.x = rng.standard_normal((world * B, D_IN)).astype(np.float32)
        self.y = rng.choice(C, world * B).astype(np.int64)
        self.w_net = rng.standard_normal((D_IN, D)).astype(np.float32)
        self.b_net = rng.standard_normal(D).astype(np.float32)
        self.net = paddle.nn.Linear(D_IN, D)
        self.net.weight.set_value(self.w_net)
        self.net.bias.set_value(self.b_net)
        self.model = paddle.DataParallel(self.net)
        self.local = slice(rank * B, (rank + 1) * B)
        self.full_w, self.full_w_11 = np.empty((C, D), np.float32), np.empty((C, D), np.float32)
        init_centres(self.full_w, 0, seed=0)
        init_centres(self.full_w_11, 0, seed=11)  # the centres of tests/pfc_backends.py's heads

    def run(self, pfc: PartialFC) -> tuple[float, np.ndarray]:
        grads = []
        emb = self.model(paddle.to_tensor(self.x[self.local]))
        emb.register_hook(lambda g: grads.append(g.numpy()))
        loss = pfc(emb, paddle.to_tensor(self.y[self.local]))
        loss.backward()
        return float(loss), grads[0]

    def reference(self, weight: np.ndarray, labels: np.ndarray, margin: tuple) -> tuple:
        emb = self.x.astype(np.float64) @ self.w_net + self.b_net
        return full_softmax(emb, weight, labels, *margin)


def check_exactness(setup: Setup, backend: str) -> None:
    for case in CASES:
        pfc = PartialFC(CombinedMarginLoss(*case[:4], grad=case[4]), D, C, backend=backend)
        loss, grad_emb = setup.run(pfc)
        ref_loss, ref_emb, ref_w = setup.reference(setup.full_w, setup.y, case)
        close(f"loss {case}", loss, ref_loss)
        close(f"embedding gradient {case}", grad_emb, setup.world * ref_emb[setup.local])  # W x: DataParallel averages
        close(f"backbone weight gradient {case}", setup.net.weight.grad.numpy(), setup.x.T @ ref_emb)
        close(f"backbone bias gradient {case}", setup.net.bias.grad.numpy(), ref_emb.sum(0))
        idx, grad_w = pfc.pending_gradient()
        assert idx.size == pfc.num_local
        close(f"shard gradient {case}", grad_w, ref_w[pfc.class_start:pfc.class_start + pfc.num_local])
        setup.net.clear_gradients()


def check_sampling(setup: Setup) -> None:
    margin = (64.0, 1.0, 0.5, 0.0, "straight_through")
    pfc = PartialFC(CombinedMarginLoss(*margin[:4]), D, C, sample_rate=0.5)
    pfc.opt_state["momentum"][:] = np.random.default_rng(setup.rank).standard_normal((pfc.num_local, D))
    weight, mom = pfc.weight.copy(), pfc.opt_state["momentum"].copy()
    loss, grad_emb = setup.run(pfc)
    idx, grad_w = pfc.pending_gradient()
    local = setup.y - pfc.class_start
    positives = np.unique(local[(local >= 0) & (local < pfc.num_local)])
    assert set(positives) <= set(idx), f"positives {positives} not all in the sample {idx}"
    assert idx.size == sample_size(pfc.num_local, 0.5, setup.world * B), (idx.size, pfc.num_local)
    gathered: list = []
    dist.all_gather_object(gathered, (idx + pfc.class_start).tolist())
    sampled = np.concatenate(gathered)
    ref_loss, ref_emb, ref_w = setup.reference(setup.full_w[sampled], np.searchsorted(sampled, setup.y), margin)
    close("sampled loss", loss, ref_loss)
    close("sampled embedding gradient", grad_emb, setup.world * ref_emb[setup.local])
    offset = sum(len(g) for g in gathered[:setup.rank])
    close("sampled shard gradient", grad_w, ref_w[offset:offset + idx.size])
    pfc.step(0.1)
    unsampled = np.setdiff1d(np.arange(pfc.num_local), idx)
    assert np.array_equal(pfc.weight[unsampled], weight[unsampled]), "unsampled rows changed"
    assert np.array_equal(pfc.opt_state["momentum"][unsampled], mom[unsampled]), "unsampled momentum changed"
    assert not np.array_equal(pfc.weight[idx], weight[idx])
    setup.net.clear_gradients()


def check_bad_inputs(setup: Setup, backend: str) -> None:
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, backend=backend)
    x, y = paddle.to_tensor(setup.x[setup.local] @ setup.w_net), setup.y[setup.local].copy()
    if setup.rank == 1:
        y[0] = C
    expect_error(lambda: pfc(x, paddle.to_tensor(y)), f"rank 1: labels must be in [0, {C})")
    wide = paddle.concat([x, x[:, :1]], axis=1) if setup.rank == 0 else x
    expect_error(lambda: pfc(wide, paddle.to_tensor(setup.y[setup.local])), f"rank 0: embedding size {D + 1}")
    short = slice(0, B - setup.rank)
    expect_error(lambda: pfc(x[short], paddle.to_tensor(setup.y[setup.local][short])), "batch sizes differ")
    assert np.isfinite(float(pfc(x, paddle.to_tensor(setup.y[setup.local])))), "ranks out of step after errors"


def check_backends(setup: Setup) -> None:
    """The paddle backend equals the numpy backend on 2 ranks, case by case (one launch for all cases)."""
    data = batches(np.random.default_rng(7), STEPS * PASSES, setup.world * B, D, C, near=setup.full_w_11)
    for case in cases():
        compare_backends(case, data, D, C, setup.local, what=f"rank {setup.rank}")
    for case in cases()[::5]:  # one pass per step: the paddle backend's block-wise update path
        compare_backends(case, data, D, C, setup.local, passes=1, what=f"rank {setup.rank} one pass")


def check_no_host_reads(setup: Setup) -> None:
    """Three sampled SGD steps of the paddle backend on 2 ranks with every Tensor host read raising (after a first
    step: its one-time input check reads the labels)."""
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.2, grad="exact")
    pfc = PartialFC(margin, D, C, sample_rate=0.3, backend="paddle")
    data = batches(np.random.default_rng(8), 4, setup.world * B, D, C)
    for k, (emb, labels) in enumerate(data):
        with forbid_host_reads() if k else nullcontext():
            x = paddle.to_tensor(emb[setup.local], stop_gradient=False)
            pfc(x, paddle.to_tensor(labels[setup.local])).backward()
            pfc.step(0.1)
    assert pfc.num_updates == 4


def check_amp_agreement(setup: Setup) -> None:
    """DynamicLossScale: a non-finite head gradient on rank 1 only makes both ranks skip (the shards differ, the
    decision must not); a finite step is applied on both."""
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, sample_rate=0.5, backend="paddle")
    opt = paddle.optimizer.Momentum(0.1, momentum=0.9, parameters=setup.net.parameters())
    scaler = DynamicLossScale(init_scale=4.0)
    for poisoned in (True, False):
        emb = setup.model(paddle.to_tensor(setup.x[setup.local]))
        scaler.scale_loss(pfc(emb, paddle.to_tensor(setup.y[setup.local]))).backward()
        if poisoned and setup.rank == 1:
            pfc.grads_finite = lambda: paddle.to_tensor(False)
        applied = scaler.step(opt, setup.net.parameters(), pfc, 0.1)
        opt.clear_grad()
        assert applied is not poisoned, f"rank {setup.rank}: applied={applied} with rank 1 poisoned={poisoned}"
        vars(pfc).pop("grads_finite", None)
    assert scaler.scale == 2.0 and pfc.num_updates == 1


def check_reshard(setup: Setup, in_dir: Path, out_dir: Path) -> None:
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, sample_rate=0.5, backend="paddle")
    pfc.load(in_dir)  # saved by a single process, numpy backend
    rows = slice(pfc.class_start, pfc.class_start + pfc.num_local)
    assert np.array_equal(pfc.weight.numpy(), np.load(in_dir / "softmax_weight.r0.npy")[rows])
    assert np.array_equal(pfc.opt_state["momentum"].numpy(), np.load(in_dir / "softmax_mom.r0.npy")[rows])
    setup.run(pfc)
    pfc.step(0.1)
    pfc.save(out_dir)  # the test loads it with W=1


def die(setup: Setup) -> None:
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C)
    for step in range(10_000):
        if step == 3 and setup.rank == 1:
            os._exit(3)
        setup.run(pfc)
        pfc.step(0.01)
        setup.net.clear_gradients()


def main() -> None:
    dist.init_parallel_env()
    setup = Setup(dist.get_rank(), dist.get_world_size())
    if sys.argv[1] == "die":
        die(setup)
        return
    for backend in ("numpy", "paddle"):
        check_exactness(setup, backend)
        check_bad_inputs(setup, backend)
    check_sampling(setup)
    check_backends(setup)
    check_no_host_reads(setup)
    check_amp_agreement(setup)
    check_reshard(setup, Path(sys.argv[2]), Path(sys.argv[3]))
    print(f"rank {setup.rank}: PFC WORKER OK", flush=True)


if __name__ == "__main__":
    main()
