"""pfc.amp.DynamicLossScale: one skip decision over the backbone's and the head's gradients (tested in fp32 on CPU:
the bookkeeping is device-independent; fp16 itself needs a GPU)."""

import numpy as np
import paddle
import pytest

from losses import CombinedMarginLoss
from partial_fc import PartialFC
from pfc.amp import DynamicLossScale

C, D_IN, D, B = 30, 6, 8, 10


def _setup(backend: str) -> tuple[paddle.nn.Linear, paddle.optimizer.Momentum, PartialFC, paddle.Tensor, paddle.Tensor]:
    paddle.seed(0)
    net = paddle.nn.Linear(D_IN, D)
    opt = paddle.optimizer.Momentum(0.1, momentum=0.9, parameters=net.parameters(),
                                    grad_clip=paddle.nn.ClipGradByGlobalNorm(5.0))
    pfc = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, sample_rate=0.5, backend=backend)
    rng = np.random.default_rng(0)
    return net, opt, pfc, paddle.to_tensor(rng.standard_normal((B, D_IN)).astype(np.float32)), paddle.to_tensor(
        rng.choice(C, B))


def _state(net: paddle.nn.Linear, pfc: PartialFC) -> list[np.ndarray]:
    return [p.numpy().copy() for p in net.parameters()] + [np.asarray(pfc.state_dict()["weight"]).copy()]


@pytest.mark.parametrize("backend", ["numpy", "paddle"])
def test_a_scaled_step_equals_the_plain_step(backend: str) -> None:
    net, opt, pfc, x, y = _setup(backend)
    pfc(net(x), y).backward()
    opt.step()
    pfc.step(0.1)
    plain = _state(net, pfc)
    net, opt, pfc, x, y = _setup(backend)
    scaler = DynamicLossScale(init_scale=2.0 ** 10, incr_every=2)
    scaler.scale_loss(pfc(net(x), y)).backward()
    assert scaler.step(opt, net.parameters(), pfc, 0.1)
    for ours, ref in zip(_state(net, pfc), plain, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    opt.clear_grad()
    scaler.scale_loss(pfc(net(x), y)).backward()
    assert scaler.step(opt, net.parameters(), pfc, 0.1) and scaler.scale == 2.0 ** 11  # 2 finite steps: x2


@pytest.mark.parametrize("backend", ["numpy", "paddle"])
@pytest.mark.parametrize("where", ["backbone", "head"])
def test_inf_in_either_part_skips_both(monkeypatch: pytest.MonkeyPatch, backend: str, where: str) -> None:
    net, opt, pfc, x, y = _setup(backend)
    before = _state(net, pfc)
    scaler = DynamicLossScale(init_scale=2.0 ** 10)
    scaler.scale_loss(pfc(net(x), y)).backward()
    if where == "backbone":
        with paddle.no_grad():
            net.weight.grad.scale_(float("inf"))
    else:
        monkeypatch.setattr(pfc, "grads_finite", lambda: paddle.to_tensor(False))
    assert not scaler.step(opt, net.parameters(), pfc, 0.1)
    for ours, ref in zip(_state(net, pfc), before, strict=True):
        np.testing.assert_array_equal(ours, ref)
    assert scaler.scale == 2.0 ** 9 and pfc.pending_gradient()[0].size == 0  # halved; the head's gradient dropped


def test_state_round_trip_and_gradscaler_checkpoints() -> None:
    scaler = DynamicLossScale()
    scaler.load_state_dict({"scale": np.array([1024.0], np.float32), "incr_count": 7, "decr_count": 0})
    assert (scaler.scale, scaler.incr_count) == (1024.0, 7)
    other = DynamicLossScale()
    other.load_state_dict(scaler.state_dict())
    assert other.state_dict() == {"scale": 1024.0, "incr_count": 7}
