"""Statistics for learning-versus-forgetting curves: Pareto fronts, bootstrap confidence
intervals over seeds, and a paired comparison of two methods over the same seeds.

A *point* is ``(learning, forgetting)``: more learning is better, less forgetting is better.

* :func:`pareto_front`: the indices of the points no other point dominates, ordered by
  learning.
* :func:`forgetting_at_learning`: the forgetting a front reaches at a given learning, by linear
  interpolation between its points (``nan`` outside the front's learning range), so methods
  are compared *at equal learning* rather than at one arbitrary operating point each.
* :func:`bootstrap_ci`: the percentile bootstrap confidence interval of a mean over seeds.
* :func:`paired_test`: two methods measured on the same seeds: the mean paired difference, its
  paired-bootstrap confidence interval, the paired t-test and the exact sign-flip
  (permutation) test. With 5 seeds the sign-flip test cannot go below ``2 / 2**5 = 0.0625``
  (nor can the Wilcoxon signed-rank test), so the t-test is the decision rule and the
  sign-flip p-value is reported beside it as the assumption-free check.
* :func:`holm`: Holm-Bonferroni adjusted p-values, for the many (learning level, pair) tests
  of one sweep.

>>> pareto_front([0.1, 0.3, 0.2], [0.1, 0.2, 0.3]).tolist()   # (0.2, 0.3) is dominated by (0.3, 0.2)
[0, 1]
>>> round(forgetting_at_learning([0.1, 0.3], [0.1, 0.2], 0.2), 6)
0.15
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from jpeft.errors import InputValidationError

__all__ = ["pareto_front", "forgetting_at_learning", "bootstrap_ci", "paired_test", "holm"]


def _vector(x, name) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise InputValidationError(f"{name} must be a 1-D sequence of numbers, found shape {a.shape}.")
    return a


def _finite(a, name) -> np.ndarray:
    if not np.all(np.isfinite(a)):
        raise InputValidationError(f"{name} must be finite, found {a.tolist()}; drop the seeds of diverged runs (from "
                                   "every method, so that the pairs stay paired) first.")
    return a


def _points(learning, forgetting) -> tuple[np.ndarray, np.ndarray]:
    lx, fx = _vector(learning, "learning"), _vector(forgetting, "forgetting")
    if lx.shape != fx.shape:
        raise InputValidationError(f"learning and forgetting must have the same length, found {lx.size} and {fx.size}.")
    if not (np.all(np.isfinite(lx)) and np.all(np.isfinite(fx))):
        raise InputValidationError("learning and forgetting must be finite; drop the points of diverged runs first.")
    return lx, fx


def pareto_front(learning: Sequence[float], forgetting: Sequence[float]) -> np.ndarray:
    """Indices of the non-dominated points, in increasing learning (ties: increasing forgetting).

    Point ``j`` dominates ``i`` when it learns at least as much and forgets at most as much,
    and is strictly better in one of the two. Identical points do not dominate each other,
    so both are kept.

    >>> pareto_front([1, 2, 2, 3], [1, 1, 2, 5]).tolist()
    [1, 3]
    """
    lx, fx = _points(learning, forgetting)
    keep = []
    for i in range(lx.size):
        better_eq = (lx >= lx[i]) & (fx <= fx[i])
        strict = (lx > lx[i]) | (fx < fx[i])
        if not np.any(better_eq & strict):
            keep.append(i)
    keep = np.asarray(keep, dtype=np.int64)
    return keep[np.lexsort((fx[keep], lx[keep]))]


def forgetting_at_learning(learning: Sequence[float], forgetting: Sequence[float], level: float) -> float:
    """The forgetting of the Pareto front of the points at learning ``level``: linear
    interpolation between the two front points around it; ``nan`` when ``level`` lies outside
    the front's learning range (no extrapolation: a method that never learned that much has
    no value there).

    >>> round(forgetting_at_learning([0.1, 0.2, 0.4], [0.0, 0.1, 0.5], 0.3), 6)
    0.3
    >>> forgetting_at_learning([0.1, 0.2], [0.0, 0.1], 0.5)
    nan
    """
    lx, fx = _points(learning, forgetting)
    if lx.size == 0:
        raise InputValidationError("forgetting_at_learning needs at least one point, found none.")
    front = pareto_front(lx, fx)
    fl, ff = lx[front], fx[front]
    if not fl[0] <= level <= fl[-1]:
        return float("nan")
    # the front is increasing in learning and in forgetting; equal-learning ties keep the lowest forgetting
    ul, first = np.unique(fl, return_index=True)
    return float(np.interp(level, ul, ff[first]))


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (one per seed):
    resample the values with replacement ``n_resamples`` times and take the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means.
    (The BCa variant needs a jackknife estimate that is unstable with 5 values.) With fewer
    than 2 values the interval is ``(nan, nan)``. With few values it undercovers: for 5
    normal values a nominal 95 % interval holds the true mean about 84 % of the time (the
    plug-in spread and normal quantiles, where the t interval uses ``t(n-1)``).

    >>> lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    >>> 1.0 < lo < 3.0 < hi < 5.0
    True
    """
    x = _finite(_vector(values, "values"), "values")
    if not 0 < confidence < 1:
        raise InputValidationError(f"confidence must be in (0, 1), found {confidence}.")
    if n_resamples < 1:
        raise InputValidationError(f"n_resamples must be >= 1, found {n_resamples}.")
    if x.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (int(n_resamples), x.size))].mean(axis=1)
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(lo), float(hi)


