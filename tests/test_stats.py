"""bounds.stats: the equivalence test (TOST), direction verdicts, intervals, τ and its bootstrap, against hand
computations and scipy."""
import math

import numpy as np
import pytest
from scipy import stats as sp

from bounds import stats


def _welch_by_hand(a, b):
    """d, its standard error and the Welch–Satterthwaite degrees of freedom, from the textbook formulas."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return a.mean() - b.mean(), math.sqrt(va + vb), dof


CASES = {  # first, second, verdict at ±0.03
    "equivalent": ([0.801, 0.799, 0.803, 0.800, 0.802], [0.795, 0.797, 0.796, 0.799, 0.794], "equivalent"),
    "different": ([0.70, 0.71, 0.69, 0.70], [0.80, 0.79, 0.81, 0.80], "different"),
    "undecided": ([0.70, 0.78, 0.74], [0.79, 0.72, 0.77], "undecided"),
    "one side only": ([0.760, 0.764, 0.758, 0.762], [0.800, 0.770, 0.785, 0.790], "undecided"),
}


@pytest.mark.parametrize("case", CASES)
def test_tost_against_a_hand_computation_and_scipys_one_sided_tests(case):
    a, b, verdict = CASES[case]
    m, alpha = 0.03, 0.05
    t = stats.tost(a, b, m, alpha)
    d, se, dof = _welch_by_hand(a, b)
    p_lower = sp.t.sf((d + m) / se, dof)   # H0: d ≤ −m
    p_upper = sp.t.cdf((d - m) / se, dof)  # H0: d ≥ +m
    assert t["diff"] == pytest.approx(d) and t["n"] == [len(a), len(b)]
    assert t["p_lower"] == pytest.approx(p_lower) and t["p_upper"] == pytest.approx(p_upper)
    assert t["p_lower"] == pytest.approx(sp.ttest_ind(np.add(a, m), b, equal_var=False, alternative="greater").pvalue)
    assert t["p_upper"] == pytest.approx(sp.ttest_ind(np.subtract(a, m), b, equal_var=False, alternative="less").pvalue)
    half = sp.t.ppf(1 - alpha, dof) * se  # the 90 % interval: each end a one-sided 95 % bound
    assert t["ci"] == pytest.approx([d - half, d + half]) and t["level"] == pytest.approx(0.90)
    assert t["verdict"] == verdict
    # equivalent exactly when the 90 % interval lies inside the margin
    assert (t["verdict"] == "equivalent") == (-m < t["ci"][0] and t["ci"][1] < m) == (max(p_lower, p_upper) < alpha)


def test_tost_is_undecided_below_three_seeds_and_the_difference_is_first_minus_second():
    t = stats.tost([0.80, 0.80], [0.80, 0.80], 0.03)
    assert t["verdict"] == "undecided" and t["ci"] is None
    a, b = CASES["different"][:2]
    assert stats.tost(a, b, 0.03)["diff"] == pytest.approx(-0.10)
    assert stats.tost(b, a, 0.03)["diff"] == pytest.approx(+0.10)


def test_direction_verdicts_from_intervals():
    assert stats.direction([0.1, 0.3]) == "holds" and stats.direction([-0.3, -0.1]) == "fails"
    assert stats.direction([-0.1, 0.3]) == "undecided" and stats.direction(None) == "undecided"
    assert stats.direction([-0.3, -0.1], positive=False) == "holds"
    assert stats.direction([0.1, 0.3], positive=False) == "fails"


def test_welch_interval_is_scipys():
    a, b = [0.80, 0.79, 0.81], [0.70, 0.72, 0.69]
    w = stats.welch(a, b)
    ci = sp.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert w["diff"] == pytest.approx(np.mean(a) - np.mean(b)) and w["ci"] == pytest.approx([ci.low, ci.high])
    assert stats.welch(a[:2], b)["ci"] is None


def test_mean_interval_is_student_t_from_three_values():
    v = [1.0, 2.0, 4.0]
    lo, hi = sp.t.interval(0.95, 2, loc=np.mean(v), scale=sp.sem(v))
    assert stats.mean_interval(v) == pytest.approx([lo, hi]) and stats.mean_interval(v[:2]) is None


def test_tau_is_not_informative_below_the_stated_number_of_distinct_values():
    # three checkpoints, two distinct values: τ = 1 on paper, not informative
    t = stats.kendall_test([1.0, 1.0, 2.0], [0.1, 0.1, 0.3])
    assert t["tau"] == pytest.approx(1.0) and t["distinct"] == 2 and not t["informative"]
    many = stats.kendall_test([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.4, 0.3])
    assert many["informative"] and stats.MIN_DISTINCT_FOR_TAU == 4
    assert many["p_value"] == pytest.approx(sp.kendalltau([1, 2, 3, 4], [0.1, 0.2, 0.4, 0.3]).pvalue)
    assert stats.kendall_tau([1.0, 1.0], [2.0, 3.0]) is None


def test_bootstrap_resamples_every_group_and_shares_the_resample():
    rng = np.random.default_rng(0)
    groups = [rng.normal(size=5), rng.normal(size=4) + 1]
    seen = []

    def diff(*picks):
        seen.append(picks)
        return groups[1][picks[1]].mean() - groups[0][picks[0]].mean()
    ci = stats.bootstrap_interval([5, 4], diff, n_resamples=300)
    assert ci[0] < groups[1].mean() - groups[0].mean() < ci[1]
    assert any(len(set(p[0].tolist())) < 5 for p in seen)  # drawn with replacement
    assert stats.bootstrap_interval([2, 4], diff) is None  # below three per group
    assert stats.bootstrap_interval([3, 3], lambda *p: None, n_resamples=20) is None  # undefined statistic


def test_the_bounds_cli_says_tau_is_not_informative_below_four_distinct_values(tmp_path, capsys):
    from bounds.__main__ import main
    from tests.test_bounds_cli import fabricate
    # three checkpoints, two distinct MI bounds (cla and rcla train the same P): τ = 1 on paper
    ckpts = [fabricate(tmp_path / m, m, stats=dict(n_train=100, generalization_gap=g, train_loss_max=2.0))
             for m, g in zip(["cla", "rcla", "lora"], [0.1, 0.1, 0.4])]
    assert main([*ckpts, "--no-theorem1"]) == 0
    out = capsys.readouterr().out
    assert "Kendall τ (MI bound vs empirical gap Ĝ, n = 3): not informative (2 distinct values" in out
    assert "1.000" not in out.split("Kendall τ (MI bound")[1].splitlines()[0]
    assert main([*ckpts, "--no-theorem1", "--format", "latex"]) == 0
    assert "not informative (2 distinct values)" in capsys.readouterr().out
