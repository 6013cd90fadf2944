"""Verification on .bin pair sets (LFW, CFP-FP, AgeDB-30, ...) with InsightFace's exact protocol, vectorised.

Protocol (InsightFace `verification.py`):
- `test()` embeds every image and its horizontal mirror, sums the two embeddings (float64), L2-normalises the sum
  and calls `evaluate()`. `evaluate()` itself does NOT normalise, like InsightFace's: it expects unit rows and
  raises if they are not (squared distances of unit vectors live in [0, 4], the threshold range).
- Pair i is rows 2i and 2i+1; distance = squared L2, computed like InsightFace (in the embeddings' dtype), then
  compared in float64 (what NumPy 2 does with InsightFace's float64 thresholds).
- Accuracy: thresholds `np.arange(0, 4, 0.01)`, a pair is predicted "same" when `dist < threshold` (strict), folds
  are `KFold(nrof_folds, shuffle=False)`; per fold the threshold with the best accuracy on the other folds (first one
  on ties, as `np.argmax`) is applied to the held-out fold. Reported: mean and std (population, `np.std`) over folds.
- VAL@FAR: InsightFace interpolates the threshold for the target FAR with `interp1d(far, thresholds)`, which fails
  ("Expect x to not have duplicates") whenever two thresholds share a FAR -- almost always. Here, per fold, the
  threshold is the LARGEST one of `np.arange(0, 4, 0.001)` whose FAR on the training folds is <= `far_target`
  (FAR is non-decreasing in the threshold, so that is the most permissive threshold meeting the target; threshold 0
  always does, since no distance is < 0). VAL and FAR are then measured on the held-out fold and averaged; a fold
  without genuine (impostor) pairs gives VAL (FAR) NaN.

Counting is done once per fold with `np.searchsorted` on sorted distances (number of distances < t for all t),
so there is no Python loop over thresholds; the numbers equal the loop implementation exactly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize
from tqdm import tqdm

from eval.bin_io import BinSet, load_bin
from utils.image import preprocess_batch

__all__ = ["ACCURACY_THRESHOLDS", "VAL_THRESHOLDS", "BinSet", "describe", "embed_images", "embed_views", "evaluate",
           "load_bin", "pair_distances", "score", "test"]

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
UNIT_NORM_TOLERANCE = 1e-3

logger = logging.getLogger(__name__)


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance between rows 2i and 2i+1, as InsightFace computes it, returned as float64."""
    return np.sum(np.square(np.subtract(embeddings[0::2], embeddings[1::2])), 1).astype(np.float64)


def _check_inputs(embeddings: np.ndarray, issame: np.ndarray, nrof_folds: int) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [2N, D] array, got shape {list(embeddings.shape)}")
    if len(embeddings) % 2:
        raise ValueError(f"embeddings have an odd number of rows ({len(embeddings)}); pairs are rows 2i, 2i+1")
    if issame.ndim != 1 or len(issame) != len(embeddings) // 2:
        raise ValueError(f"issame has {issame.size} labels for {len(embeddings) // 2} pairs "
                         f"({len(embeddings)} embeddings)")
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        raise ValueError(f"embeddings contain NaN/Inf in {int(bad.sum())} rows (first: row {int(np.argmax(bad))})")
    norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64))
    off = np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE
    if off.any():
        i = int(np.argmax(off))
        raise ValueError(f"evaluate() expects L2-normalised embeddings; row {i} has norm {norms[i]:.6g} "
                         f"({int(off.sum())} rows off by > {UNIT_NORM_TOLERANCE}); normalise them or use test()")
    if not 2 <= nrof_folds <= len(issame):
        raise ValueError(f"nrof_folds must be in [2, {len(issame)}] for {len(issame)} pairs, got {nrof_folds}")


def _fold_counts(dist: np.ndarray, issame: np.ndarray, folds: list[np.ndarray], thresholds: np.ndarray):
    """Per fold: genuine / impostor pairs with dist < t for every threshold t, and the fold's class sizes."""
    below_same = np.empty((len(folds), len(thresholds)), dtype=np.int64)
    below_diff = np.empty_like(below_same)
    for f, idx in enumerate(folds):
        d, same = dist[idx], issame[idx]
        below_same[f] = np.searchsorted(np.sort(d[same]), thresholds, side="left")
        below_diff[f] = np.searchsorted(np.sort(d[~same]), thresholds, side="left")
    n_same = np.array([issame[idx].sum() for idx in folds], dtype=np.int64)
    n_diff = np.array([len(idx) for idx in folds], dtype=np.int64) - n_same
    return below_same, below_diff, n_same, n_diff


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """num / den per fold (den has one entry per fold), `empty` where den == 0 (InsightFace's tpr/fpr use 0)."""
    den = np.asarray(den, dtype=np.float64).reshape(-1, *([1] * (num.ndim - 1)))
    out = np.full(np.broadcast_shapes(num.shape, den.shape), empty)
    return np.divide(num, den, out=out, where=den > 0)


