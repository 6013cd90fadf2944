"""`--to_static` and `--data_format NHWC` train the same network as dygraph NCHW.

to_static: with the same PReLU kernel (F.prelu; the NumPy one is dygraph-only) the compiled forward and backward
give bitwise the dygraph outputs, gradients and BatchNorm statistics (measured: 0 difference), and train.py's
losses over 5 steps are equal. NHWC: the same parameters and state dict; in float64, outputs, gradients and
statistics equal NCHW to ~1e-14. In float32 the NHWC BatchNorm kernels sum in another order (~1e-6 relative per
layer), and training-mode BatchNorm over a batch of 8 amplifies such noise to ~1e-2 of the largest gradient
(NCHW float32 itself is ~1e-3 from float64): float32 comparisons are made where they are well conditioned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paddle
import pytest

import train
from backbones import get_model, load_weights
from backbones.layers import PReLU
from tests.test_train import losses, tiny_args
from tools.export import export

NETWORKS = ["mbf", "r18"]
pytestmark = pytest.mark.filterwarnings("ignore:Tensor do not have 'place'")  # Paddle's to_static backward builder


@pytest.fixture
def float64() -> Iterator[None]:
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


def twin_models(name: str, formats: tuple[str, str] = ("NCHW", "NHWC")) -> tuple[paddle.nn.Layer, paddle.nn.Layer]:
    """Two tiny models (width 0.25, 16-d) in these data formats, holding the same weights."""
    paddle.seed(0)
    first, second = (get_model(name, width=0.25, num_features=16, data_format=f) for f in formats)
    second.set_state_dict(first.state_dict())
    return first, second


def forward_backward(model: paddle.nn.Layer, x: np.ndarray, projection: np.ndarray) -> dict[str, np.ndarray]:
    """Embeddings, every parameter gradient and the state dict after one forward/backward of sum(emb * projection)."""
    out = model(paddle.to_tensor(x))
    (out * paddle.to_tensor(projection)).sum().backward()
    result = {"out": out.numpy()}
    result.update({f"grad/{k}": p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None})
    result.update({f"state/{k}": v.numpy() for k, v in model.state_dict().items()})
    model.clear_gradients()
    return result


def max_relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray], prefix: str) -> float:
    """max |a - b| over the entries named `prefix...`, relative to the largest |a| among them."""
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return max(float(np.abs(a[k] - b[k]).max()) for k in keys) / max(float(np.abs(a[k]).max()) for k in keys)


def inputs(batch: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, 3, 112, 112)).astype(dtype), rng.normal(size=(batch, 16)).astype(dtype)


@pytest.mark.parametrize("name", NETWORKS)
def test_nhwc_has_the_nchw_parameters_and_state_dict(name: str) -> None:
    nchw, nhwc = twin_models(name)
    assert [(k, v.shape) for k, v in nchw.state_dict().items()] == [(k, v.shape) for k, v in nhwc.state_dict().items()]
    for key, value in nchw.state_dict().items():
        np.testing.assert_array_equal(nhwc.state_dict()[key].numpy(), value.numpy())


@pytest.mark.parametrize("name", NETWORKS)
def test_nhwc_equals_nchw_in_float64(name: str, float64: None) -> None:
    """Training mode (batch statistics, running-statistics update, every gradient), then eval mode."""
    nchw, nhwc = twin_models(name)
    x, projection = inputs(8, "float64")
    for mode in ("train", "eval"):
        nchw.train(mode == "train")
        nhwc.train(mode == "train")
        expected, got = forward_backward(nchw, x, projection), forward_backward(nhwc, x, projection)
        assert expected["out"].dtype == np.float64
        for part in ("out", "grad/", "state/"):
            assert max_relative(expected, got, part) < 1e-10, (mode, part)


@pytest.mark.parametrize("name", NETWORKS)
def test_nhwc_equals_nchw_in_float32_eval_mode(name: str) -> None:
    """float32 as trained and served, with the NumPy PReLU in both layouts (eval: no batch-statistics coupling)."""
    nchw, nhwc = twin_models(name)
    nchw.eval()
    nhwc.eval()
    x, projection = inputs(4, "float32")
    expected, got = forward_backward(nchw, x, projection), forward_backward(nhwc, x, projection)
    assert max_relative(expected, got, "out") < 1e-5
    assert max_relative(expected, got, "grad/") < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("name", "data_format"), [("mbf", "NCHW"), ("r18", "NCHW"), ("r18", "NHWC")])
def test_to_static_equals_dygraph(name: str, data_format: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One training-mode step and an eval forward: compiled and dygraph agree to 1e-6 (measured: bitwise).

    Both run F.prelu (the NumPy PReLU runs in dygraph only; tests/test_backbones.py checks it against F.prelu).
    """
    monkeypatch.setattr(PReLU, "numpy_on_cpu", False)
    dygraph, compiled = twin_models(name, (data_format, data_format))
    compiled = paddle.jit.to_static(compiled, full_graph=True)
    x, projection = inputs(8, "float32")
    expected, got = forward_backward(dygraph, x, projection), forward_backward(compiled, x, projection)
    for part in ("out", "grad/", "state/"):
        assert max_relative(expected, got, part) < 1e-6, part
    dygraph.eval()
    compiled.eval()
    with paddle.no_grad():
        np.testing.assert_allclose(compiled(paddle.to_tensor(x)).numpy(), dygraph(paddle.to_tensor(x)).numpy(),
                                   rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic_cache")


def five_steps(cache_dir: Path, out: Path, run: str, *extra: str) -> dict[int, float]:
    assert train.main(tiny_args(cache_dir, out, run, "--network", "r18", "--stop_at_step", "5", *extra)) == 0
    return losses(out / run)


@pytest.mark.slow
def test_train_py_to_static_losses_equal_dygraph(cache_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PReLU, "numpy_on_cpu", False)  # the same kernels on both sides: the same numbers
    dygraph = five_steps(cache_dir, tmp_path, "dygraph")
    compiled = five_steps(cache_dir, tmp_path, "static", "--to_static", "true")
    assert sorted(compiled) == list(range(1, 6))
    assert [compiled[s] for s in range(1, 6)] == pytest.approx([dygraph[s] for s in range(1, 6)], rel=1e-6)
    assert json.loads((tmp_path / "static" / "config.json").read_text())["to_static"] is True
    # the compiled run's weights are a plain state dict, loadable into a dygraph model
    load_weights(get_model("r18", width=0.25, num_features=64), tmp_path / "static" / "model.pdparams")


@pytest.mark.slow
def test_train_py_nhwc_trains_and_exports_as_an_nchw_model(cache_dir: Path, tmp_path: Path) -> None:
    """Step 1 (same initial weights, same batch) gives the NCHW loss. Later steps are not compared: float32 noise,
    amplified by batch-8 BatchNorm training at lr 0.1, moves them by up to ~1% within 5 steps (measured)."""
    nchw = five_steps(cache_dir, tmp_path, "nchw")
    nhwc = five_steps(cache_dir, tmp_path, "nhwc", "--data_format", "NHWC")
    assert nhwc[1] == pytest.approx(nchw[1], rel=1e-5)
    assert sorted(nhwc) == list(range(1, 6)) and all(np.isfinite(list(nhwc.values())))
    weights = tmp_path / "nhwc" / "model.pdparams"
    plain, channels_last = (get_model("r18", width=0.25, num_features=64, data_format=f) for f in ("NCHW", "NHWC"))
    for model in (plain, channels_last):
        load_weights(model, weights)
        model.eval()
    x = paddle.to_tensor(inputs(2, "float32")[0])
    with paddle.no_grad():
        np.testing.assert_allclose(plain(x).numpy(), channels_last(x).numpy(), rtol=1e-4, atol=1e-5)
    # export takes the weights as they are: an NCHW input, checked against dygraph by export itself
    meta = export("r18", weights, tmp_path / "exported", ("paddle",), width=0.25, embedding_size=64)
    assert meta["input_shape"] == [None, 3, 112, 112] and meta["parity_max_abs_diff"]["paddle"] < 1e-4


def test_bad_data_format_is_one_clear_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="data_format must be NCHW or NHWC"):
        get_model("r18", data_format="NCWH")
    with pytest.raises(ValueError, match="NHWC is for the convolutional networks"):
        get_model("vit_t", data_format="NHWC")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data_format", "nhwc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "train.py: error: --data_format: 'nhwc' is not one of NCHW, NHWC"
