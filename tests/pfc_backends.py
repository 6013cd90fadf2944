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


def run(backend: str, case: dict[str, Any], batches: list[tuple[np.ndarray, np.ndarray]], dim: int,
        num_classes: int, local: slice = slice(None)) -> dict[str, Any]:
    """STEPS optimizer steps of PASSES accumulated passes each (this rank's `local` rows of every global batch):
    losses, embedding gradients, the pending head gradient before the first step, the state after every step."""
    margin = CombinedMarginLoss(*MARGINS[case["margin"]], interclass_filtering_threshold=case["threshold"],
                                grad=case["grad"])
    adamw = case["optimizer"] == "adamw"
    pfc = PartialFC(margin, dim, num_classes, sample_rate=case["sample_rate"], optimizer=case["optimizer"],
                    weight_decay=0.1 if adamw else 5e-4, seed=11, backend=backend)
    out: dict[str, Any] = {"loss": [], "grad": [], "state": []}
    for step in range(STEPS):
        for emb, labels in batches[step * PASSES:(step + 1) * PASSES]:
            x = paddle.to_tensor(emb[local], stop_gradient=False)
            loss = pfc(x, paddle.to_tensor(labels[local]))
            (loss / PASSES).backward()
            out["loss"].append(float(loss))
            out["grad"].append(x.grad.numpy())
        if step == 0:
            out["pending"] = pfc.pending_gradient()
        pfc.step(1e-3 if adamw else 0.1)
        out["state"].append({k: v.copy() if isinstance(v, np.ndarray) else v for k, v in pfc.state_dict().items()})
    return out


def compare(ours: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    """paddle (ours) == numpy (ref) within TOLERANCE relative (arrays: of the reference's largest entry)."""
    def close(name: str, a: Any, b: Any) -> None:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, f"{what} {name}: shape {a.shape} != {b.shape}"
        err, scale = float(np.abs(a - b).max(initial=0.0)), float(np.abs(b).max(initial=0.0))
        assert err <= TOLERANCE * max(scale, 1e-30), f"{what} {name}: max error {err:.3g} vs scale {scale:.3g}"

    for k, (a, b) in enumerate(zip(ours["loss"], ref["loss"], strict=True)):
        close(f"loss {k}", a, b)
    for k, (a, b) in enumerate(zip(ours["grad"], ref["grad"], strict=True)):
        close(f"embedding gradient {k}", a, b)
    np.testing.assert_array_equal(ours["pending"][0], ref["pending"][0], err_msg=f"{what}: sampled rows differ")
    close("head gradient", ours["pending"][1], ref["pending"][1])
    for k, (a, b) in enumerate(zip(ours["state"], ref["state"], strict=True)):
        assert a.keys() == b.keys(), f"{what}: state keys {sorted(a)} != {sorted(b)}"
        for name in a:
            if isinstance(b[name], np.ndarray):
                close(f"{name} after step {k + 1}", a[name], b[name])
            else:
                assert a[name] == b[name], f"{what}: {name} {a[name]} != {b[name]} after step {k + 1}"


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
