"""InsightFace's verification protocol as plain loops, written here from its description (DESIGN 2).

The independent reference that `eval.verification.evaluate` is checked against in tests and timed against in
`bench/eval.py`: one `np.less` per threshold per fold, exactly like InsightFace's `calculate_roc`. VAL@FAR follows
this project's documented definition (InsightFace's interpolation crashes on duplicate FARs), also as a loop.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import KFold


def _confusion(threshold: float, dist: np.ndarray, issame: np.ndarray) -> tuple[int, int, int, int]:
    predict = np.less(dist, threshold)
    tp = int(np.sum(predict & issame))
    fp = int(np.sum(predict & ~issame))
    tn = int(np.sum(~predict & ~issame))
    fn = int(np.sum(~predict & issame))
    return tp, fp, tn, fn


def calculate_accuracy(threshold: float, dist: np.ndarray, issame: np.ndarray) -> tuple[float, float, float]:
    tp, fp, tn, fn = _confusion(threshold, dist, issame)
    tpr = 0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / dist.size


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    return np.sum(np.square(np.subtract(embeddings[0::2], embeddings[1::2])), 1)


def calculate_roc(embeddings: np.ndarray, issame: np.ndarray, nrof_folds: int = 10):
    """-> (tpr [T], fpr [T], accuracy per fold, best threshold per fold), InsightFace's loops."""
    thresholds = np.arange(0, 4, 0.01)
    dist = pair_distances(embeddings)
    issame = np.asarray(issame, dtype=bool)
    folds = KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(len(issame)))
    tprs = np.zeros((nrof_folds, len(thresholds)))
    fprs = np.zeros((nrof_folds, len(thresholds)))
    accuracy = np.zeros(nrof_folds)
    best = np.zeros(nrof_folds)
    for f, (train, test) in enumerate(folds):
        acc_train = np.zeros(len(thresholds))
        for i, t in enumerate(thresholds):
            _, _, acc_train[i] = calculate_accuracy(t, dist[train], issame[train])
        best_index = np.argmax(acc_train)
        for i, t in enumerate(thresholds):
            tprs[f, i], fprs[f, i], _ = calculate_accuracy(t, dist[test], issame[test])
        _, _, accuracy[f] = calculate_accuracy(thresholds[best_index], dist[test], issame[test])
        best[f] = thresholds[best_index]
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best


def calculate_val(embeddings: np.ndarray, issame: np.ndarray, far_target: float = 1e-3, nrof_folds: int = 10):
    """-> (val per fold, far per fold, threshold per fold): the largest threshold of np.arange(0, 4, 0.001) whose
    FAR on the training folds is <= far_target, applied to the held-out fold."""
    thresholds = np.arange(0, 4, 0.001)
    dist = pair_distances(embeddings)
    issame = np.asarray(issame, dtype=bool)
    folds = KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(len(issame)))
    val, far, chosen = np.zeros(nrof_folds), np.zeros(nrof_folds), np.zeros(nrof_folds)
    for f, (train, test) in enumerate(folds):
        impostor_train = dist[train][~issame[train]]
        threshold = thresholds[0]
        for t in thresholds:
            if np.sum(np.less(impostor_train, t)) / impostor_train.size <= far_target:
                threshold = t
        tp, fp, tn, fn = _confusion(threshold, dist[test], issame[test])
        val[f] = tp / (tp + fn) if tp + fn else np.nan
        far[f] = fp / (fp + tn) if fp + tn else np.nan
        chosen[f] = threshold
    return val, far, chosen
