"""The paddle backend of Partial FC in one process: equal to the numpy backend, no host reads, exact resume, the
shared sampler, the fused-kernel first-step check (with a stand-in kernel: the real one needs a GPU)."""

from pathlib import Path

import numpy as np
import paddle
import pytest

from losses import CombinedMarginLoss
from partial_fc import PartialFC, init_centres
from pfc import sampling
from tests.host_reads import HostReadError, forbid_host_reads
from tests.pfc_backends import PASSES, STEPS, batches, cases, compare_backends

C, D, B = 40, 16, 12


@pytest.mark.parametrize("case", cases(), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_paddle_backend_equals_numpy_backend(case: dict) -> None:
    centres = np.empty((C, D), np.float32)
    init_centres(centres, 0, seed=11)
    data = batches(np.random.default_rng(0), STEPS * PASSES, B, D, C, near=centres)
    compare_backends(case, data, D, C)


@pytest.mark.parametrize("case", cases()[::5], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_single_pass_steps_in_blocks_equal_numpy_backend(monkeypatch: pytest.MonkeyPatch, case: dict) -> None:
    """One backward pass per step: the update runs in blocks of rows (here 3, to cross block boundaries)."""
    monkeypatch.setattr("pfc.paddle_head._STEP_ROWS", 3)
    data = batches(np.random.default_rng(1), STEPS, B, D, C)
    compare_backends(case, data, D, C, passes=1)


def test_the_two_samplers_draw_the_same_classes() -> None:
    keys = sampling.draw_keys(5, 1, 7)
    np.testing.assert_array_equal(sampling.scores_paddle(100_003, keys).numpy(), sampling.scores_numpy(100_003, keys))
    assert np.unique(sampling.scores_numpy(100_003, keys)).size == 100_003  # a bijection: no ties
    rng = np.random.default_rng(3)
    for num_local, size in [(50, 30), (50, 49), (1000, 100)]:  # size >= 30 labels: room for every positive
        local = rng.integers(-20, num_local + 20, 30)  # out-of-shard labels too
        ours = sampling.choose_paddle(paddle.to_tensor(local), num_local, size, keys).numpy()
        positives = np.unique(local[(local >= 0) & (local < num_local)])
        np.testing.assert_array_equal(ours, sampling.choose_numpy(positives, num_local, size, keys))
        assert set(positives) <= set(ours) and ours.size == size
    assert sampling.choose_numpy(np.arange(3), 10, 10, keys) is None
    assert sampling.sample_size(1000, 0.1, 64) == 100 and sampling.sample_size(1000, 0.1, 256) == 256
    assert sampling.sample_size(100, 0.1, 256) == 100 and sampling.sample_size(100, 1.0, 8) == 100


def _step(pfc: PartialFC, emb: np.ndarray, labels: np.ndarray, lr: float = 0.1) -> paddle.Tensor:
    x = paddle.to_tensor(emb, stop_gradient=False)
    loss = pfc(x, paddle.to_tensor(labels))
    loss.backward()
    pfc.step(lr)
    return loss


def test_no_host_reads_in_forward_backward_and_step() -> None:
    """Three sampled SGD steps with every Tensor value read (numpy, item, tolist, float, int, bool, index) raising.
    The first step runs before: it checks the labels of all ranks on the host, once per batch shape."""
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.2, grad="exact")
    pfc = PartialFC(margin, D, C, sample_rate=0.3, backend="paddle")
    data = batches(np.random.default_rng(1), 4, B, D, C)
    _step(pfc, *data[0])
    weight = pfc.weight.numpy()
    with forbid_host_reads():
        losses = [_step(pfc, *batch) for batch in data[1:]]
    assert all(np.isfinite(float(loss)) for loss in losses) and not np.array_equal(pfc.weight.numpy(), weight)
    numpy_head = PartialFC(margin, D, C, sample_rate=0.3, backend="numpy")
    with forbid_host_reads(), pytest.raises(HostReadError):  # the guard does catch a backend that reads
        _step(numpy_head, *data[0])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_is_exact(tmp_path: Path, optimizer: str) -> None:
    """10 steps straight == 5 steps, save, a fresh head loads, 5 more (same losses, bitwise the same state)."""
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    data = batches(np.random.default_rng(2), 10, B, D, C)

    def head() -> PartialFC:
        return PartialFC(margin, D, C, sample_rate=0.3, optimizer=optimizer, backend="paddle", seed=4)

    straight = head()
    losses = [float(_step(straight, *batch, lr=0.01)) for batch in data]
    first = head()
    resumed = [float(_step(first, *batch, lr=0.01)) for batch in data[:5]]
    first.save(tmp_path)
    second = head()
    second.load(tmp_path)
    resumed += [float(_step(second, *batch, lr=0.01)) for batch in data[5:]]
    assert resumed == losses
    for key, value in straight.state_dict().items():
        np.testing.assert_array_equal(second.state_dict()[key], value, err_msg=key)


def test_bad_labels_first_batch_raises_later_batch_gives_nan() -> None:
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, sample_rate=0.3, backend="paddle")
    emb, labels = batches(np.random.default_rng(4), 1, B, D, C)[0]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 40\)"):
        pfc(paddle.to_tensor(emb), paddle.to_tensor(np.where(labels == labels[0], C, labels)))
    assert np.isfinite(float(pfc(paddle.to_tensor(emb), paddle.to_tensor(labels))))
    assert np.isnan(float(pfc(paddle.to_tensor(emb), paddle.to_tensor(np.where(labels == labels[0], C, labels)))))
    with pytest.raises(ValueError, match="batch size changed from 12 to 6"):
        pfc(paddle.to_tensor(emb[:6]), paddle.to_tensor(labels[:6]))
    with pytest.raises(ValueError, match="kernel='fused' needs backend='paddle'"):
        PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, backend="numpy", kernel="fused")