def rounding_of(*values) -> float:
    """The float64 rounding of numbers as large as the largest of ``values`` (arrays): 8 units
    in its last place. Values that differ by no more say nothing (``0.3 - 0.2`` and
    ``0.5 - 0.4`` differ in the last bit): a spread within it is no spread."""
    return 8 * np.finfo(np.float64).eps * max((float(np.max(np.abs(v))) for v in values if np.size(v)), default=0.0)


def paired_test(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 10_000,
                seed: int = 0) -> dict:
    """Compares two methods measured on the same seeds (``a[k]`` and ``b[k]`` share seed ``k``).

    Returns a dict with ``n``; ``mean_diff`` (mean of ``a - b``); ``ci`` (the percentile
    bootstrap interval of the mean difference, resampling seeds, i.e. pairs);
    ``t`` and ``p_t`` (the two-sided paired t-test, ``scipy.stats.ttest_rel``; differences that are
    all equal, to their rounding, have no spread: ``t = +-inf`` and ``p_t`` is the sign-flip p, or
    both ``nan`` when the differences are 0); ``p_sign_flip``
    (the exact two-sided sign-flip permutation test of the mean difference over all
    ``2**n`` sign patterns: assumption-free, but never below ``2 / 2**n``).

    >>> r = paired_test([1.0, 2.0, 3.0], [0.5, 1.4, 2.6])
    >>> r["n"], round(r["mean_diff"], 3)
    (3, 0.5)
    """
    x, y = _finite(_vector(a, "a"), "a"), _finite(_vector(b, "b"), "b")
    if x.shape != y.shape:
        raise InputValidationError(f"paired_test needs one value of each method per seed, found {x.size} and {y.size}.")
    if x.size < 2:
        raise InputValidationError(f"paired_test needs at least 2 paired seeds, found {x.size}.")
    if x.size > 20:
        raise InputValidationError(f"paired_test enumerates all 2**n sign patterns; n = {x.size} seeds is over its limit of 20.")
    d = x - y
    lo, hi = bootstrap_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed)
    obs = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    flipped = np.abs((signs * d).mean(axis=1))
    p_flip = float(np.mean(flipped >= obs - 1e-12 * max(1.0, obs)))
    # no spread beyond the rounding of a - b (0.3 - 0.2 and 0.5 - 0.4 differ in the last bit): the t
    # statistic is undefined (scipy gave t ~ 1e16 and p ~ 1e-31 from the rounding alone). Equal nonzero
    # differences give t = +-inf, and p(t) is the sign-flip p: no spread in a few seeds is no evidence that
    # there is none, and p(t) = 0 made two seeds with one equal difference "significant" at any level.
    rounding = rounding_of(x, y)
    if np.ptp(d) <= rounding:
        t, p_t = (float("nan"), float("nan")) if abs(d.mean()) <= rounding else (math.copysign(math.inf, d.mean()), p_flip)
    else:
        import scipy.stats  # here, not at the top: scipy.stats costs ~1.3 s of every `jpeft` start-up

        res = scipy.stats.ttest_rel(x, y)
        t, p_t = float(res.statistic), float(res.pvalue)
    return {"n": int(d.size), "mean_diff": float(d.mean()), "ci": (lo, hi), "t": t, "p_t": p_t, "p_sign_flip": p_flip}


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order as given): the ``i``-th smallest of ``m``
    becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``. Rejecting where the adjusted value is
    below ``alpha`` keeps the chance of any false rejection among the ``m`` tests below
    ``alpha``. ``nan`` entries are left ``nan`` and not counted.

    >>> holm([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.06, 0.06]
    """
    p = _vector(pvalues, "pvalues")
    out = np.full(p.shape, np.nan)
    ok = np.nonzero(np.isfinite(p))[0]
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = ok.size
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out
