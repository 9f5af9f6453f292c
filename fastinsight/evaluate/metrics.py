"""Slide AUC (Mann-Whitney with average ranks for ties, no sklearn) and Dice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fastinsight.errors import InputError


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of their ranks. Shapes: ``[n]`` -> ``[n]`` float64."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # Start of each run of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic (ties count one half).

    Shapes: scores ``[n]``, labels ``[n]`` in {0, 1} -> float; NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise InputError(f"roc_auc: {s.size} scores but {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise InputError(f"roc_auc: labels must be 0 or 1, found {sorted(set(y.tolist()))}")
    if not np.isfinite(s).all():
        raise InputError("roc_auc: scores contain NaN or inf")
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# --------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------
def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice ``2|P&G| / (|P| + |G|)`` of two boolean masks; 1.0 when both are empty."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != g.shape:
        raise InputError(f"dice: prediction {p.shape} and truth {g.shape} differ in shape")
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom
