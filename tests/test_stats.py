"""bounds.stats: paired differences over seeds and test examples, margin tests, Holm, τ and its bootstrap, against
hand computations, scipy and simulation."""

import numpy as np
import pytest
from scipy import stats as sp

from bounds import stats


CASES = {  # first, second: accuracies per seed, paired by seed
    "non-inferior": ([0.801, 0.799, 0.803, 0.800, 0.802], [0.795, 0.797, 0.796, 0.799, 0.794]),
    "worse": ([0.70, 0.71, 0.69, 0.70], [0.80, 0.79, 0.81, 0.80]),
    "undecided": ([0.70, 0.78, 0.74], [0.79, 0.72, 0.77]),
    # a seed effect shared by both methods: unpaired (Welch) this is undecided, paired it is clear
    "seed blocks": ([0.70, 0.80, 0.75], [0.71, 0.815, 0.758]),
}


@pytest.mark.parametrize("case", CASES)
def test_the_paired_seed_part_is_scipys_ttest_rel(case):
    a, b = CASES[case]
    m, alpha = 0.03, 0.05
    p = stats.paired_difference(a, b)
    t = stats.margin_tests(p, m, alpha)
    ci = sp.ttest_rel(a, b).confidence_interval(0.90)
    assert p["diff"] == pytest.approx(np.mean(a) - np.mean(b)) and p["n_seeds"] == len(a)
    assert t["ci"] == pytest.approx([ci.low, ci.high]) and t["level"] == pytest.approx(0.90)
    ni = sp.ttest_rel(np.add(a, m), b, alternative="greater").pvalue  # H0: d ≤ −δ
    worse = sp.ttest_rel(np.add(a, m), b, alternative="less").pvalue  # H0: d ≥ −δ
    above = sp.ttest_rel(np.subtract(a, m), b, alternative="less").pvalue  # H0: d ≥ +δ
    assert t["p_noninferior"] == pytest.approx(ni) and t["p_worse"] == pytest.approx(worse)
    assert t["p_equivalent"] == pytest.approx(max(ni, above))
    assert stats.two_sided(p) == pytest.approx(sp.ttest_rel(a, b).pvalue)
    assert stats.paired_seeds(a, b)["ci"] == pytest.approx(list(sp.ttest_rel(a, b).confidence_interval(0.95)))


def test_pairing_decides_what_welch_cannot():
    a, b = CASES["seed blocks"]
    paired = stats.margin_tests(stats.paired_difference(a, b), 0.03)
    welch = sp.ttest_ind(np.add(a, 0.03), b, equal_var=False, alternative="greater").pvalue
    assert paired["p_noninferior"] < 0.05 < welch


def test_below_three_seeds_nothing_is_decided():
    p = stats.paired_difference([0.8, 0.8], [0.7, 0.7])
    assert p["se"] is None and stats.margin_tests(p, 0.03)["ci"] is None and stats.two_sided(p) is None
    assert stats.margin_verdict(None, None, None) == "undecided"
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_difference([0.8, 0.8, 0.7], [0.7, 0.7])


def _outcomes(correct):
    correct = np.asarray(correct, dtype=float)
    return dict(correct=correct, losses=np.zeros_like(correct), units=np.ones_like(correct))


def test_the_example_bootstrap_is_one_resample_for_both_methods_and_every_seed():
    # 2 seeds × 6 test examples; the accuracy difference D̄ over a resample of examples is the mean of the
    # per-example differences d_i = mean_s (a − b)(s, i): its bootstrap variance is the plug-in var(d_i) / I.
    a = [[1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 1, 1]]
    b = [[1, 0, 0, 1, 0, 0], [1, 0, 1, 1, 0, 1]]
    d = (np.asarray(a, float) - np.asarray(b, float)).mean(axis=0)
    by_hand = d.var(ddof=0) / len(d)
    v = stats.example_variance(_outcomes(a), _outcomes(b), n_resamples=20000, seed=1)
    assert v == pytest.approx(by_hand, rel=0.05)
    # resampled apart for the two methods, the shared examples' correlation would be lost: a larger variance
    apart = (np.asarray(a, float).mean(0).var() + np.asarray(b, float).mean(0).var()) / len(d)
    assert apart > 1.5 * by_hand
    # a perplexity is exp of the mean per-unit loss: the same resample, another metric
    losses = np.array([[0.5, 1.0, 2.0], [0.7, 0.9, 1.1]])
    ppl = stats.task_metric(None, losses, np.array([[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]]), "perplexity")
    assert ppl == pytest.approx(np.exp([(0.5 + 2.0 + 2.0) / 4, (0.7 + 0.9 + 2.2) / 4]))


def _simulated_coverage(S, reps=400, I=150, seed_sd=0.02, example_sd=0.25, seed=0):
    """How often the 90 % interval of a paired difference covers the true difference, data drawn from a crossed
    model: y_m(s, i) = μ_m + u_ms (seed) + e_mi (test example, correlated between methods) + noise."""
    rng = np.random.default_rng(seed)
    hit, delta = 0, 0.02
    for _ in range(reps):
        u, e = rng.normal(0, seed_sd, (2, S)), rng.normal(0, example_sd, (2, I))
        e[1] = 0.6 * e[0] + 0.8 * e[1]
        y = (np.array([0.7 + delta, 0.7])[:, None, None] + u[:, :, None] + e[:, None, :]
             + rng.normal(0, 0.2, (2, S, I)))
        v = stats.example_variance(_outcomes(y[0]), _outcomes(y[1]), n_resamples=200, seed=int(rng.integers(1 << 30)))
        lo, hi = stats.interval(stats.paired_difference(y[0].mean(1), y[1].mean(1), v, I), 0.90)
        hit += lo <= delta <= hi
    return hit / reps


