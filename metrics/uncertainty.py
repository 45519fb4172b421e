"""Uncertainty of a mean over items, and paired differences between two runs on the same items.

A run's metric is a mean over probes, but probes are not always independent: an edit's reliability,
generality and locality probes, or a dialogue's turns, share their unit. Both functions therefore
resample *units* (clusters): each unit contributes (sum of its probe values, number of probes), and the
statistic is the ratio of sums, i.e. exactly the micro-average the run reports (Efron & Tibshirani,
"An Introduction to the Bootstrap", ch. 6; the cluster bootstrap). With one probe per unit this is the
plain bootstrap of the mean. scipy.stats does the resampling (`bootstrap`, `permutation_test`).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
BATCH = 250  # resamples drawn at once: 2000 x 10,000 units at once held ~450 MB; a batch of 250 holds an eighth
PROTOCOL = "cluster-bootstrap(percentile, {n} resamples, unit={unit})"


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap standard error and 95 % percentile interval, over `n_units` units."""

    mean: float
    se: float
    low: float
    high: float
    n_units: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "se": self.se, "ci95": [self.low, self.high], "n_units": self.n_units}


@dataclass(frozen=True)
class PairedDifference:
    """mean(b) − mean(a) on the shared probes, its bootstrap interval, and a two-sided paired
    permutation p-value (each unit's pair of values swapped between the runs at random)."""

    difference: float
    se: float
    low: float
    high: float
    p_value: float
    n_units: int
    n_probes: int


def mean_se(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and standard error of the mean (sample std with ddof 1 / sqrt(n), as pandas `sem`); None where
    undefined (n = 0, or n = 1 for se). The one SEM of kbench: CRS tables, sequential summaries over
    sequences, the report's spread over seeds."""
    n = len(values)
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    mean = math.fsum(values) / n
    if n == 1:
        return {"mean": mean, "se": None, "n": 1}
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "se": math.sqrt(variance / n), "n": n}


def _by_unit(values: Sequence[float], units: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit (sum, count) arrays, units in first-seen order; `units=None`: every value is its own unit."""
    values = np.asarray(values, dtype=float)
    if units is None:
        return values, np.ones_like(values)
    if len(units) != len(values):
        raise ValueError(f"{len(values)} values but {len(units)} unit labels")
    index: dict[Hashable, int] = {}
    codes = np.array([index.setdefault(u, len(index)) for u in units])
    return np.bincount(codes, weights=values), np.bincount(codes).astype(float)


def _ratio(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    return sums.sum(axis=axis) / counts.sum(axis=axis)


def bootstrap_mean(
    values: Sequence[float],
    units: Sequence[Hashable] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The micro-average of `values` with a cluster-bootstrap standard error and 95 % percentile interval.

    values: one number per probe; units: the independent unit of each probe (question, edit, dialogue),
    None = each probe its own unit. Raises ValueError on no values. One unit, or identical units: se 0 and a
    degenerate interval at the mean (scipy would warn and return NaN)."""
    if len(values) == 0:
        raise ValueError("no values to average")
    sums, counts = _by_unit(values, units)
    mean = float(_ratio(sums, counts))
    unit_means = sums / counts
    if len(sums) < 2 or np.all(unit_means == unit_means[0]):
        return Interval(mean, 0.0, mean, mean, len(sums))
    from scipy import stats  # here, not at import: `mean_se` alone (ranking, rescore_crs) needs no scipy

    result = stats.bootstrap(
        (sums, counts), _ratio, paired=True, vectorized=True, n_resamples=n_resamples,
        confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed), batch=BATCH,
    )
    interval = result.confidence_interval
    return Interval(mean, float(result.standard_error), float(interval.low), float(interval.high), len(sums))


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    units: Sequence[Hashable] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedDifference:
    """Compare two runs probe by probe: `a[i]` and `b[i]` are the same probe's values in runs A and B.

    difference = micro-average(b) − micro-average(a); the interval resamples units (paired); the p-value
    comes from a paired permutation test on the per-unit mean differences (H0: the runs are exchangeable
    on every unit). Identical runs give difference 0, se 0 and p = 1. Raises ValueError on unequal lengths."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    if len(a) == 0:
        raise ValueError("no shared probes to compare")
    sums_a, counts = _by_unit(a, units)
    sums_b, _ = _by_unit(b, units)
    unit_difference = (sums_b - sums_a) / counts
    difference = float(_ratio(sums_b, counts) - _ratio(sums_a, counts))
    if len(counts) < 2 or np.all(unit_difference == 0):
        return PairedDifference(difference, 0.0, difference, difference, 1.0, len(counts), len(a))
    rng = np.random.default_rng(seed)
    # the permutation flips the sign of each unit's difference (swapping A and B on that unit), weighting
    # units by their probe counts so the statistic is the micro-average difference
    weighted = unit_difference * counts
    from scipy import stats

    test = stats.permutation_test(
        (weighted,), lambda d, axis=-1: d.sum(axis) / counts.sum(), permutation_type="samples",
        n_resamples=n_resamples, alternative="two-sided", vectorized=True, random_state=rng,
    )
    if np.all(unit_difference == unit_difference[0]):  # every resample has the same mean: no spread
        return PairedDifference(difference, 0.0, difference, difference, float(test.pvalue), len(counts), len(a))
    interval = stats.bootstrap(
        (sums_a, sums_b, counts), lambda sa, sb, c, axis=-1: (sb.sum(axis) - sa.sum(axis)) / c.sum(axis),
        paired=True, vectorized=True, n_resamples=n_resamples, method="percentile", random_state=rng, batch=BATCH,
    )
    ci = interval.confidence_interval
    return PairedDifference(difference, float(interval.standard_error), float(ci.low), float(ci.high),
                            float(test.pvalue), len(counts), len(a))
