"""Partial FC in one process: exact against a float64 full softmax; sampling, sparse updates, shard I/O, bad input."""

import json
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch

from losses import CombinedMarginLoss
from partial_fc import PartialFC, init_centres, shard_range
from tests.pfc_reference import full_softmax, numpy_loss

C, D, B = 40, 16, 12
MARGINS = {"arcface": (64.0, 1.0, 0.5, 0.0), "cosface": (64.0, 1.0, 0.0, 0.4)}


def _batch(seed: int = 0, num_classes: int = C) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, D)).astype(np.float32), rng.choice(num_classes, B).astype(np.int64)


def _run(pfc: PartialFC, emb: np.ndarray, labels: np.ndarray, scale: float = 1.0) -> tuple[float, np.ndarray]:
    x = paddle.to_tensor(emb, stop_gradient=False)
    loss = pfc(x, paddle.to_tensor(labels))
    (loss * scale).backward()
    return float(loss), x.grad.numpy()


def _close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-5) -> None:
    """Agreement of float32 results with a float64 reference: within tol of the reference's scale."""
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("grad", ["straight_through", "exact"])
def test_full_sampling_equals_float64_full_softmax(name: str, grad: str) -> None:
    s, m1, m2, m3 = MARGINS[name]
    pfc = PartialFC(CombinedMarginLoss(s, m1, m2, m3, grad=grad), D, C)
    emb, labels = _batch()
    weight = pfc.weight.copy()
    loss, grad_emb = _run(pfc, emb, labels)
    ref_loss, ref_emb, ref_weight = full_softmax(emb, weight, labels, s, m1, m2, m3, grad)
    assert loss == pytest.approx(numpy_loss(emb, weight, labels, s, m1, m2, m3), rel=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _close(grad_emb, ref_emb)
    idx, grad_weight = pfc.pending_gradient()
    np.testing.assert_array_equal(idx, np.arange(C))
    _close(grad_weight, ref_weight)


def test_interclass_filtering_matches_reference() -> None:
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.2)
    pfc = PartialFC(margin, D, C)
    emb, labels = _batch(1)
    emb[1] = pfc.weight[labels[0]] * 50 + emb[1] * 0.01  # sample 1 is close to another class: filtered negative
    weight = pfc.weight.copy()
    loss, grad_emb = _run(pfc, emb, labels)
    ref_loss, ref_emb, ref_weight = full_softmax(emb, weight, labels, 64.0, 1.0, 0.5, 0.0, threshold=0.2)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _close(grad_emb, ref_emb)
    _close(pfc.pending_gradient()[1], ref_weight)


def test_sampling_keeps_positives_and_equals_softmax_over_the_sample() -> None:
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, sample_rate=0.5)
    emb, labels = _batch(2)
    weight, mom = pfc.weight.copy(), pfc.opt_state["momentum"].copy()
    loss, grad_emb = _run(pfc, emb, labels)
    idx, grad_weight = pfc.pending_gradient()
    assert idx.size == int(0.5 * C) and set(labels) <= set(idx) and np.all(np.diff(idx) > 0)
    ref_loss, ref_emb, ref_weight = full_softmax(emb, weight[idx], np.searchsorted(idx, labels), 64.0, 1.0, 0.5, 0.0)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _close(grad_emb, ref_emb)
    _close(grad_weight, ref_weight)

    pfc.opt_state["momentum"][:] = mom = np.random.default_rng(3).standard_normal(mom.shape).astype(np.float32)
    pfc.step(lr=0.1)
    unsampled = np.setdiff1d(np.arange(C), idx)
    np.testing.assert_array_equal(pfc.weight[unsampled], weight[unsampled])  # bitwise
    np.testing.assert_array_equal(pfc.opt_state["momentum"][unsampled], mom[unsampled])
    new_mom = 0.9 * mom[idx] + grad_weight + 5e-4 * weight[idx]  # paddle Momentum / torch SGD with L2 decay
    _close(pfc.opt_state["momentum"][idx], new_mom)
    _close(pfc.weight[idx], weight[idx] - 0.1 * new_mom)


