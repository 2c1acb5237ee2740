"""Evaluation metrics for the reference trainers: classification and regression (GLUE-style).

Pure numpy on purpose: the trainers should not need scipy or scikit-learn at run time. The tests
check every function against ``sklearn.metrics`` and ``scipy.stats`` on random and tied data.

Inputs are 1-D sequences (lists, numpy arrays or CPU tensors) of equal, non-zero length; anything
else raises a ``ValueError`` with a one-line message. Pearson and Spearman correlations of a
constant input are undefined and come back as ``float('nan')`` (no exception, no warning), as
scipy does, so an evaluation loop can log them without special-casing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "classification_metrics",
    "macro_f1",
    "pearson",
    "regression_metrics",
    "spearman",
]


def _pair(pred: Sequence[Any], gold: Sequence[Any], what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D arrays after checking they are non-empty and of equal length."""
    p, g = np.asarray(pred), np.asarray(gold)
    if p.ndim != 1 or g.ndim != 1:
        raise ValueError(f"{what}: expected 1-D inputs, got shapes {p.shape} and {g.shape}")
    if len(p) != len(g):
        raise ValueError(f"{what}: pred has {len(p)} items but gold has {len(g)}")
    if len(p) == 0:
        raise ValueError(f"{what}: empty input")
    return p, g


def accuracy(pred: Sequence[Any], gold: Sequence[Any]) -> float:
    """Fraction of positions where ``pred`` equals ``gold``."""
    p, g = _pair(pred, gold, "accuracy")
    return float(np.mean(p == g))


def macro_f1(pred: Sequence[Any], gold: Sequence[Any], num_labels: int | None = None) -> float:
    """Unweighted mean of the per-class F1 over the classes present in ``gold`` or ``pred``.

    This is scikit-learn's ``f1_score(average="macro")``: a class that appears only in ``pred``
    (or only in ``gold``) counts with F1 = 0, and a class in neither is left out. When
    ``num_labels`` is given, every label must be an integer in ``[0, num_labels)``; it is a
    check only and does not add absent classes to the average.
    """
    p, g = _pair(pred, gold, "macro_f1")
    if num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"macro_f1: num_labels must be >= 1, got {num_labels}")
        for name, arr in (("pred", p), ("gold", g)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"macro_f1: {name} labels must be integers, got {arr.dtype}")
            bad = arr[(arr < 0) | (arr >= num_labels)]
            if len(bad):
                raise ValueError(
                    f"macro_f1: {name} label {bad[0].item()!r} outside [0, {num_labels})"
                )
    scores = []
    for c in np.unique(np.concatenate([p, g])):
        tp = np.sum((p == c) & (g == c))
        fp = np.sum((p == c) & (g != c))
        fn = np.sum((p != c) & (g == c))
        # F1 = 2tp / (2tp + fp + fn); the class is present, so the denominator is > 0.
        scores.append(2.0 * tp / (2.0 * tp + fp + fn))
    return float(np.mean(scores))


def _is_constant(a: np.ndarray) -> bool:
    # Compare to the first element rather than testing the variance: the mean of n equal floats
    # can differ from them in the last bit, which would give a tiny non-zero variance.
    return bool(np.all(a == a[0]))


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if _is_constant(x) or _is_constant(y):
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    r = float(np.dot(xc, yc) / np.sqrt(np.dot(xc, xc) * np.dot(yc, yc)))
    # Rounding can push |r| a hair past 1 for perfectly correlated data.
    return max(-1.0, min(1.0, r))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient; ``nan`` when either input is constant (or has length 1)."""
    a, b = _pair(x, y, "pearson")
    return _correlation(a.astype(np.float64), b.astype(np.float64))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span (scipy's ``rankdata``)."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    # Start index of each run of equal values in sorted order, plus the end sentinel.
    starts = np.flatnonzero(np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]]))
    ends = np.append(starts[1:], len(a))
    # A run covering sorted positions [s, e) gets the mean of ranks s+1 .. e.
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks); ``nan`` when either is constant."""
    a, b = _pair(x, y, "spearman")
    return _correlation(_average_ranks(a), _average_ranks(b))


def classification_metrics(pred: Sequence[Any], gold: Sequence[Any]) -> dict[str, float]:
    """``{"accuracy": ..., "macro_f1": ...}`` for label predictions."""
    return {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold)}


def regression_metrics(pred: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """``{"pearson": ..., "spearman": ...}`` for score predictions (e.g. STS-B)."""
    return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold)}
