"""ViT backbones (and r2060): converted arcface_torch weights give torch's embeddings, masking and drop path act
only in training and as arcface_torch's do, recompute leaves gradients unchanged, AdamW decays like torch's,
export keeps the embeddings, and a ViT trains on the synthetic set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import paddle
import pytest

torch = pytest.importorskip("torch")

import train
from backbones import get_model
from backbones.__main__ import main as summary_main
from backbones.vit import Linear
from config import load_config
from deploy.embedder import DygraphEmbedder, OnnxEmbedder, PaddleInferenceEmbedder, load_backbone
from engine.step import build_optimizer
from paddle_pretrainedmodel.convert_torch import convert_state_dict
from tests.export_models import calibrated_weights, synthetic_faces
from tests.launch import launch
from tests.torch_reference import IResNet
from tests.torch_reference import randomize as randomize_iresnet
from tests.torch_vit_reference import R2060_BLOCKS, get_torch_vit, randomize
from tools import export as export_tool
from utils.lr_scheduler import PolynomialLRWarmup

TOLERANCE = 1e-4  # max |paddle - torch| / max |torch| of the embeddings
DEEP = pytest.mark.skipif(not os.environ.get("PARITY_DEEP"), reason="set PARITY_DEEP=1 (minutes, up to 10 GB)")


def relative_diff(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def converted(reference: torch.nn.Module, name: str, **kwargs) -> paddle.nn.Layer:
    """The Paddle `name` holding the torch model's weights, through the converter."""
    model = get_model(name, **kwargs)
    model.set_state_dict(convert_state_dict(reference.state_dict(), name, **kwargs))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "vit_t", "vit_s",
    # the same code path on the big ones, run on demand (figures in docs/backbones.md)
    *(pytest.param(n, marks=DEEP) for n in ("vit_b", "vit_l_dp005_mask_005", "vit_h", "r2060")),
])
def test_converted_weights_give_torch_embeddings(name: str) -> None:
    reference = randomize_iresnet(IResNet(R2060_BLOCKS), seed=3) if name == "r2060" else \
        randomize(get_torch_vit(name), seed=3)
    x = np.random.default_rng(1).normal(size=(2, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    model = converted(reference, name)
    del reference  # r2060 and vit_h: one copy of the weights fewer
    model.eval()
    with paddle.no_grad():
        got = model(paddle.to_tensor(x)).numpy()
    diff = relative_diff(got, expected)
    print(f"{name}: max |paddle - torch| / max |torch| = {diff:.2e}")
    assert np.abs(expected).mean() > 0.3  # embeddings of a realistic scale: the tolerance means something
    assert diff <= TOLERANCE


def test_training_forward_masks_tokens_like_arcface_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training mode on the same masking noise (drop path off): same embeddings and BatchNorm statistics.

    Checks the masking itself: which 129 of 144 tokens are kept, that the final norm sees only those, and that
    the mask token fills the rest before the head.
    """
    reference = randomize(get_torch_vit("vit_t", num_features=64, width_dim=64), seed=5)
    model = converted(reference, "vit_t", num_features=64, width=0.25)
    for torch_block, block in zip(reference.blocks, model.blocks, strict=True):
        torch_block.drop_path, block.drop_path_rate = 0.0, 0.0
    noise = np.random.default_rng(2).random((4, 144)).astype(np.float32)
    monkeypatch.setattr(model, "mask_noise", lambda batch: paddle.to_tensor(noise[:batch]))
    x = np.random.default_rng(3).normal(size=(4, 3, 112, 112)).astype(np.float32)
    reference.train()
    model.train()
    expected = reference(torch.from_numpy(x), torch.from_numpy(noise)).detach().numpy()
    got = model(paddle.to_tensor(x)).numpy()
    assert relative_diff(got, expected) <= TOLERANCE
    for index in (1, 3):
        np.testing.assert_allclose(model.feature[index]._mean.numpy(), reference.feature[index].running_mean.numpy(),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(model.feature[index]._variance.numpy(),
                                   reference.feature[index].running_var.numpy(), rtol=1e-4)
    other = reference(torch.from_numpy(x), torch.from_numpy(noise[::-1].copy())).detach().numpy()
    assert relative_diff(other, expected) > 100 * TOLERANCE  # the noise (the kept tokens) matters


@pytest.mark.parametrize(("name", "masks"), [("vit_t", True), ("vit_b_dp005_mask_005", True),
                                             ("vit_t_dp005_mask0", False), ("vit_h", False)])
def test_masking_and_drop_path_act_only_in_training(name: str, masks: bool) -> None:
    paddle.seed(0)
    model = get_model(name, width=0.125 if name != "vit_h" else 0.03125, num_features=16)
    assert model.mask_fraction == (0.1 if masks else 0.0)  # arcface_torch masks 10% whatever the name says
    assert model.blocks[0].drop_path_rate == 0.0 and model.blocks[-1].drop_path_rate in (0.05, 0.1)
    x = paddle.randn([2, 3, 112, 112])
    model.eval()
    with paddle.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())
    model.train()
    assert not np.array_equal(model(x).numpy(), model(x).numpy())  # drop path (and masking) draw anew
    for block in model.blocks:
        block.drop_path_rate = 0.0
    same = np.array_equal(model(x).numpy(), model(x).numpy())
    assert same != masks  # without drop path only the masking is random


@pytest.mark.parametrize(("freeze_input", "freeze_weight", "bias"), [
    (False, False, True), (True, False, True), (False, True, True), (False, False, False)])
def test_token_linear_equals_paddle_linear(freeze_input: bool, freeze_weight: bool, bias: bool) -> None:
    """Outputs and gradients of the fast Linear are F.linear's; frozen tensors get none (fine-tuning)."""
    paddle.seed(0)
    layer = Linear(24, 40, bias_attr=None if bias else False)
    if bias:
        layer.bias.set_value(paddle.randn([40]))
    layer.weight.stop_gradient = freeze_weight
    x_np = np.random.default_rng(0).normal(size=(3, 7, 24)).astype(np.float32)
    grad_out = paddle.to_tensor(np.random.default_rng(1).normal(size=(3, 7, 40)).astype(np.float32))
    results = []
    for fast in (True, False):
        Linear.fast_on_cpu = fast
        try:
            x = paddle.to_tensor(x_np, stop_gradient=freeze_input)
            layer.clear_gradients()
            y = layer(x)
            y.backward(grad_out)
            results.append([y.numpy()] + [None if t.grad is None else t.grad.numpy()
                                          for t in (x, layer.weight, layer.bias) if t is not None])
        finally:
            Linear.fast_on_cpu = True
    (fast_out, *fast_grads), (plain_out, *plain_grads) = results
    np.testing.assert_allclose(fast_out, plain_out, rtol=1e-6, atol=1e-6)
    assert [g is None for g in fast_grads] == [g is None for g in plain_grads]
    assert (fast_grads[0] is None) == freeze_input and (fast_grads[1] is None) == freeze_weight
    for fast, plain in zip(fast_grads, plain_grads, strict=True):
        if plain is not None:
            np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


def test_fast_linear_gives_plain_gradients_on_a_whole_vit(monkeypatch: pytest.MonkeyPatch) -> None:
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 3, 112, 112)).astype(np.float32))
    runs = []
    for fast in (True, False):
        monkeypatch.setattr(Linear, "fast_on_cpu", fast)
        paddle.seed(0)
        runs.append(gradients(get_model("vit_t", width=0.25, num_features=32), x, seed=7))
    fast, plain = runs
    assert fast.keys() == plain.keys() and len(plain) > 100
    for key, value in plain.items():
        assert np.abs(fast[key] - value).max() <= 1e-5 * np.abs(value).max() + 1e-7, key


