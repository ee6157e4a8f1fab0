"""The statistics of every report: intervals over seeds, equivalence and direction tests, Kendall τ-b, bootstrap.

One place per formula, each from scipy.stats: the Student-t interval of a mean, Welch's interval of a difference of
means, the two one-sided Welch tests of an equivalence (TOST), Kendall τ-b and its test, and percentile bootstrap
intervals. bounds/ (the bounds CLI) and analysis/ (the study's report) both use it; nothing else computes an interval.
"""
import math
import warnings

import numpy as np

LEVEL = 0.95
ALPHA = 0.05  # each one-sided test of an equivalence; its interval is then the (1 − 2α) = 90 % one
# Intervals from fewer seeds are not worth their name: with n = 2 a nominal 95 % bootstrap interval of a mean
# covers the truth about half the time, and a t-interval needs n − 1 ≥ 2 degrees of freedom to be usable.
MIN_SEEDS_FOR_INTERVAL = 3
# Below 4 distinct values an ordering says little: with 3, even τ = ±1 comes from a random ordering of the
# values one time in three (2 of the 3! orders), with 4 one time in twelve.
MIN_DISTINCT_FOR_TAU = 4
VERDICTS = ("holds", "fails", "undecided")
EQUIVALENCE = ("equivalent", "different", "undecided")


def kendall_tau(x, y):
    """Kendall τ-b between two orderings (scipy.stats.kendalltau); None when undefined (fewer than 2 items, or a
    constant one): tied pairs count for neither ordering."""
    from scipy.stats import kendalltau
    if len(x) < 2:
        return None
    tau = kendalltau(np.asarray(x, dtype=float), np.asarray(y, dtype=float), variant="b").statistic
    return None if math.isnan(tau) else float(tau)


def tau_informative(distinct):
    """Whether an ordering with this many distinct values can say anything by its τ (MIN_DISTINCT_FOR_TAU)."""
    return distinct >= MIN_DISTINCT_FOR_TAU


def kendall_test(x, y):
    """τ-b of x against y with scipy's p-value of τ = 0, the number of items and of distinct x values, and
    whether τ is informative (at least MIN_DISTINCT_FOR_TAU distinct x values)."""
    from scipy.stats import kendalltau
    tau = kendall_tau(x, y)
    p = None if tau is None else float(kendalltau(np.asarray(x, dtype=float), np.asarray(y, dtype=float)).pvalue)
    distinct = len(set(float(v) for v in x))
    return dict(tau=tau, p_value=p, n=len(x), distinct=distinct, informative=tau_informative(distinct))


def mean_interval(values, level=LEVEL):
    """The Student-t interval of the mean of `values` (n − 1 degrees of freedom); None from fewer than
    MIN_SEEDS_FOR_INTERVAL values."""
    from scipy import stats
    values = np.asarray(values, dtype=float)
    if len(values) < MIN_SEEDS_FOR_INTERVAL:
        return None
    sem = stats.sem(values)
    if sem == 0:
        return [float(values.mean())] * 2
    lo, hi = stats.t.interval(level, len(values) - 1, loc=values.mean(), scale=sem)
    return [float(lo), float(hi)]


def welch(a, b, level=LEVEL):
    """mean(a) − mean(b), with Welch's interval at `level` (scipy's ttest_ind, unequal variances) when both have
    n ≥ MIN_SEEDS_FOR_INTERVAL (else None), and the two n."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean())
    ci = None
    if min(len(a), len(b)) >= MIN_SEEDS_FOR_INTERVAL:
        if a.var() + b.var() == 0:  # both constant: the difference is exact
            ci = [diff, diff]
        else:
            interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
            ci = [float(interval.low), float(interval.high)]
    return dict(diff=diff, ci=ci, n=[len(a), len(b)])


def tost(a, b, margin, alpha=ALPHA):
    """Whether mean(a) − mean(b) lies within ±margin, by two one-sided Welch tests at level α each (TOST).

    p_lower tests d ≤ −margin against d > −margin, p_upper d ≥ margin against d < margin (scipy's one-sided
    ttest_ind, a shifted by ∓margin). equivalent: both reject (p = max < α; the same as the (1 − 2α) Welch interval
    inside (−margin, margin)); different: that interval lies wholly outside [−margin, margin]; undecided otherwise,
    and always below MIN_SEEDS_FOR_INTERVAL seeds per side. Returns the verdict, d, the interval, the p's and the n.
    """
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = welch(a, b, level=1 - 2 * alpha)
    out = dict(d, margin=margin, alpha=alpha, level=1 - 2 * alpha, p_lower=None, p_upper=None, p=None,
               verdict="undecided")
    if d["ci"] is None:
        return out
    lo, hi = d["ci"]
    if a.var() + b.var() > 0:
        p_lower = float(stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue)
        p_upper = float(stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue)
        out.update(p_lower=p_lower, p_upper=p_upper, p=max(p_lower, p_upper))
        equivalent = out["p"] < alpha
    else:
        equivalent = -margin < d["diff"] < margin
    if equivalent:
        out["verdict"] = "equivalent"
    elif lo > margin or hi < -margin:
        out["verdict"] = "different"
    return out


def direction(ci, positive=True):
    """A direction claim (the difference is > 0, or < 0 with positive=False) from its interval: holds when the
    interval excludes 0 on the claimed side, fails when it excludes 0 on the other, undecided otherwise (and
    without an interval)."""
    if ci is None:
        return "undecided"
    lo, hi = ci if positive else (-ci[1], -ci[0])
    return "holds" if lo > 0 else "fails" if hi < 0 else "undecided"


def bootstrap_interval(sizes, statistic, n_resamples=2000, level=LEVEL, seed=0):
    """A percentile bootstrap interval (scipy.stats.bootstrap) of statistic(*indices) where each group g of
    sizes[g] observations is resampled with replacement on its own, and `statistic` gets one integer index array
    per group: whatever it computes from one resample (several τ's, say) sees the same resampled observations.
    None when some resample's statistic is undefined (nan) or fewer than MIN_SEEDS_FOR_INTERVAL per group."""
    from scipy import stats
    if not sizes or min(sizes) < MIN_SEEDS_FOR_INTERVAL:
        return None
    groups = [np.arange(n, dtype=float) for n in sizes]

    def on_indices(*idx):
        value = statistic(*(np.asarray(i, dtype=int) for i in idx))
        return math.nan if value is None else value
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # an undefined resample: None below
        result = stats.bootstrap(groups, on_indices, n_resamples=n_resamples, confidence_level=level,
                                 method="percentile", vectorized=False, paired=False, random_state=seed)
    lo, hi = result.confidence_interval
    return None if math.isnan(lo) or math.isnan(hi) else [float(lo), float(hi)]
