"""The seed calculator: MDE against the normal approximation and a simulation, and its inverse."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from timm_dropres.research.stats import paired
from timm_dropres.study.power import minimum_detectable_effect, power_of, sd_from_interval, seeds_needed


def test_mde_approaches_the_normal_formula_for_many_seeds():
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    n, sd = 400, 0.6
    assert minimum_detectable_effect(sd, n) == pytest.approx(z * sd / math.sqrt(n), rel=0.01)


def test_power_matches_a_simulated_paired_t_test():
    rng = np.random.default_rng(0)
    n, sd, effect, alpha = 8, 1.0, 1.0, 0.05
    d = rng.normal(effect, sd, size=(20000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    simulated = float(np.mean(np.abs(t) > stats.t.ppf(1 - alpha / 2, n - 1)))
    assert power_of(effect, sd, n, alpha) == pytest.approx(simulated, abs=0.015)


def test_seeds_needed_is_the_first_count_whose_mde_fits():
    sd, effect, level = 0.51, 0.5, 0.05 / 4
    n = seeds_needed(sd, effect, level)
    assert minimum_detectable_effect(sd, n, level) <= effect < minimum_detectable_effect(sd, n - 1, level)
    assert seeds_needed(sd, effect, 0.05) < n  # a smaller family needs fewer seeds


def test_sd_from_interval_inverts_the_paired_interval():
    a = {s: v for s, v in enumerate([1.0, 1.4, 0.7, 1.1, 0.2])}
    b = {s: 0.0 for s in range(5)}
    c = paired(a, b)
    assert sd_from_interval(c.ci_low, c.ci_high, 5) == pytest.approx(np.std(list(a.values()), ddof=1))


def test_degenerate_inputs():
    assert math.isnan(minimum_detectable_effect(0.5, 1))
    assert math.isnan(minimum_detectable_effect(0.0, 5))
    with pytest.raises(ValueError, match='must be > 0'):
        seeds_needed(0.0, 0.5)
    assert 0.99 < power_of(300.0, 1.0, 2, 0.05 / 4) <= 1.0  # a far tail scipy returns as NaN counts as 0
