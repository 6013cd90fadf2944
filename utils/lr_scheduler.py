"""arcface_torch's learning-rate schedule: linear warm-up, then polynomial decay to zero, stepped per optimizer step.

lr(t) = base * t / W                                   for t < W        (W = warm-up steps)
lr(t) = base * (1 - (min(t, T) - W) / (T - W)) ** p    for t >= W       (T = total steps)

This is arcface_torch's `PolynomialLRWarmup._get_closed_form_lr`. Its recursive `get_lr` returns the base rate
at step 0 even during warm-up (a quirk); the closed form, used here, starts the warm-up from 0.
"""

from __future__ import annotations

from paddle.optimizer.lr import LRScheduler


def polynomial_warmup_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, power: float = 1.0) -> float:
    """The schedule's value for optimizer step `step` (0-based), as a plain function."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (min(step, total_steps) - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (1.0 - progress) ** power


class PolynomialLRWarmup(LRScheduler):
    """Paddle scheduler for `polynomial_warmup_lr`; `state_dict()` is `last_epoch`/`last_lr` (plain numbers)."""

    def __init__(self, learning_rate: float, warmup_steps: int, total_steps: int, power: float = 1.0,
                 last_epoch: int = -1) -> None:
        if total_steps <= 0 or not 0 <= warmup_steps < max(total_steps, 1):
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.power = power
        super().__init__(learning_rate, last_epoch)

    def get_lr(self) -> float:
        return polynomial_warmup_lr(self.last_epoch, self.base_lr, self.warmup_steps, self.total_steps, self.power)

    _get_closed_form_lr = get_lr  # `step(epoch=k)` jumps straight to step k
