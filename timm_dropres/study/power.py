"""How many seeds a paired comparison needs: minimum detectable effect and the seed calculator.

A study compares configurations paired over seeds, with a two-sided paired t-test on the per-seed differences
(:func:`timm_dropres.research.stats.paired`). With ``n`` seeds and a standard deviation ``sd`` of those
differences, the test statistic follows a non-central t distribution with ``n - 1`` degrees of freedom and
non-centrality ``delta * sqrt(n) / sd``; the **minimum detectable effect** (MDE) is the ``delta`` the test finds
with the given power. Holm's correction over a family of ``m`` comparisons tests its smallest p-value at
``alpha / m``; the MDE here uses that level (Bonferroni's, the strictest step of Holm), so it is an upper bound
for the other steps. scipy has the distributions but no paired-t power solver, hence these few lines.

Example:
    >>> round(minimum_detectable_effect(0.5, 5), 2)  # sd 0.5 points, 5 seeds, alpha 0.05, power 0.8
    0.84
    >>> seeds_needed(0.5, 0.5, alpha=0.05 / 4)  # resolve 0.5 points, first Holm step of 4 comparisons
    15
"""
from __future__ import annotations

import math

__all__ = ['power_of', 'minimum_detectable_effect', 'seeds_needed', 'sd_from_interval']


def power_of(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` to detect a true mean difference ``effect``."""
    from scipy import stats

    if n < 2 or sd <= 0:
        return float('nan')
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(effect) * math.sqrt(n) / sd
    upper, lower = float(stats.nct.sf(crit, df, nc)), float(stats.nct.cdf(-crit, df, nc))
    # scipy's non-central t returns NaN for far tails (seen for the lower tail at nc ~ 40, df 1): there the
    # probability is below 1e-16, so it counts as 0
    return (upper if math.isfinite(upper) else 0.0) + (lower if math.isfinite(lower) else 0.0)


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference the paired t-test detects with ``power`` (same units as ``sd``).

    Args:
        sd: standard deviation of the per-seed differences.
        n: number of paired seeds.
        alpha: the test's two-sided level (``alpha / m`` for the first step of Holm over ``m`` comparisons).
        power: the wanted power.

    Returns:
        The effect; NaN with fewer than 2 seeds or a zero/undefined ``sd``.
    """
    from scipy.optimize import brentq

    if n < 2 or not sd > 0 or not math.isfinite(sd):
        return float('nan')
    hi = sd
    while power_of(hi, sd, n, alpha) < power:
        hi *= 2
    return float(brentq(lambda d: power_of(d, sd, n, alpha) - power, 0.0, hi, xtol=1e-6 * sd))


def seeds_needed(sd: float, effect: float, alpha: float = 0.05, power: float = 0.8, max_seeds: int = 10_000) -> int:
    """The fewest paired seeds whose minimum detectable effect is at most ``effect``.

    Args:
        sd: standard deviation of the per-seed differences (measured).
        effect: the effect to resolve (same units).
        alpha: the two-sided level (``alpha / m`` under Holm over ``m`` comparisons).
        power: the wanted power.
        max_seeds: give up above this.

    Returns:
        The seed count (at least 2).

    Raises:
        ValueError: a non-positive ``sd`` or ``effect``, or more than ``max_seeds`` needed.
    """
    if not sd > 0 or not effect > 0:
        raise ValueError(f'sd and effect must be > 0, got sd={sd}, effect={effect}')
    n = 2
    while power_of(effect, sd, n, alpha) < power:
        n += 1
        if n > max_seeds:
            raise ValueError(f'more than {max_seeds} seeds needed to resolve {effect} with sd {sd}')
    return n


def sd_from_interval(low: float, high: float, n: int, level: float = 0.95) -> float:
    """The SD of the per-seed differences behind a paired t interval ``[low, high]`` from ``n`` seeds.

    Recovers the measured paired SD from a published report that lists intervals but not the SD.

    Example:
        >>> round(sd_from_interval(-0.65, 0.61, 5), 3)
        0.507
    """
    from scipy import stats

    if n < 2:
        raise ValueError(f'an interval needs at least 2 seeds, got n={n}')
    half = (high - low) / 2
    return half * math.sqrt(n) / float(stats.t.ppf(0.5 + level / 2, n - 1))
