"""The warm-up + polynomial schedule against its closed form and arcface_torch's recursive update."""

import pytest

from utils.lr_scheduler import PolynomialLRWarmup, polynomial_warmup_lr


def _recursive(base: float, warmup: int, total: int, power: float, steps: int) -> list[float]:
    """arcface_torch's recursive get_lr (from step 1 on), multiplying the previous rate by the decay ratio."""
    lrs = [base]  # arcface_torch starts every schedule at the base rate
    for t in range(1, steps):
        if t <= warmup:
            lrs.append(base * t / warmup)
        elif t > total:
            lrs.append(lrs[-1])
        else:
            ratio = (1.0 - (t - warmup) / (total - warmup)) / (1.0 - (t - 1 - warmup) / (total - warmup))
            lrs.append(lrs[-1] * ratio ** power)
    return lrs


@pytest.mark.parametrize(("warmup", "total", "power"), [(0, 10, 1.0), (3, 10, 1.0), (4, 25, 2.0)])
def test_scheduler_matches_closed_form_and_recursion(warmup: int, total: int, power: float) -> None:
    base = 0.1
    sched = PolynomialLRWarmup(base, warmup, total, power)
    got = []
    for _ in range(total + 3):
        got.append(sched())
        sched.step()
    closed = [base * t / warmup if t < warmup else base * (1 - (min(t, total) - warmup) / (total - warmup)) ** power
              for t in range(total + 3)]
    assert got == pytest.approx(closed, abs=1e-12)
    rec = _recursive(base, warmup, total, power, total + 3)
    assert got[1:] == pytest.approx(rec[1:], abs=1e-12)
    assert got[0] == (base if warmup == 0 else 0.0)
    assert got[total] == 0.0


def test_known_values() -> None:
    assert [polynomial_warmup_lr(t, 1.0, 2, 6) for t in range(7)] == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25, 0])


def test_state_dict_round_trip_resumes_the_schedule() -> None:
    a = PolynomialLRWarmup(0.1, 2, 20)
    for _ in range(7):
        a.step()
    b = PolynomialLRWarmup(0.1, 2, 20)
    b.set_state_dict(a.state_dict())
    for _ in range(5):
        assert a() == b()
        a.step()
        b.step()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        PolynomialLRWarmup(0.1, 10, 10)
