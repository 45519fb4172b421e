"""Retention metrics of sequential injection, computed from a retention matrix R.

A sequence injects L contexts one at a time into the same method (no reset in between). R has shape
(L, L + 1): row i is the i-th injected context (0-based: the (i+1)-th injection), column j is the
number of injections done when the probes were asked (0 = before any injection). R[i, j] is the mean
per-probe score (QA-F1 by default) over context i's questions after j injections. So
    j >= i + 1  retention: context i has been injected (j - i - 1 other contexts since),
    j <= i      the no-knowledge floor: context i has not been injected yet,
    j == i + 1  efficacy: right after context i's own injection.
Unprobed cells are NaN (e.g. `probe_unseen: false` skips j <= i). Every summary below reads only
injected cells (j >= i + 1) except `unseen`, and each is linear in R, so the mean of a summary over
independent sequences equals the summary of the mean matrix.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# how each summary is computed from R (the task adds which per-probe score R holds)
PROTOCOLS = {
    "final": "sequential/mean over contexts i of R[i, L] (every context after the last injection)",
    "first_final": "sequential/R[0, L] (the first injected context after the last injection)",
    "efficacy": "sequential/mean over i of R[i, i+1] (each context right after its own injection)",
    "auc": "sequential/(1/L) sum over j=1..L of mean over i<j of R[i, j] (normalised area under the retention "
           "curve of the mean over injected contexts; average incremental accuracy)",
    "unseen": "sequential/mean over i >= j of R[i, j] (contexts not injected yet: the no-knowledge floor)",
}


def retention_matrix(cells: Iterable[tuple[int, int, float]], length: int) -> np.ndarray:
    """R of one sequence from (context position i, injections j, per-probe score) triples: the mean
    score per cell, NaN where nothing was probed."""
    sums = np.zeros((length, length + 1))
    counts = np.zeros((length, length + 1), dtype=int)
    for i, j, value in cells:
        if not (0 <= i < length and 0 <= j <= length):
            raise ValueError(f"retention cell ({i}, {j}) is outside a sequence of length {length}")
        sums[i, j] += value
        counts[i, j] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _check(matrix: np.ndarray) -> int:
    if matrix.ndim != 2 or matrix.shape[1] != matrix.shape[0] + 1 or matrix.shape[0] < 1:
        raise ValueError(f"a retention matrix has shape (L, L + 1) with L >= 1, got {matrix.shape}")
    return matrix.shape[0]


def final(matrix: np.ndarray) -> float:
    """Mean over every context after the last injection: mean_i R[i, L]."""
    length = _check(matrix)
    return float(np.mean(matrix[:, length]))


def first_final(matrix: np.ndarray) -> float:
    """The first injected context after the last injection: R[0, L]."""
    length = _check(matrix)
    return float(matrix[0, length])


def diagonal(matrix: np.ndarray) -> np.ndarray:
    """R[i, i+1] for every i: each context right after its own injection."""
    length = _check(matrix)
    return matrix[np.arange(length), np.arange(length) + 1]


def efficacy(matrix: np.ndarray) -> float:
    return float(np.mean(diagonal(matrix)))


def retention_curve(matrix: np.ndarray) -> np.ndarray:
    """c(j) = mean_{i<j} R[i, j] for j = 1..L: mean score over the contexts injected so far."""
    length = _check(matrix)
    return np.array([np.mean(matrix[:j, j]) for j in range(1, length + 1)])


def auc(matrix: np.ndarray) -> float:
    """Area under the retention curve with unit-width steps, divided by L (so it lies in [0, 1] for
    scores in [0, 1]): (1/L) sum_{j=1..L} c(j). This is the "average incremental accuracy" of
    class-incremental learning (Rebuffi et al., iCaRL, 2017), with contexts in place of classes."""
    return float(np.mean(retention_curve(matrix)))


def age_curve(matrix: np.ndarray) -> np.ndarray:
    """r(a) = mean_i R[i, i+1+a] for a = 0..L-1: score against the number of injections since a
    context's own (a = 0 is efficacy; r(L-1) = R[0, L] has a single term)."""
    length = _check(matrix)
    return np.array([np.mean([matrix[i, i + 1 + age] for i in range(length - age)]) for age in range(length)])


def unseen(matrix: np.ndarray) -> float:
    """Mean over the cells of not-yet-injected contexts (j <= i), ignoring unprobed (NaN) cells; NaN if none."""
    length = _check(matrix)
    rows, cols = np.tril_indices(length, k=0, m=length + 1)
    values = matrix[rows, cols]
    values = values[~np.isnan(values)]
    return float(np.mean(values)) if values.size else float("nan")


def summarize(matrix: np.ndarray) -> dict[str, float]:
    """Every summary of one matrix, keyed as in `PROTOCOLS`."""
    return {"final": final(matrix), "first_final": first_final(matrix), "efficacy": efficacy(matrix),
            "auc": auc(matrix), "unseen": unseen(matrix)}
