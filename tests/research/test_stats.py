"""Paired statistics against worked examples computed by hand (not by the code under test)."""
from __future__ import annotations

import math

import pytest

from timm_dropres.research.stats import apply_holm, holm, paired


def _t4_two_sided_p(t: float) -> float:
    """Two-sided p of Student's t with 4 degrees of freedom, from its closed-form CDF."""
    u = t * t / (t * t + 4.0)
    cdf = 0.5 + 0.5 * math.sqrt(u) * (1.0 + 0.5 * (1.0 - u))  # I_u(1/2, 2) for nu = 4
    return 2.0 * (1.0 - cdf)


def test_paired_matches_a_worked_example() -> None:
    # differences 0.3, 0.2, 0.6, 0.6, 0.1: mean 0.36, sample variance 0.212 / 4 = 0.053
    a = {0: 5.1, 1: 4.9, 2: 5.6, 3: 5.8, 4: 6.0}
    b = {0: 4.8, 1: 4.7, 2: 5.0, 3: 5.2, 4: 5.9}
    c = paired(a, b)
    se = math.sqrt(0.053 / 5)
    t = 0.36 / se                               # 3.4966
    half = 2.7764451051977987 * se              # t(0.975, 4) from the table
    assert c.n == 5 and c.wins == 5
    assert c.diff == pytest.approx(0.36)
    assert c.t == pytest.approx(t, rel=1e-9)
    assert (c.ci_low, c.ci_high) == pytest.approx((0.36 - half, 0.36 + half), rel=1e-9)
    assert c.p == pytest.approx(_t4_two_sided_p(t), rel=1e-6)
    assert c.p == pytest.approx(0.0250, abs=5e-4)


def test_paired_uses_only_common_seeds_and_handles_degenerate_cases() -> None:
    c = paired({0: 1.0, 1: 2.0, 7: 100.0}, {0: 0.0, 1: 0.5, 3: -5.0})
    assert c.n == 2 and c.diff == pytest.approx(1.25)
    one = paired({0: 1.0}, {0: 0.0})
    assert one.n == 1 and math.isnan(one.p) and one.mark() == '+1.00 (n = 1)'
    flat = apply_holm([paired({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})])[0]
    assert math.isnan(flat.p) and flat.significant is None and 'no test' in flat.mark()
    with pytest.raises(ValueError, match='no common seed'):
        paired({0: 1.0}, {1: 1.0})


def test_holm_matches_a_worked_example() -> None:
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.01, float('nan'), 0.02])  # NaN does not count as a comparison
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_significance_is_decided_after_holm() -> None:
    a = {s: 1.0 + 0.01 * s * s for s in range(5)}
    b = {s: 0.0 for s in range(5)}
    c = paired(a, b)
    assert c.significant is None  # not corrected yet
    c1, c2 = apply_holm([c, paired(b, b | {0: 0.5})])
    assert c1.p_holm == pytest.approx(min(1.0, 2 * c.p)) and c1.significant is True
    assert '*' in c1.mark() and c1.mark().startswith('+1.')
