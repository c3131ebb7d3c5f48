"""CTR metrics: AUC and LogLoss on numpy arrays."""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (rank formula, ties get the mean rank); NaN when one class is absent."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
