"""CombinedMarginLoss: values and both gradient modes against PyTorch autograd (arcface_torch's way), validation."""

import math
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
import torch

from config import DEFAULTS
from losses import CombinedMarginLoss, build_margin_loss
from tests.host_reads import forbid_host_reads
from tests.pfc_reference import margin_logits

MARGINS = {"arcface": (64.0, 1.0, 0.5, 0.0), "cosface": (64.0, 1.0, 0.0, 0.4), "combined": (32.0, 1.2, 0.3, 0.2)}


def _cosines(rng: np.random.Generator, b: int = 6, c: int = 9) -> np.ndarray:
    cos = rng.uniform(-0.95, 0.95, (b, c))
    cos[0, 0], cos[1, 2] = 1.0, -1.0  # the ends of the range (exact mode's singular points)
    return cos


@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("grad", ["straight_through", "exact"])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_forward_and_gradient_match_torch(name: str, grad: str, threshold: float) -> None:
    rng = np.random.default_rng(0)
    s, m1, m2, m3 = MARGINS[name]
    cos = _cosines(rng)
    labels = np.array([0, 2, -1, 5, 8, 3])
    upstream = rng.standard_normal(cos.shape)
    loss = CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=threshold, grad=grad)
    x = paddle.to_tensor(cos, dtype="float64", stop_gradient=False)
    out = loss(x, paddle.to_tensor(labels))
    (out * paddle.to_tensor(upstream)).sum().backward()

    xt = torch.tensor(cos, requires_grad=True)
    ref = margin_logits(xt.clamp(-1, 1), torch.tensor(labels), s, m1, m2, m3, grad, threshold)
    (ref * torch.tensor(upstream)).sum().backward()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    ours, theirs = x.grad.numpy(), xt.grad.numpy()
    singular = np.zeros(cos.shape, bool)
    singular[0, 0] = singular[1, 2] = grad == "exact" and (m1 != 1 or m2 != 0)  # torch: inf/nan, ours: guarded
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours[~singular], theirs[~singular], rtol=1e-9, atol=1e-12)


def test_exact_gradient_matches_finite_differences() -> None:
    loss = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, grad="exact")
    c = np.linspace(-0.99, 0.99, 41)
    h = 1e-7
    numeric = (loss.target_logit(c + h) - loss.target_logit(c - h)) / (2 * h)
    np.testing.assert_allclose(loss.target_grad(c), numeric, rtol=1e-6)
    assert np.isfinite(loss.target_grad(np.array([1.0, -1.0]))).all()


def test_straight_through_slope_is_s_and_arcface_value_is_plain_cos_theta_plus_m() -> None:
    loss = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    c = np.array([-1.0, -0.95, 0.0, 0.9, 1.0])
    np.testing.assert_allclose(loss.target_grad(c), 64.0)
    # theta + m > pi near cos = -1: arcface_torch keeps cos(theta + m) (no easy-margin fix-up), so do we
    np.testing.assert_allclose(loss.target_logit(c), 64.0 * np.cos(np.arccos(c) + 0.5))


@pytest.mark.parametrize("kwargs, message", [
    (dict(s=0.0, m1=1.0, m2=0.5, m3=0.0), "s=0.0"),
    (dict(s=64.0, m1=0.0, m2=0.5, m3=0.0), "m1=0.0"),
    (dict(s=64.0, m1=1.0, m2=-0.1, m3=0.0), "m2=-0.1"),
    (dict(s=64.0, m1=1.0, m2=math.pi / 2, m3=0.0), "m2="),
    (dict(s=64.0, m1=1.0, m2=0.0, m3=-0.2), "m3=-0.2"),
    (dict(s=64.0, m1=1.0, m2=0.0, m3=0.4, interclass_filtering_threshold=1.5), "interclass_filtering_threshold"),
    (dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, grad="autograd"), "grad='autograd'"),
])
def test_invalid_margins_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CombinedMarginLoss(**kwargs)


def test_bad_labels_give_nan_rows_and_bad_shapes_raise() -> None:
    """Label values live on the device: a label outside [-1, C) poisons its row (NaN) instead of a host check."""
    loss = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    out = loss(paddle.to_tensor([[0.1, 0.2, 0.3]] * 3), paddle.to_tensor([0, 3, -2])).numpy()
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()
    with pytest.raises(ValueError, match="must be"):
        loss(paddle.zeros([2, 3]), paddle.to_tensor([0, 1, 2]))


@pytest.mark.parametrize("grad", ["straight_through", "exact"])
def test_forward_and_backward_never_read_the_device(grad: str) -> None:
    loss = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.3, grad=grad)
    x = paddle.to_tensor(_cosines(np.random.default_rng(1)), dtype="float32", stop_gradient=False)
    labels = paddle.to_tensor([0, 2, -1, 5, 8, 3])
    with forbid_host_reads():
        out = loss(x, labels)
        out.sum().backward()
    assert np.isfinite(x.grad.numpy()).all()


def _cfg(**overrides: object) -> SimpleNamespace:
    return SimpleNamespace(**{**DEFAULTS, **overrides})


def test_build_margin_loss_from_config() -> None:
    arc = build_margin_loss(_cfg())
    assert (arc.s, arc.m1, arc.m2, arc.m3, arc.grad) == (64.0, 1.0, 0.5, 0.0, "straight_through")
    cos = build_margin_loss(_cfg(loss="cosface", margin_m2=0.0, margin_m3=0.4, margin_grad="exact"))
    assert (cos.m2, cos.m3, cos.grad) == (0.0, 0.4, "exact")
    combined = build_margin_loss(_cfg(loss="combined", margin_m1=1.0, margin_m2=0.3, margin_m3=0.2))
    assert (combined.m2, combined.m3) == (0.3, 0.2)


@pytest.mark.parametrize("overrides, message", [
    (dict(loss="arcface", margin_m3=0.4), "loss='arcface' uses margin_m2 only"),
    (dict(loss="cosface", margin_m2=0.5, margin_m3=0.4), "loss='cosface' uses margin_m3 only"),
    (dict(loss="sphereface"), "loss='sphereface' must be one of"),
    (dict(margin_grad="autograd"), "grad='autograd'"),
])
def test_contradictory_configs_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_margin_loss(_cfg(**overrides))
