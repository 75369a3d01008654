"""Paired statistics for seed-matched experiments: mean difference, 95 % interval, paired t-test, Holm.

Every study in ``docs/results`` compares configurations that share their seeds: the seed fixes the initial
weights, the data order and (in the transfer study) the few-shot subset, identically for every
configuration. So the unit of comparison is the per-seed difference, and the right test is the paired
t-test on those differences (``scipy.stats.ttest_rel``). Several comparisons in one table are corrected
with Holm's step-down method, which scipy does not provide (it offers only FDR control), hence ``holm``.

Example:
    >>> from timm_dropres.research.stats import paired, holm
    >>> c = paired({0: 91.0, 1: 90.5, 2: 91.2}, {0: 90.0, 1: 90.1, 2: 90.2})
    >>> round(c.diff, 3), c.n
    (0.8, 3)
    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Mapping, Optional, Sequence

__all__ = ['PairedComparison', 'paired', 'holm', 'apply_holm']


@dataclass(frozen=True)
class PairedComparison:
    """``a - b`` over the seeds both sides ran.

    Attributes:
        diff: mean of the per-seed differences ``a[s] - b[s]``.
        ci_low: lower end of the two-sided 95 % t interval of that mean (NaN with fewer than 2 seeds).
        ci_high: upper end of the interval.
        t: paired t statistic (NaN with fewer than 2 seeds or when every difference is identical).
        p: two-sided p-value of the paired t-test, uncorrected (NaN where ``t`` is).
        n: number of paired seeds.
        wins: seeds with ``a[s] > b[s]``.
        p_holm: ``p`` after Holm's correction within its table (None until ``apply_holm``).
        alpha: family-wise error rate for ``significant``.
    """

    diff: float
    ci_low: float
    ci_high: float
    t: float
    p: float
    n: int
    wins: int
    p_holm: Optional[float] = None
    alpha: float = 0.05

    @property
    def significant(self) -> Optional[bool]:
        """Holm-corrected p below ``alpha``; None before correction or with fewer than 2 seeds."""
        if self.p_holm is None or math.isnan(self.p_holm):
            return None
        return self.p_holm < self.alpha

    def mark(self, digits: int = 2) -> str:
        """``+0.80 [+0.21, +1.39] p=0.012*`` (``*``: significant after Holm); the p shown is Holm's."""
        f = f'+.{digits}f'
        if self.n < 2 or math.isnan(self.ci_low):
            return f'{self.diff:{f}} (n = {self.n})'
        if math.isnan(self.p):
            return f'{self.diff:{f}} (identical on every seed: no test)'
        p = self.p_holm if self.p_holm is not None else self.p
        star = '*' if self.significant else ''
        return f'{self.diff:{f}} [{self.ci_low:{f}}, {self.ci_high:{f}}] p={_fmt_p(p)}{star}'


def _fmt_p(p: float) -> str:
    return f'{p:.2g}' if p < 0.01 else f'{p:.2f}'


def paired(a: Mapping[int, float], b: Mapping[int, float], alpha: float = 0.05) -> PairedComparison:
    """Paired comparison of ``a`` and ``b``, each keyed by seed; only seeds present in both count.

    Args:
        a: metric per seed for the first configuration.
        b: metric per seed for the second configuration (the reference, e.g. no dropout).
        alpha: family-wise error rate later used by ``significant``.

    Returns:
        The mean per-seed difference ``a - b`` with its 95 % t interval and the paired t-test's p-value.

    Raises:
        ValueError: if the two share no seed.
    """
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f'no common seed: a has {sorted(a)}, b has {sorted(b)}')
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    mean = sum(d) / n
    wins = sum(x > 0 for x in d)
    if n < 2:
        nan = float('nan')
        return PairedComparison(mean, nan, nan, nan, nan, n, wins, alpha=alpha)
    if all(x == d[0] for x in d):  # no spread: the t-test is undefined, so no p-value and no significance
        nan = float('nan')
        return PairedComparison(mean, mean, mean, nan, nan, n, wins, alpha=alpha)
    res = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    ci = res.confidence_interval(0.95)
    return PairedComparison(mean, float(ci.low), float(ci.high), float(res.statistic), float(res.pvalue), n, wins,
                            alpha=alpha)


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN entries stay NaN and do not count).

    Args:
        pvalues: uncorrected p-values of one family of comparisons.

    Returns:
        Adjusted p-values: the k-th smallest of m is multiplied by ``m - k + 1``, made monotone, capped at 1.
    """
    valid = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(valid)
    out = [float('nan')] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


def apply_holm(comparisons: Sequence[PairedComparison]) -> List[PairedComparison]:
    """Set ``p_holm`` on comparisons that form one family (one table column), so ``significant`` works.

    Args:
        comparisons: the family's paired comparisons, e.g. every configuration against no dropout for
            one architecture and metric.

    Returns:
        New ``PairedComparison`` objects (the inputs are frozen and left unchanged), in the input order,
        with ``p_holm`` from ``holm`` over their ``p`` values; NaN p-values stay NaN and do not count.

    Example:
        >>> from timm_dropres.research.stats import paired, apply_holm
        >>> a = paired({0: 91.0, 1: 90.5, 2: 91.2}, {0: 90.0, 1: 90.1, 2: 90.2})
        >>> b = paired({0: 90.4, 1: 90.0, 2: 90.9}, {0: 90.0, 1: 90.1, 2: 90.2})
        >>> [round(c.p_holm, 3) for c in apply_holm([a, b])]
        [0.114, 0.289]
    """
    adjusted = holm([c.p for c in comparisons])
    return [replace(c, p_holm=p) for c, p in zip(comparisons, adjusted, strict=True)]
