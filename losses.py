"""Margin losses on cosine logits: ArcFace, CosFace and the general combined form cos(m1*theta + m2) - m3.

The margin math is written twice, side by side: NumPy methods (`target_logit`, `target_grad`) for the numpy backend of
Partial FC, and the same formulas in Paddle ops (`target_logit_tensor`, `target_grad_tensor`) for the paddle backend
and the autograd `forward` (a plain fully-connected head), which never read a tensor back to the host.

Gradient modes. arcface_torch applies the ArcFace margin inside `torch.no_grad()`, so its backward treats the target
logit s*cos(theta + m) as if it were s*cos(theta): d logit / d cos = s ("straight_through", our default, for
reproduction). `grad="exact"` uses the true derivative s*m1*sin(m1*theta + m2)/sin(theta), which grows without bound as
theta -> 0 when m2 > 0; we evaluate it at cos clamped to +-(1 - 1e-6). For CosFace (m1=1, m2=0) both modes coincide.

theta + m2 may exceed pi (cos(theta + m2) then rises again as theta -> pi). arcface_torch's current CombinedMarginLoss
computes the plain cos(theta + m2) without the old "easy margin"/threshold fix-ups; we do the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import paddle

GRAD_MODES = ("straight_through", "exact")
LOSS_NAMES = ("arcface", "cosface", "combined")
_EXACT_COS_LIMIT = 1.0 - 1e-6  # where the exact derivative is evaluated at |cos| = 1 (it is singular there)


class CombinedMarginLoss(paddle.nn.Layer):
    """Turn cosine logits [B, C] into margin logits: target -> s*(cos(m1*theta + m2) - m3), others -> s*cos.

    labels [B] hold the target column of each row, or -1 when the row's class is not among these columns (another
    shard of Partial FC). interclass_filtering_threshold > 0 zeroes negatives whose cosine exceeds it (arcface_torch:
    likely label noise), with zero gradient; 0 disables it.
    """

    def __init__(self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0.0,
                 grad: str = "straight_through") -> None:
        super().__init__()
        checks = [
            (math.isfinite(s) and s > 0, f"s={s} must be a positive number"),
            (math.isfinite(m1) and m1 > 0, f"m1={m1} must be > 0 (1 = no multiplicative margin)"),
            (0 <= m2 < math.pi / 2, f"m2={m2} must be in [0, pi/2) (additive angular margin, radians)"),
            (0 <= m3 < 1, f"m3={m3} must be in [0, 1) (additive cosine margin)"),
            (0 <= interclass_filtering_threshold < 1,
             f"interclass_filtering_threshold={interclass_filtering_threshold} must be in [0, 1) (0 = off)"),
            (grad in GRAD_MODES, f"grad={grad!r} must be one of {GRAD_MODES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"CombinedMarginLoss: {message}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.grad = grad

    def extra_repr(self) -> str:
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, grad={self.grad}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}")

    @property
    def has_angular_margin(self) -> bool:
        return self.m1 != 1.0 or self.m2 != 0.0

    # ---- NumPy core (shared with Partial FC) ----
    def target_logit(self, cos_t: np.ndarray) -> np.ndarray:
        """s * (cos(m1 * acos(c) + m2) - m3) for the target cosines (computed in float64)."""
        c = np.clip(np.asarray(cos_t, dtype=np.float64), -1.0, 1.0)
        if self.has_angular_margin:
            c = np.cos(self.m1 * np.arccos(c) + self.m2)
        return self.s * (c - self.m3)

    def target_grad(self, cos_t: np.ndarray) -> np.ndarray:
        """d target_logit / d cos for the chosen gradient mode (float64)."""
        c = np.asarray(cos_t, dtype=np.float64)
        if self.grad == "straight_through" or not self.has_angular_margin:
            return np.full(c.shape, self.s)
        theta = np.arccos(np.clip(c, -_EXACT_COS_LIMIT, _EXACT_COS_LIMIT))
        return self.s * self.m1 * np.sin(self.m1 * theta + self.m2) / np.sin(theta)

    # ---- The same math in Paddle ops (device-resident: no value ever goes to the host) ----
    def target_logit_tensor(self, cos_t: paddle.Tensor) -> paddle.Tensor:
        """target_logit on a tensor (evaluated in float64, returned in cos_t's dtype)."""
        c = paddle.clip(cos_t.astype("float64"), -1.0, 1.0)
        if self.has_angular_margin:
            c = paddle.cos(self.m1 * paddle.acos(c) + self.m2)
        return (self.s * (c - self.m3)).astype(cos_t.dtype)

    def target_grad_tensor(self, cos_t: paddle.Tensor) -> paddle.Tensor:
        """target_grad on a tensor (float64 inside, cos_t's dtype out)."""
        if self.grad == "straight_through" or not self.has_angular_margin:
            return paddle.full_like(cos_t, self.s)
        theta = paddle.acos(paddle.clip(cos_t.astype("float64"), -_EXACT_COS_LIMIT, _EXACT_COS_LIMIT))
        return (self.s * self.m1 * paddle.sin(self.m1 * theta + self.m2) / paddle.sin(theta)).astype(cos_t.dtype)

    # ---- Paddle autograd path (a plain, unsharded FC head) ----
    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        """logits [B, C] cosines, labels [B] int (-1 = no target here) -> [B, C] margin logits with autograd.

        Nothing is read back to the host: the target column is indexed (no dense one-hot), and a label outside
        [-1, C), which only the device can see, turns its row into NaN (the trainer's non-finite loss guard stops on
        it) instead of raising. Shapes are checked on the host (they are known there).
        """
        if logits.ndim != 2 or labels.reshape([-1]).shape[0] != logits.shape[0]:
            raise ValueError(f"CombinedMarginLoss: logits must be [B, C] and labels [B], got {logits.shape} "
                             f"and {labels.shape}")
        labels = labels.reshape([-1, 1]).astype("int64")
        has_target = (labels >= 0) & (labels < logits.shape[1])
        column = paddle.where(has_target, labels, paddle.zeros_like(labels))
        cos = paddle.clip(logits, -1.0, 1.0)
        cos_t = paddle.take_along_axis(cos, column, 1)
        if self.interclass_filtering_threshold > 0:  # drop negatives that look like the same identity
            cos = paddle.where(cos > self.interclass_filtering_threshold, paddle.zeros_like(cos), cos)
        value, slope = self.target_logit_tensor(cos_t.detach()), self.target_grad_tensor(cos_t.detach())
        target = value + slope * (cos_t - cos_t.detach())  # value = margin logit, derivative = slope
        out = cos * self.s
        out = paddle.put_along_axis(out, column, paddle.where(has_target, target,
                                                              paddle.take_along_axis(out, column, 1)), 1)
        bad = (labels < -1) | (labels >= logits.shape[1])
        return paddle.where(bad, paddle.full_like(out, float("nan")), out)


def build_margin_loss(cfg: Any) -> CombinedMarginLoss:
    """CombinedMarginLoss from cfg.loss (arcface | cosface | combined) and cfg.margin_* keys; contradictions raise."""
    name = cfg.loss
    s, m1, m2, m3 = cfg.margin_s, cfg.margin_m1, cfg.margin_m2, cfg.margin_m3
    if name not in LOSS_NAMES:
        raise ValueError(f"config key loss={name!r} must be one of {LOSS_NAMES}")
    if name == "arcface" and (m1 != 1.0 or m3 != 0.0 or m2 <= 0):
        raise ValueError(f"loss='arcface' uses margin_m2 only (margin_m1=1, margin_m3=0, margin_m2>0), got "
                         f"margin_m1={m1}, margin_m2={m2}, margin_m3={m3}; use loss='combined' for other margins")
    if name == "cosface" and (m1 != 1.0 or m2 != 0.0 or m3 <= 0):
        raise ValueError(f"loss='cosface' uses margin_m3 only (margin_m1=1, margin_m2=0, margin_m3>0), got "
                         f"margin_m1={m1}, margin_m2={m2}, margin_m3={m3}; use loss='combined' for other margins")
    return CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=cfg.interclass_filtering_threshold,
                              grad=cfg.margin_grad)