def gradients(model: paddle.nn.Layer, x: paddle.Tensor, seed: int) -> dict[str, np.ndarray]:
    paddle.seed(seed)
    model.train()
    out = model(x)
    (out * paddle.linspace(-1.0, 1.0, out.shape[1])).square().sum().backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return grads


@pytest.mark.parametrize("name", ["vit_t", "r18"])
def test_recompute_gives_the_same_gradients_and_statistics(name: str) -> None:
    """Masking, drop path (RNG replayed in the recomputed forward) and BatchNorm statistics (not moved twice)."""
    paddle.seed(0)
    plain = get_model(name, width=0.25 if name == "vit_t" else 0.125, num_features=32)
    recomputed = get_model(name, width=0.25 if name == "vit_t" else 0.125, num_features=32, recompute=True)
    recomputed.set_state_dict(plain.state_dict())
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 3, 112, 112)).astype(np.float32))
    expected, got = gradients(plain, x, seed=7), gradients(recomputed, x, seed=7)
    assert expected.keys() == got.keys() and len(expected) > 20
    for key, value in expected.items():
        scale = np.abs(value).max()
        assert np.abs(got[key] - value).max() <= 1e-5 * scale, key
    for key, value in plain.state_dict().items():  # BatchNorm running statistics included
        np.testing.assert_array_equal(recomputed.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    if name == "vit_t":  # the randomness is live: another seed gives other gradients
        other = gradients(plain, x, seed=8)
        assert max(np.abs(other[k] - v).max() / np.abs(v).max() for k, v in expected.items()) > 1e-2


@pytest.mark.slow
@pytest.mark.dist
def test_recompute_on_two_ranks_averages_gradients_like_data_parallel(tmp_path: Path) -> None:
    """DataParallel's reducer fails under recompute's replay; train.py's manual sync gives DataParallel's gradients."""
    proc = launch("tests/dist_recompute_worker.py", log_dir=tmp_path / "log", nproc=2)
    assert proc.returncode == 0, proc.logs
    results = {r["rank"]: r for r in (json.loads(line) for line in proc.logs.splitlines() if line.startswith("{"))}
    assert set(results) == {0, 1}
    for name in ("vit_t", "r18"):
        assert max(results[rank][name]["worst"] for rank in (0, 1)) <= 1e-5, results
        assert results[0][name]["checksum"] == results[1][name]["checksum"], results  # averaged over the ranks


def test_adamw_decays_every_parameter_like_arcface_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """engine.step.build_optimizer's AdamW (a ViT preset) == torch.optim.AdamW over all parameters + clip_grad_norm_(5).

    arcface_torch passes every backbone parameter to AdamW in one group with the config's weight decay (biases,
    norms and pos_embed included); a decay left off any group would show here (the decay is ~10% of the update).
    """
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # torch.optim's first use sets it otherwise
    paddle.seed(0)
    model = get_model("vit_t", width=0.125, num_features=16)
    cfg = load_config("wf42m_pfc03_40epoch_8gpu_vit_t")
    scheduler = PolynomialLRWarmup(cfg.lr, 2, 100)
    optimizer = build_optimizer(cfg, model.parameters(), scheduler)
    params = dict(model.named_parameters())
    trained = [n for n, p in params.items() if not p.stop_gradient]
    start = {n: params[n].numpy().copy() for n in trained}
    mirror = {n: torch.tensor(start[n], requires_grad=True) for n in trained}
    reference = torch.optim.AdamW(mirror.values(), lr=scheduler.get_lr(), weight_decay=cfg.weight_decay)
    without_decay = {n: torch.tensor(start[n], requires_grad=True) for n in trained}
    no_decay = torch.optim.AdamW(without_decay.values(), lr=scheduler.get_lr(), weight_decay=0.0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = {n: rng.normal(0.0, 3.0, start[n].shape).astype(np.float32) for n in trained}
        sum(paddle.sum(params[n] * paddle.to_tensor(g)) for n, g in grads.items()).backward()
        optimizer.step()
        optimizer.clear_grad()
        for copy, torch_optimizer in ((mirror, reference), (without_decay, no_decay)):
            for n, g in grads.items():
                copy[n].grad = torch.from_numpy(g)
            torch.nn.utils.clip_grad_norm_(copy.values(), cfg.clip_grad_norm)
            torch_optimizer.step()
        scheduler.step()
        for group in (*reference.param_groups, *no_decay.param_groups):
            group["lr"] = scheduler.get_lr()

    def worst(copy: dict) -> float:  # largest difference relative to that tensor's total update
        return max(np.abs(params[n].numpy() - copy[n].detach().numpy()).max()
                   / np.abs(copy[n].detach().numpy() - start[n]).max() for n in trained)

    assert worst(mirror) <= 1e-3
    assert worst(without_decay) > 1e-2


def test_summary_lists_the_vits(capsys: pytest.CaptureFixture) -> None:
    summary_main(["--summary", "--networks", "vit_t,vit_t_dp005_mask0"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["vit_t", "1.00", "19,137,792", "1.505"], ["vit_t_dp005_mask0", "1.00", "19,137,792", "1.505"]]


try:
    import paddle2onnx  # noqa: F401

    FORMATS = ("paddle", "onnx")
except ImportError:  # the ONNX half is skipped only when paddle2onnx cannot be installed
    FORMATS = ("paddle",)


@pytest.mark.slow
def test_export_vit_t_keeps_the_embeddings(tmp_path: Path) -> None:
    weights = calibrated_weights("vit_t", tmp_path / "vit_t.pdparams")
    meta = export_tool.export("vit_t", weights, tmp_path / "vit_t", FORMATS, batch_size=None)
    faces = synthetic_faces(3, seed=7)
    reference = DygraphEmbedder(load_backbone("vit_t", weights), 512).embed(faces)
    assert np.abs(reference).max() > 0.5
    runners = [PaddleInferenceEmbedder(tmp_path / "vit_t")]
    if "onnx" in FORMATS:
        runners.append(OnnxEmbedder(tmp_path / "vit_t" / "model.onnx"))
    for runner in runners:
        diff = np.abs(runner.embed(faces) - reference).max()
        assert diff <= 1e-4, f"{runner.backend}: max abs diff {diff}"
    assert meta["network"] == "vit_t" and max(meta["parity_max_abs_diff"].values()) <= 1e-4


@pytest.mark.slow
def test_a_vit_trains_on_the_synthetic_set(tmp_path: Path) -> None:
    """vit_t (masking and drop path on, recompute on), AdamW as the ViT presets: the loss falls."""
    args = ["--cache_dir", str(tmp_path / "cache"), "--synthetic_identities", "10", "--synthetic_images_per_id", "4",
            "--synthetic_val_pairs", "10", "--network", "vit_t", "--width", "0.125", "--embedding_size", "32",
            "--batch_size", "8", "--threads", "1", "--num_workers", "0", "--num_epoch", "4", "--log_every", "1",
            "--val_targets", "", "--optimizer", "adamw", "--lr", "2e-3", "--weight_decay", "0.1",
            "--recompute", "true", "--output", str(tmp_path), "--run_name", "vit"]
    assert train.main(args) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "vit" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
