"""The numpy and paddle backends of PartialFC on the same inputs: the cases and the comparison, shared by the
one-process tests (tests/test_pfc_paddle.py) and the 2-rank worker (tests/dist_pfc_worker.py)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import paddle

from losses import CombinedMarginLoss
from partial_fc import PartialFC

MARGINS = {"arcface": (64.0, 1.0, 0.5, 0.0), "cosface": (64.0, 1.0, 0.0, 0.4), "combined": (32.0, 1.2, 0.3, 0.2)}
TOLERANCE = 1e-5
STEPS, PASSES = 2, 3  # optimizer steps, accumulated backward passes before each


def cases() -> list[dict[str, Any]]:
    """sample_rate x margin x gradient mode x optimizer; inter-class filtering on in every other case."""
    out = []
    for i, (rate, name, grad, optimizer) in enumerate(itertools.product(
            (1.0, 0.3), MARGINS, ("straight_through", "exact"), ("sgd", "adamw"))):
        out.append(dict(sample_rate=rate, margin=name, grad=grad, optimizer=optimizer,
                        threshold=0.2 if i % 2 == 0 else 0.0))
    return out


def compare_backends(case: dict[str, Any], batches: list[tuple[np.ndarray, np.ndarray]], dim: int,
                     num_classes: int, local: slice = slice(None), passes: int = PASSES, what: str = "") -> None:
    """Both backends through STEPS optimizer steps of `passes` accumulated passes each (this rank's `local` rows of
    every global batch), compared step by step from identical state (forced steps: after each step the paddle
    backend takes the numpy backend's state, so float32 rounding never compounds): losses, embedding gradients,
    sampled rows and the head gradient, then rows and optimizer state after the step."""
    margin = CombinedMarginLoss(*MARGINS[case["margin"]], interclass_filtering_threshold=case["threshold"],
                                grad=case["grad"])
    adamw = case["optimizer"] == "adamw"
    heads = {backend: PartialFC(margin, dim, num_classes, sample_rate=case["sample_rate"], optimizer=case["optimizer"],
                                weight_decay=0.1 if adamw else 5e-4, seed=11, backend=backend)
             for backend in ("paddle", "numpy")}
    what = f"{what} {case}"
    for step in range(STEPS):
        for k, (emb, labels) in enumerate(batches[step * passes:(step + 1) * passes]):
            results = []
            for pfc in heads.values():
                x = paddle.to_tensor(emb[local], stop_gradient=False)
                loss = pfc(x, paddle.to_tensor(labels[local]))
                (loss / passes).backward()
                results.append((float(loss), x.grad.numpy()))
            (loss, grad), (ref_loss, ref_grad) = results
            _close(f"{what} step {step + 1} pass {k + 1}: loss", loss, ref_loss)
            _close(f"{what} step {step + 1} pass {k + 1}: embedding gradient", grad, ref_grad)
        (rows, grad), (ref_rows, ref_grad) = (pfc.pending_gradient() for pfc in heads.values())
        np.testing.assert_array_equal(rows, ref_rows, err_msg=f"{what} step {step + 1}: sampled rows differ")
        _close(f"{what} step {step + 1}: head gradient", grad, ref_grad)
        for pfc in heads.values():
            pfc.step(1e-3 if adamw else 0.1)
        state, ref_state = (pfc.state_dict() for pfc in heads.values())
        assert state.keys() == ref_state.keys(), f"{what}: state keys {sorted(state)} != {sorted(ref_state)}"
        for name, ref in ref_state.items():
            if isinstance(ref, np.ndarray):
                _close(f"{what} step {step + 1}: {name} after the step", state[name], ref)
            else:
                assert state[name] == ref, f"{what}: {name} {state[name]} != {ref} after step {step + 1}"
        heads["paddle"].set_state_dict(ref_state)


def _close(what: str, ours: Any, ref: Any) -> None:
    """Within TOLERANCE relative (arrays: of the reference's largest entry)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    err, scale = float(np.abs(ours - ref).max(initial=0.0)), float(np.abs(ref).max(initial=0.0))
    assert err <= TOLERANCE * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def batches(rng: np.random.Generator, count: int, batch: int, dim: int, num_classes: int,
            near: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random embeddings and labels; with `near` (centres), sample 1 of each batch sits close to another class's
    centre so that inter-class filtering has a negative to remove."""
    out = []
    for _ in range(count):
        emb = rng.standard_normal((batch, dim)).astype(np.float32)
        labels = rng.choice(num_classes, batch).astype(np.int64)
        if near is not None and batch > 1:
            emb[1] = near[labels[0]] * 50 + emb[1] * 0.01
        out.append((emb, labels))
    return out