def evaluate(embeddings: np.ndarray, issame: np.ndarray, nrof_folds: int = 10,
             far_target: float = 1e-3) -> dict[str, Any]:
    """10-fold verification accuracy and VAL@FAR of L2-normalised pair embeddings (protocol: module docstring).

    Returns accuracy (per fold), accuracy_mean, accuracy_std, best_thresholds (per fold), thresholds, tpr, fpr
    (held-out-fold rates per threshold, mean over folds), val, val_std, far (means over folds), val_thresholds
    (per fold), far_target, num_pairs.
    """
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame)
    _check_inputs(embeddings, issame, nrof_folds)
    issame = issame.astype(bool)
    dist = pair_distances(embeddings)
    folds = [test for _, test in KFold(n_splits=nrof_folds, shuffle=False).split(dist)]
    fold_sizes = np.array([len(idx) for idx in folds])

    # Accuracy: best threshold on the training folds (= all pairs minus the held-out fold).
    below_same, below_diff, n_same, n_diff = _fold_counts(dist, issame, folds, ACCURACY_THRESHOLDS)
    correct_test = below_same + (n_diff[:, None] - below_diff)  # tp + tn per fold and threshold
    correct_train = correct_test.sum(0) - correct_test
    best = np.argmax(correct_train, axis=1)  # integer counts: same argmax as the float accuracies
    rows = np.arange(nrof_folds)
    accuracy = correct_test[rows, best] / fold_sizes
    tpr = _ratio(below_same, n_same, 0.0).mean(0)
    fpr = _ratio(below_diff, n_diff, 0.0).mean(0)

    # VAL@FAR: largest threshold whose training-fold FAR <= far_target.
    v_same, v_diff, v_n_same, v_n_diff = _fold_counts(dist, issame, folds, VAL_THRESHOLDS)
    far_train = _ratio(v_diff.sum(0) - v_diff, v_n_diff.sum() - v_n_diff, 0.0)
    chosen = np.array([np.searchsorted(row, far_target, side="right") - 1 for row in far_train])
    val = _ratio(v_same[rows, chosen], v_n_same, np.nan)
    far = _ratio(v_diff[rows, chosen], v_n_diff, np.nan)

    return {
        "accuracy": accuracy, "accuracy_mean": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy)),
        "best_thresholds": ACCURACY_THRESHOLDS[best], "thresholds": ACCURACY_THRESHOLDS, "tpr": tpr, "fpr": fpr,
        "val": float(np.mean(val)), "val_std": float(np.std(val)), "far": float(np.mean(far)),
        "val_thresholds": VAL_THRESHOLDS[chosen], "far_target": far_target, "num_pairs": len(issame),
    }


def embed_views(model, images: np.ndarray, flip: bool = True) -> list[np.ndarray]:
    """One batch of NxHxWx3 uint8 RGB crops -> [embeddings of the images, of their mirrors (if flip)], float32.

    The caller holds `paddle.no_grad()` and has put the model in eval mode.
    """
    import paddle

    views = [False, True] if flip else [False]
    return [model(paddle.to_tensor(preprocess_batch(images, flip=mirror))).numpy() for mirror in views]


def describe(binset: BinSet) -> str:
    """'lfw.bin (6000 pairs, sha 1a2b3c4d)': names the exact copy of a set in every log line."""
    return f"{Path(binset.path).name} ({binset.num_pairs} pairs, sha {binset.checksum})"


def embed_images(images: np.ndarray, model, batch_size: int = 64, flip: bool = True, progress: bool = True,
                 desc: str = "embed") -> tuple[np.ndarray, np.ndarray]:
    """NxHxWx3 uint8 RGB -> (image + mirror embeddings summed, [N, D] float64; L2 norms of every raw view).

    Batches with a progress bar, the tail batch simply smaller; eval mode without gradients, the model's previous
    mode restored afterwards.
    """
    import paddle

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not len(images):
        raise ValueError("no images to embed")
    summed, norms = None, []
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress,
                              leave=False):
                views = embed_views(model, images[start:start + batch_size], flip)
                if summed is None:
                    summed = np.zeros((len(images), views[0].shape[1]), dtype=np.float64)
                for view in views:
                    summed[start:start + len(view)] += view
                    norms.append(np.linalg.norm(view.astype(np.float64), axis=1))
    finally:
        if was_training:
            model.train()
    return summed, np.concatenate(norms)


def score(binset: BinSet, summed: np.ndarray, norms: np.ndarray, seconds: float, nrof_folds: int = 10,
          far_target: float = 1e-3, log: logging.Logger | None = None) -> dict[str, Any]:
    """Summed embeddings of a whole set -> L2-normalise -> `evaluate`, plus xnorm, name, checksum; one log line."""
    if not np.isfinite(summed).all():
        raise ValueError(f"{describe(binset)}: the model produced NaN/Inf embeddings")
    embeddings = normalize(summed)
    result = evaluate(embeddings, binset.issame, nrof_folds=nrof_folds, far_target=far_target)
    result.update(name=binset.name, checksum=binset.checksum, xnorm=float(np.mean(norms)), embeddings=embeddings,
                  seconds=seconds)
    (log or logger).info("%s: accuracy %.5f +- %.5f, VAL@FAR=%g %.5f +- %.5f (FAR %.2e), xnorm %.3f, %.1f s",
                         describe(binset), result["accuracy_mean"], result["accuracy_std"], far_target,
                         result["val"], result["val_std"], result["far"], result["xnorm"], seconds)
    return result


def test(binset: BinSet, model, batch_size: int = 64, flip: bool = True, nrof_folds: int = 10,
         far_target: float = 1e-3, progress: bool = True, log: logging.Logger | None = None) -> dict[str, Any]:
    """Flip test of `model` on a .bin set: embed (+ mirror), sum, L2-normalise, `evaluate`.

    Returns `evaluate`'s dict plus xnorm (mean L2 norm of the raw embeddings of every view, InsightFace's "XNorm"),
    embeddings (the normalised [2N, D] float64 rows that were evaluated), name, checksum, seconds. The model is run
    in eval mode without gradients and put back into its previous mode.
    """
    start_time = time.perf_counter()
    summed, norms = embed_images(binset.images, model, batch_size, flip, progress, f"verify {Path(binset.path).name}")
    return score(binset, summed, norms, time.perf_counter() - start_time, nrof_folds, far_target, log)
