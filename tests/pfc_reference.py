"""Independent references for the margin losses and Partial FC: PyTorch float64 autograd, written the arcface_torch way.

straight_through = arcface_torch's CombinedMarginLoss (margin under no_grad); exact = autograd through
cos(m1 * acos(c) + m2) - m3; the loss is a plain log-sum-exp cross-entropy averaged over the batch.
"""

from __future__ import annotations

import numpy as np
import torch


def margin_logits(cos: torch.Tensor, labels: torch.Tensor, s: float, m1: float, m2: float, m3: float, grad: str,
                  threshold: float = 0.0) -> torch.Tensor:
    """[B, C] margin logits from cosines (labels -1 = no target in these columns)."""
    rows = torch.where(labels != -1)[0]
    cols = labels[rows]
    if threshold > 0:
        with torch.no_grad():
            dirty = (cos > threshold).to(cos.dtype)
            dirty[rows, cols] = 0
        cos = cos * (1 - dirty)
    target = cos[rows, cols]
    if m1 == 1 and m2 == 0:  # CosFace: arcface_torch subtracts m3 with autograd
        new_target = target - m3
    elif grad == "straight_through":
        with torch.no_grad():
            delta = torch.cos(m1 * torch.arccos(target) + m2) - m3 - target
        new_target = target + delta
    else:
        new_target = torch.cos(m1 * torch.arccos(target) + m2) - m3
    out = cos.clone()
    out[rows, cols] = new_target
    return out * s


def full_softmax(emb: np.ndarray, weight: np.ndarray, labels: np.ndarray, s: float, m1: float, m2: float, m3: float,
                 grad: str = "straight_through", threshold: float = 0.0) -> tuple[float, np.ndarray, np.ndarray]:
    """(loss, d loss/d emb, d loss/d weight) of the plain full softmax with margin, float64."""
    e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    cos = torch.nn.functional.normalize(e) @ torch.nn.functional.normalize(w).T
    logits = margin_logits(cos.clamp(-1, 1), torch.tensor(labels), s, m1, m2, m3, grad, threshold)
    loss = (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), torch.tensor(labels)]).mean()
    loss.backward()
    return float(loss.detach()), e.grad.numpy(), w.grad.numpy()


def numpy_loss(emb: np.ndarray, weight: np.ndarray, labels: np.ndarray, s: float, m1: float, m2: float,
               m3: float) -> float:
    """The same loss in plain NumPy float64 (forward only)."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.clip(e.astype(np.float64) @ w.T.astype(np.float64), -1, 1)
    rows = np.arange(len(labels))
    logits = s * cos
    logits[rows, labels] = s * (np.cos(m1 * np.arccos(cos[rows, labels]) + m2) - m3)
    top = logits.max(1)
    return float(np.mean(np.log(np.exp(logits - top[:, None]).sum(1)) + top - logits[rows, labels]))