def test_config_keys_choose_the_backend_and_kernel() -> None:
    from config import ConfigError, load_config
    from partial_fc import resolve_backend

    assert resolve_backend("auto") == "numpy"  # this CPU machine; paddle on a GPU
    cfg = load_config(overrides={"pfc_backend": "paddle", "pfc_kernel": "fused"})
    assert (cfg.pfc_backend, cfg.pfc_kernel) == ("paddle", "fused")
    with pytest.raises(ConfigError, match="--pfc_kernel: fused runs on the paddle backend"):
        load_config(overrides={"pfc_backend": "numpy", "pfc_kernel": "fused"})
    with pytest.raises(ConfigError, match="pfc_backend"):
        load_config(overrides={"pfc_backend": "cuda"})


@pytest.mark.slow
def test_train_py_runs_the_paddle_backend_and_prints_its_memory_plan(tmp_path: Path) -> None:
    import train

    args = ["--cache_dir", str(tmp_path / "cache"), "--synthetic_identities", "20", "--synthetic_images_per_id", "2",
            "--synthetic_val_pairs", "20", "--width", "0.25", "--embedding_size", "64", "--batch_size", "8",
            "--threads", "1", "--num_workers", "0", "--num_epoch", "1", "--val_targets", "", "--output",
            str(tmp_path / "out"), "--run_name", "p", "--pfc_backend", "paddle", "--sample_rate", "0.5"]
    assert train.main(args) == 0
    log = (tmp_path / "out" / "p" / "train.log").read_text()
    assert "paddle head: 512 bytes/class of weights + momentum" in log
    assert "for 10 sampled classes x 8 embeddings" in log
    assert (tmp_path / "out" / "p" / "checkpoints" / "step_0000005" / "softmax_weight.r0.npy").is_file()


def _stand_in_margin_cross_entropy(logits, label, margin1, margin2, margin3, scale, group=None, **_):
    """A one-process margin_cross_entropy in Paddle autograd ops (the real kernel is CUDA only): exact gradient."""
    rows = paddle.arange(label.shape[0])
    cos_t = paddle.clip(logits[rows, label], -1.0, 1.0)
    target = paddle.cos(margin1 * paddle.acos(cos_t.clip(-1 + 1e-7, 1 - 1e-7)) + margin2) - margin3
    onehot = paddle.nn.functional.one_hot(label, logits.shape[1])
    adjusted = scale * (logits * (1 - onehot) + onehot * target.unsqueeze(1))
    return (paddle.logsumexp(adjusted, axis=1) - scale * target).mean()


@pytest.mark.parametrize("grad, threshold, accepted", [("exact", 0.0, True), ("straight_through", 0.0, False),
                                                       ("exact", 0.3, False)])
def test_fused_kernel_is_checked_on_the_first_step(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                   grad: str, threshold: float, accepted: bool) -> None:
    """margin_cross_entropy differentiates the margin exactly and filters nothing: with grad=exact it agrees with the
    portable path and is used; with arcface_torch's straight-through gradient the first-step check finds the
    difference, and with inter-class filtering it is refused outright: one line, then the portable path."""
    monkeypatch.setattr(paddle.nn.functional, "margin_cross_entropy", _stand_in_margin_cross_entropy)
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=threshold, grad=grad)
    data = batches(np.random.default_rng(5), 3, B, D, C)
    fused = PartialFC(margin, D, C, sample_rate=0.3, backend="paddle", kernel="fused")
    portable = PartialFC(margin, D, C, sample_rate=0.3, backend="paddle")
    with caplog.at_level("WARNING"):
        losses = [(float(_step(fused, *batch)), float(_step(portable, *batch))) for batch in data]
    assert fused.kernel == ("fused" if accepted else "portable")
    assert caplog.text.count("fused refused") == (not accepted)
    np.testing.assert_allclose(*zip(*losses, strict=True), rtol=1e-5)
    ref = portable.weight.numpy()
    np.testing.assert_allclose(fused.weight.numpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