def test_positives_beyond_the_sample_size_are_all_kept() -> None:
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, sample_rate=0.1)
    emb, _ = _batch()
    labels = np.arange(B, dtype=np.int64) * 3
    _run(pfc, emb, labels)
    np.testing.assert_array_equal(pfc.pending_gradient()[0], np.sort(labels))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_two_steps_equal_torch_optimizer(optimizer: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # torch.optim's first use sets it otherwise
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    pfc = PartialFC(margin, D, C, optimizer=optimizer, weight_decay=0.1 if optimizer == "adamw" else 5e-4)
    w = torch.tensor(pfc.weight.astype(np.float64), requires_grad=True)
    opt = (torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
           else torch.optim.AdamW([w], lr=1e-3, weight_decay=0.1))
    for step, lr in enumerate([0.1, 0.05] if optimizer == "sgd" else [1e-3, 1e-3]):
        emb, labels = _batch(step)
        _run(pfc, emb, labels)
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        w.grad = torch.tensor(full_softmax(emb, w.detach().numpy(), labels, 64.0, 1.0, 0.5, 0.0)[2])
        opt.step()
        assert pfc.step(lr)
        _close(pfc.weight, w.detach().numpy(), tol=1e-4)


def test_gradient_accumulation_sums_the_passes() -> None:
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    batches = [_batch(10), _batch(11)]
    singles = []
    for k, (emb, labels) in enumerate(batches):
        one = PartialFC(margin, D, C, sample_rate=0.5, seed=5)
        one.num_draws = k  # draw k + 1: the negative sample the accumulating head draws for this batch
        _run(one, emb, labels, scale=0.5)
        singles.append(one.pending_gradient())
    acc = PartialFC(margin, D, C, sample_rate=0.5, seed=5)
    for emb, labels in batches:
        _run(acc, emb, labels, scale=0.5)
    idx, grad = acc.pending_gradient()
    expected = np.zeros((C, D))
    for rows, g in singles:
        expected[rows] += g
    np.testing.assert_array_equal(idx, np.union1d(singles[0][0], singles[1][0]))
    _close(grad, expected[idx])


def test_loss_scale_and_non_finite_gradients() -> None:
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    emb, labels = _batch()
    plain, scaled = PartialFC(margin, D, C), PartialFC(margin, D, C)
    _run(plain, emb, labels)
    _run(scaled, emb, labels, scale=1024.0)
    plain.step(0.1)
    assert scaled.step(0.1, loss_scale=1024.0)
    _close(scaled.weight, plain.weight)
    before = scaled.weight.copy()
    _run(scaled, emb, labels, scale=float("inf"))
    assert not scaled.step(0.1)
    np.testing.assert_array_equal(scaled.weight, before)


def test_initial_centres_do_not_depend_on_the_world_size() -> None:
    full = np.empty((10_000, 8), np.float32)
    init_centres(full, 0, seed=7)
    assert abs(full.std() - 0.01) < 1e-4
    for world in (2, 3, 7):
        parts = []
        for rank in range(world):
            start, count = shard_range(10_000, world, rank)
            parts.append(np.empty((count, 8), np.float32))
            init_centres(parts[-1], start, seed=7)
        np.testing.assert_array_equal(np.concatenate(parts), full)
    assert shard_range(10, 3, 0) == (0, 4) and shard_range(10, 3, 1) == (4, 3) and shard_range(10, 3, 2) == (7, 3)


def test_save_load_round_trip(tmp_path: Path) -> None:
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    pfc = PartialFC(margin, D, C, sample_rate=0.5)
    _run(pfc, *_batch())
    pfc.step(0.1)
    pfc.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "softmax_mom.r0.npy",
                                                         "softmax_weight.r0.npy"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"] == [{"class_start": 0, "num_local": C}] and manifest["embedding_size"] == D
    other = PartialFC(margin, D, C, sample_rate=0.5)  # fresh init; the loaded state must replace it
    other.load(tmp_path)
    np.testing.assert_array_equal(other.weight, pfc.weight)
    np.testing.assert_array_equal(other.opt_state["momentum"], pfc.opt_state["momentum"])
    assert other.num_draws == pfc.num_draws
    emb, labels = _batch(4)  # identical state, identical next step (same negative sample)
    assert _run(other, emb, labels)[0] == _run(pfc, emb, labels)[0]


def test_load_rejects_mismatches_and_pickles(tmp_path: Path) -> None:
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    PartialFC(margin, D, C).save(tmp_path)
    with pytest.raises(ValueError, match="num_classes=40"):
        PartialFC(margin, D, C + 1).load(tmp_path)
    with pytest.raises(ValueError, match="embedding_size=16"):
        PartialFC(margin, D * 2, C).load(tmp_path)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        PartialFC(margin, D, C, optimizer="adamw").load(tmp_path)
    np.save(tmp_path / "softmax_mom.r0.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"softmax_mom\.r0\.npy"):
        PartialFC(margin, D, C).load(tmp_path)
    np.save(tmp_path / "softmax_mom.r0.npy", np.zeros((C - 1, D), np.float32))
    with pytest.raises(ValueError, match=r"softmax_mom.r0.npy holds float32\[39, 16\]"):
        PartialFC(margin, D, C).load(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest\.json"):
        PartialFC(margin, D, C).load(tmp_path)
    with pytest.raises(ValueError, match=r"manifest\.json"):
        PartialFC(margin, D, C).load(tmp_path / "missing")


def test_bad_inputs_raise_clear_errors() -> None:
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    pfc = PartialFC(margin, D, C)
    emb, labels = _batch()
    x = paddle.to_tensor(emb)
    for bad, message in [(np.where(labels == labels[0], C, labels), r"labels must be in \[0, 40\), got values in"),
                         (np.where(labels == labels[0], -1, labels), r"got values in \[-1,"),
                         (labels.astype(np.float32), "labels must be integers"),
                         (labels[:-1], "11 labels for 12 embeddings")]:
        with pytest.raises(ValueError, match=message):
            pfc(x, paddle.to_tensor(bad))
    with pytest.raises(ValueError, match="embedding size 8 != PartialFC embedding_size 16"):
        pfc(paddle.to_tensor(emb[:, :8]), paddle.to_tensor(labels))
    pfc(x, paddle.to_tensor(labels))
    with pytest.raises(ValueError, match="batch size changed from 12 to 6 between steps"):
        pfc(x[:6], paddle.to_tensor(labels[:6]))
    for kwargs, message in [(dict(sample_rate=0.0), "sample_rate=0.0"), (dict(optimizer="lamb"), "optimizer='lamb'"),
                            (dict(num_classes=0), "num_classes=0"), (dict(embedding_size=-1), "embedding_size=-1"),
                            (dict(backend="cuda"), "backend='cuda'"), (dict(kernel="triton"), "kernel='triton'")]:
        with pytest.raises(ValueError, match=message):
            PartialFC(margin, **{"embedding_size": D, "num_classes": C, **kwargs})
    with pytest.raises(ValueError, match="lr=nan"):
        pfc.step(float("nan"))


def test_row_blocks_on_several_threads_give_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head splits classes into blocks run on a thread pool; tiny blocks must change nothing but rounding."""
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.3, grad="exact")
    emb, labels = _batch(6)
    results = []
    for block, threads in [(4096, 1), (7, 3)]:
        monkeypatch.setattr("pfc.numpy_head._BLOCK", block)
        pfc = PartialFC(margin, D, C, sample_rate=0.6, seed=2)
        pfc.head.threads = threads
        loss, grad_emb = _run(pfc, emb, labels)
        idx, grad_w = pfc.pending_gradient()
        pfc.step(0.1)
        results.append((loss, grad_emb, idx, grad_w, pfc.weight.copy(), pfc.opt_state["momentum"].copy()))
    (loss_a, *arrays_a), (loss_b, *arrays_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(arrays_a, arrays_b, strict=True):
        _close(b, a, tol=1e-6)


def test_load_reshards_from_any_world_size(tmp_path: Path) -> None:
    """Shards written as a 3-rank run would (documented file names + manifest) load into one process."""
    rng = np.random.default_rng(8)
    full = {"weight": rng.standard_normal((C, D)).astype(np.float32),
            "mom": rng.standard_normal((C, D)).astype(np.float32)}
    shards = [dict(zip(("class_start", "num_local"), shard_range(C, 3, r), strict=True)) for r in range(3)]
    for r, shard in enumerate(shards):
        rows = slice(shard["class_start"], shard["class_start"] + shard["num_local"])
        for name, array in full.items():
            np.save(tmp_path / f"softmax_{name}.r{r}.npy", array[rows])
    manifest = {"format": "partial_fc/1", "world_size": 3, "num_classes": C, "embedding_size": D, "dtype": "float32",
                "optimizer": "sgd", "arrays": {"weight": "softmax_weight", "momentum": "softmax_mom"},
                "num_updates": 5, "num_draws": 7, "shards": shards}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C)
    pfc.load(tmp_path)
    np.testing.assert_array_equal(pfc.weight, full["weight"])
    np.testing.assert_array_equal(pfc.opt_state["momentum"], full["mom"])
    assert (pfc.num_updates, pfc.num_draws) == (5, 7)
    manifest["shards"][1]["num_local"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not the contiguous split"):
        pfc.load(tmp_path)