@pytest.mark.parametrize("seeds", [3, 10])
@pytest.mark.parametrize("sds", [(0.02, 0.25), (0.05, 0.05)], ids=["examples dominate", "seeds dominate"])
def test_the_paired_interval_has_its_nominal_coverage_in_simulation(seeds, sds):
    # nominal 90 %; 400 replicates give a standard error of 1.5 points. Seeds only (the test examples' share left
    # out) covers about 70 % when the examples dominate; a normal quantile instead of t at 3 seeds, about 82 %.
    coverage = _simulated_coverage(seeds, seed_sd=sds[0], example_sd=sds[1])
    assert 0.86 <= coverage <= 0.95, coverage


def test_holm_against_a_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04: × 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    assert stats.holm([None]) == [None] and stats.holm([0.2]) == [0.2]


def test_verdicts_are_decided_on_the_adjusted_p():
    assert stats.margin_verdict(0.01, 0.02, 0.99) == "equivalent"
    assert stats.margin_verdict(0.01, 0.30, 0.99) == "non-inferior"
    assert stats.margin_verdict(0.99, 0.99, 0.01) == "worse by more than the margin"
    assert stats.margin_verdict(0.06, 0.06, 0.90) == "undecided"
    assert stats.direction_verdict(+0.5, 0.01) == "holds" and stats.direction_verdict(-0.5, 0.01) == "fails"
    assert stats.direction_verdict(-0.5, 0.01, positive=False) == "holds"
    assert stats.direction_verdict(+0.5, 0.06) == "undecided" and stats.direction_verdict(+0.5, None) == "undecided"


def test_seeds_needed_is_the_first_that_reaches_the_power():
    a, b = [0.80, 0.78, 0.83], [0.79, 0.80, 0.81]
    p = stats.paired_difference(a, b)
    need = stats.seeds_needed(p, 0.03)
    S, sd = need["seeds"], np.std(np.subtract(a, b), ddof=1)

    def reaches(n):  # the power approximation by hand: (d + δ) / se ≥ t_{1−α} + t_{power}, df = n − 1
        return (p["diff"] + 0.03) / (sd / np.sqrt(n)) > sp.t.ppf(0.95, n - 1) + sp.t.ppf(0.8, n - 1)
    assert S > 3 and reaches(S) and not reaches(S - 1)
    # the margin today's three seeds decide is the lower end of the 90 % interval, negated
    assert need["margin_decided"] == pytest.approx(-stats.margin_tests(p, 0.03)["ci"][0])
    # when the test set's own error is wider than the distance to the margin, no number of seeds decides
    wide = stats.paired_difference(a, b, example_var=0.02 ** 2, n_examples=600)
    need = stats.seeds_needed(wide, 0.03)
    assert need["seeds"] is None and need["limited_by"] == "test set"


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


def test_the_two_level_bootstrap_resamples_methods_then_their_seeds():
    rng = np.random.default_rng(0)
    values = [rng.normal(size=3) + g for g in range(5)]  # 5 methods × 3 seeds
    seen = []

    def spread(picks):
        seen.append(picks)
        return float(np.mean([values[g][idx].mean() for g, idx in picks]))
    out = stats.two_level_bootstrap([3] * 5, spread, n_resamples=300)
    assert out["interval"][0] < np.mean([v.mean() for v in values]) < out["interval"][1]
    assert any(len({g for g, _ in picks}) < 5 for picks in seen)  # methods drawn with replacement
    assert any(len(set(idx.tolist())) < 3 for picks in seen for _, idx in picks)  # and seeds within them
    assert 0 < out["p"] <= 1 and out["n_resamples"] == 300
    assert stats.two_level_bootstrap([2, 3], spread) is None  # below three seeds
    undefined = stats.two_level_bootstrap([3, 3], lambda picks: None, n_resamples=20)
    assert undefined["undefined"] == 20 and undefined["interval"] == [0.0, 0.0]  # no ordering: τ taken as 0


def test_the_bounds_cli_says_tau_is_not_informative_below_four_distinct_values(tmp_path, capsys):
    from bounds.__main__ import main
    from tests.test_bounds_cli import fabricate
    # three checkpoints, two distinct MI bounds (cla and rcla train the same P): τ = 1 on paper
    ckpts = [fabricate(tmp_path / m, m, stats=dict(n_train=100, generalization_gap=g, train_loss_max=2.0))
             for m, g in zip(["cla", "rcla", "lora"], [0.1, 0.1, 0.4])]
    assert main([*ckpts, "--no-theorem1", "--out", str(tmp_path / "bounds")]) == 0
    out = capsys.readouterr().out
    assert "Kendall τ (MI bound vs empirical gap Ĝ, n = 3): not informative (2 distinct values" in out
    assert "1.000" not in out.split("Kendall τ (MI bound")[1].splitlines()[0]
    assert "not informative (2 distinct values)" in (tmp_path / "bounds" / "bounds.tex").read_text()
