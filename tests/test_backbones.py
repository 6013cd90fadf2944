"""Backbones: arcface_torch's exact state_dict layout and parameter counts, shapes, conventions, bad arguments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import paddle
import pytest

from backbones import NETWORKS, get_model
from backbones.layers import PReLU, batch_norm_1d, batch_norm_2d, scaled_channels
from backbones.summary import count_macs, count_parameters
from paddle_pretrainedmodel.convert_torch import convert_state_dict, paddle_name
from tests.conftest import SHARED
from utils import cpu

REFERENCE = SHARED / "reference" / "arcface_torch_state_dicts.json"
VIT_REFERENCE = Path(__file__).resolve().parent / "reference" / "arcface_torch_vit_state_dicts.json"  # + r2060


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.is_file():
        pytest.skip("../shared/reference is not beside the project")
    return {**json.loads(REFERENCE.read_text())["models"], **json.loads(VIT_REFERENCE.read_text())["models"]}


def lazy_model(name: str) -> paddle.nn.Layer:
    with paddle.LazyGuard():  # shapes without allocating r200's 119M parameters
        return get_model(name)


def test_every_reference_network_is_built() -> None:
    assert set(NETWORKS) == {"r18", "r34", "r50", "r100", "r200", "r2060", "mbf", "mbf_large", "vit_t",
                             "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005",
                             "vit_l_dp005_mask_005", "vit_h"}


@pytest.mark.parametrize("name", NETWORKS)
def test_parameter_count_equals_arcface_torch(name: str, reference: dict) -> None:
    assert count_parameters(lazy_model(name)) == reference[name]["params"]


@pytest.mark.parametrize("name", NETWORKS)
def test_state_dict_maps_one_to_one_onto_arcface_torch(name: str, reference: dict) -> None:
    entries = reference[name]["state_dict"]
    model_keys = {k: tuple(v.shape) for k, v in lazy_model(name).state_dict().items()}
    expected = {paddle_name(key): tuple(shape) for key, shape, _ in entries if paddle_name(key) is not None}
    transposed = {k for k, shape in expected.items() if len(shape) == 2}  # the Linear weights
    assert set(model_keys) == set(expected)
    for key, shape in expected.items():
        assert model_keys[key] == (shape[::-1] if key in transposed else shape), key
    # and the converter accepts exactly this layout (zero-filled: calloc'ed pages, nothing touched; the Linear
    # weights it transposes are copied, so the nets with GBs of them stop at the layout check above)
    if sum(math.prod(shape) for key, shape in expected.items() if key in transposed) > 300e6:
        return
    torch_like = {key: np.zeros(shape, np.float32) for key, shape, _ in entries}
    converted = convert_state_dict(torch_like, name)
    assert {k: v.shape for k, v in converted.items()} == model_keys


@pytest.mark.parametrize(("name", "width", "features"), [("mbf", 0.25, 128), ("mbf_large", 0.25, 512),
                                                         ("r18", 0.25, 64), ("r50", 0.125, 512)])
def test_forward_shape_train_and_eval(name: str, width: float, features: int) -> None:
    paddle.seed(0)
    model = get_model(name, num_features=features, width=width)
    x = paddle.randn([2, 3, 112, 112])
    out = model(x)
    assert out.shape == [2, features] and out.dtype == paddle.float32
    out.mean().backward()
    model.eval()
    with paddle.no_grad():
        assert model(x[:1]).shape == [1, features]


def test_iresnet_features_gamma_is_frozen_at_one() -> None:
    paddle.seed(0)
    model = get_model("r18", width=0.25, num_features=32)
    assert model.features.weight.stop_gradient
    optimizer = paddle.optimizer.SGD(learning_rate=1.0, parameters=model.parameters())
    model(paddle.randn([4, 3, 112, 112])).square().mean().backward()
    optimizer.step()
    np.testing.assert_array_equal(model.features.weight.numpy(), np.ones(32, np.float32))
    assert np.abs(model.fc.weight.numpy()).sum() > 0


@pytest.mark.filterwarnings("ignore:amp_guard can only be enabled")
def test_fp16_flag_keeps_fp32_embedding_on_cpu() -> None:
    model = get_model("mbf", fp16=True, width=0.25)
    assert model(paddle.randn([2, 3, 112, 112])).dtype == paddle.float32


def test_dropout_is_active_only_in_training() -> None:
    paddle.seed(0)
    model = get_model("r18", width=0.125, dropout=0.5)
    x = paddle.randn([2, 3, 112, 112])
    model.eval()
    with paddle.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())
    assert model.dropout.p == 0.5


def test_batch_norm_follows_torch_running_statistics() -> None:
    """momentum 0.1 and an unbiased running variance, as torch.nn.BatchNorm: eval outputs then agree."""
    rng = np.random.default_rng(0)
    for layer, shape in ((batch_norm_2d(3), (4, 3, 5, 5)), (batch_norm_1d(3), (6, 3))):
        mean, var = np.zeros(3), np.ones(3)
        for step in range(3):
            x = rng.normal(step, 1 + step, size=shape).astype(np.float32)
            layer(paddle.to_tensor(x))
            axes = tuple(i for i in range(x.ndim) if i != 1)
            mean = 0.9 * mean + 0.1 * x.mean(axes)
            var = 0.9 * var + 0.1 * x.var(axes, ddof=1)
        np.testing.assert_allclose(layer._mean.numpy(), mean, rtol=1e-5)
        np.testing.assert_allclose(layer._variance.numpy(), var, rtol=1e-5)
        assert layer._epsilon == 1e-5


def test_macs_match_arcface_torch_figures() -> None:
    # arcface_torch's model zoo lists r50 at 6.3 GFLOPs and mbf at 0.45 (multiply-adds at 112x112)
    assert count_macs(get_model("mbf")) / 1e9 == pytest.approx(0.438, abs=1e-3)
    assert count_macs(get_model("r18", width=0.25)) / 1e9 == pytest.approx(0.170, abs=1e-3)
    # its ViT table: ViT-T 1.5 GFLOPs (attention's matmuls counted, as its extra_gflops)
    assert count_macs(get_model("vit_t")) / 1e9 == pytest.approx(1.505, abs=1e-3)


@pytest.mark.parametrize("width", [0.25, 0.3, 0.35, 1.5])
def test_width_scales_channels_to_valid_groups(width: float) -> None:
    model = get_model("mbf", width=width, num_features=16)
    stem = model.layers[0].layers[0]
    assert stem.weight.shape[0] == scaled_channels(128, width) and stem.weight.shape[0] % 8 == 0
    model.eval()
    with paddle.no_grad():
        assert model(paddle.zeros([1, 3, 112, 112])).shape == [1, 16]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "r51"}, "unknown network 'r51'"),
    ({"name": "mbf", "dropout": 0.4}, "dropout is only used by the iresnets"),
    ({"name": "r18", "width": 0.0}, "width must be in"),
    ({"name": "r18", "dropout": 1.0}, "dropout must be in"),
])
def test_bad_arguments_fail_clearly(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_model(**kwargs)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_numpy_prelu_equals_paddle_prelu(data_format: str) -> None:
    """The NumPy PReLU (slopes on axis 1, or on the last axis for NHWC) equals F.prelu, forward and gradients."""
    channels_last = data_format == "NHWC"
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(3, 4, 4, 5) if channels_last else (3, 5, 4, 4)).astype(np.float32)
    x_np[(0, 0, 0, slice(None)) if channels_last else (0, slice(None), 0, 0)] = 0.0  # the tie: the negative branch
    layer = PReLU(5, data_format=data_format)
    layer.weight.set_value(rng.uniform(-0.3, 0.6, 5).astype(np.float32))
    grad_out = paddle.to_tensor(rng.normal(size=x_np.shape).astype(np.float32))
    results = []
    for numpy_path in (True, False):
        layer.numpy_on_cpu = numpy_path
        x = paddle.to_tensor(x_np, stop_gradient=False)
        y = layer(x)
        results.append([y.numpy(), *(g.numpy() for g in paddle.grad([y], [x, layer.weight], [grad_out]))])
    slope = layer.weight.numpy().reshape((5,) if channels_last else (5, 1, 1))
    np.testing.assert_allclose(results[0][0], np.where(x_np > 0, x_np, slope * x_np), rtol=1e-6)
    for fast, plain in zip(*results, strict=True):
        np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("freeze_input", "freeze_slope"), [(False, True), (True, False)])
def test_numpy_prelu_with_frozen_inputs(freeze_input: bool, freeze_slope: bool) -> None:
    """Fine-tuning freezes tensors: the frozen side gets no gradient, the other the exact one.

    (Compared with the formula: Paddle's own F.prelu CPU backward segfaults when x needs no gradient.)
    """
    layer = PReLU(4)
    layer.weight.stop_gradient = freeze_slope
    x_np = np.random.default_rng(2).normal(size=(2, 4, 3, 3)).astype(np.float32)
    x = paddle.to_tensor(x_np, stop_gradient=freeze_input)
    layer(x).sum().backward()
    slope = layer.weight.numpy().reshape(1, 4, 1, 1)
    if freeze_input:
        assert x.grad is None
        np.testing.assert_allclose(layer.weight.grad.numpy(), np.minimum(x_np, 0).sum((0, 2, 3)), rtol=1e-6)
    else:
        assert layer.weight.grad is None
        np.testing.assert_array_equal(x.grad.numpy(), np.where(x_np > 0, 1, slope).astype(np.float32))


@pytest.mark.parametrize("name", ["mbf", "r18"])
def test_fast_paths_give_plain_dygraph_gradients(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole network with the NumPy PReLU: first-step gradients and a 3-step loss curve equal F.prelu's.

    Tolerances are float32 summation-order noise: each gradient within 1e-4 of its own scale plus 1e-6 of the
    largest gradient (BN biases followed by another BN have mathematically zero gradients: pure noise).
    """
    rng = np.random.default_rng(1)
    x = paddle.to_tensor(rng.normal(size=(4, 3, 112, 112)).astype(np.float32))
    target = paddle.to_tensor(rng.normal(size=(4, 16)).astype(np.float32))
    runs = []
    for numpy_path in (True, False):
        monkeypatch.setattr(PReLU, "numpy_on_cpu", numpy_path)
        paddle.seed(0)
        model = get_model(name, width=0.25, num_features=16)
        optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
        losses, first_grads = [], None
        for _ in range(3):
            loss = (model(x) - target).square().mean()
            loss.backward()
            first_grads = first_grads or {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            optimizer.clear_grad()
            losses.append(float(loss))
        runs.append((losses, first_grads))
    (fast_losses, fast_grads), (plain_losses, plain_grads) = runs
    # batch-4 BatchNorm training is chaotic: a 1e-6 input perturbation moves the plain path's 3rd loss by 4e-4
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=2e-3)
    assert fast_losses[-1] < fast_losses[0]
    scale = max(np.abs(g).max() for g in plain_grads.values())
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) > 50
    for key, plain in plain_grads.items():
        np.testing.assert_allclose(fast_grads[key], plain, rtol=0, atol=1e-4 * np.abs(plain).max() + 1e-6 * scale,
                                   err_msg=key)


def test_avx2_mkl_is_requested_on_amd_only_and_never_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    environ: dict[str, str] = {}  # never the process's own: a leaked value changes MKL's kernels in later subprocesses
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "GenuineIntel")
    assert not cpu.prefer_avx2_mkl(environ) and "MKL_DEBUG_CPU_TYPE" not in environ
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu.prefer_avx2_mkl(environ) and environ["MKL_DEBUG_CPU_TYPE"] == "5"
    environ["MKL_DEBUG_CPU_TYPE"] = ""  # the user's opt-out
    assert not cpu.prefer_avx2_mkl(environ) and environ["MKL_DEBUG_CPU_TYPE"] == ""
