"""The statistics of every report: paired differences over seeds and test examples, margin tests, Holm, Kendall τ-b
and its bootstrap over methods and seeds.

One place per formula, each from scipy.stats (statsmodels for Holm) where they have it:
- a paired difference of two methods: per seed s the difference D_s of their metrics on the same test examples
  (the same seed gives both the same split, head initialisation and data order); its mean D̄ has two sources of
  error, the seeds (s²_D / S: scipy's ttest_rel, paired by seed) and the test examples, which every seed and both
  methods share, so they do not average out over seeds (the variance of D̄ over a bootstrap of the test examples,
  the same resample for both methods and every seed: scipy.stats.bootstrap). The two add up; the degrees of freedom
  are Welch–Satterthwaite's. With no example part this is exactly ttest_rel. Coverage measured in simulation:
  tests/test_stats.py.
- margin tests of D̄ at ±δ: non-inferiority (H0: d ≤ −δ), worse by more than δ (H0: d ≥ −δ), equivalence (TOST, both
  one-sided tests at ±δ), and the two-sided test of d = 0 for direction claims; Holm within a family of claims.
- Kendall τ-b and its test (scipy), and a two-level percentile bootstrap (methods, then each method's seeds) for a τ
  and a difference of τ's: an ordering of methods is a sample of methods as much as of seeds.
bounds/ (the bounds CLI) and analysis/ (the study's report) both use it; nothing else computes an interval or a p.
"""
import math
import warnings

import numpy as np

LEVEL = 0.95
ALPHA = 0.05  # each one-sided test of a margin; the margin tests' interval is then the (1 − 2α) = 90 % one
# Intervals from fewer seeds are not worth their name: a t-interval needs n − 1 ≥ 2 degrees of freedom to be usable,
# and with n = 2 a bootstrap over seeds covers the truth about half the time.
MIN_SEEDS_FOR_INTERVAL = 3
# Below 4 distinct values an ordering says little: with 3, even τ = ±1 comes from a random ordering of the
# values one time in three (2 of the 3! orders), with 4 one time in twelve.
MIN_DISTINCT_FOR_TAU = 4
VERDICTS = ("holds", "fails", "undecided")
MARGIN_VERDICTS = ("equivalent", "non-inferior", "worse by more than the margin", "undecided")
POWER = 0.8  # the power the seeds-needed figure is for
MAX_SEEDS = 1000  # beyond this, "more than" (the test set's own error may then be what stops a decision)


# ---- Kendall τ ---------------------------------------------------------------------------------------------------

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


# ---- paired differences: seeds, then test examples ---------------------------------------------------------------

def task_metric(correct, losses, units, metric="accuracy", axis=-1):
    """A split's metric from per-example outcomes along `axis`: accuracy Σ correct / Σ units, perplexity
    exp(Σ loss·units / Σ units) (each example's loss is per unit), as adapters.train computes the split's."""
    total = units.sum(axis=axis)
    if metric == "accuracy":
        return correct.sum(axis=axis) / total
    if metric == "perplexity":
        return np.exp((losses * units).sum(axis=axis) / total)
    raise ValueError(f"no per-example form for metric {metric!r}")


def example_variance(first, second, metric="accuracy", n_resamples=2000, seed=0):
    """The variance of D̄ = mean over seeds of metric(first, s) − metric(second, s) over a bootstrap of the test
    examples (scipy.stats.bootstrap's standard error, squared): one resample of example indices for both methods
    and every seed, since they are all scored on the same examples. `first`, `second`: {"correct", "losses",
    "units"}, each an array seeds × examples (seeds paired row by row)."""
    from scipy import stats
    a = {k: np.asarray(v, dtype=float) for k, v in first.items()}
    b = {k: np.asarray(v, dtype=float) for k, v in second.items()}
    n = a["units"].shape[1]
    if n < 2:
        return 0.0

    def d_bar(idx, axis=-1):
        idx = np.asarray(idx, dtype=int)  # (batch, n) resamples of the example indices
        ma = task_metric(*(a[k][:, idx] for k in ("correct", "losses", "units")), metric)
        mb = task_metric(*(b[k][:, idx] for k in ("correct", "losses", "units")), metric)
        return (ma - mb).mean(axis=0)  # over seeds: one D̄ per resample
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((np.arange(n, dtype=float),), d_bar, n_resamples=n_resamples, vectorized=True,
                              batch=256, method="percentile", random_state=seed)
    return float(res.standard_error) ** 2


def paired_difference(first, second, example_var=0.0, n_examples=None):
    """D̄ = mean over seeds of first − second (paired seed by seed, first[s] with second[s]) and its standard error
    from the seeds (s²_D / S, as scipy's ttest_rel) and the test examples (`example_var`, example_variance()),
    with Welch–Satterthwaite degrees of freedom (S − 1 for the seed part, n_examples − 1 for the example part).
    None for the standard error below MIN_SEEDS_FOR_INTERVAL seeds."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs the same seeds on both sides, got {len(a)} and {len(b)}")
    d = a - b
    S = len(d)
    out = dict(diff=float(d.mean()), n_seeds=S, n_examples=n_examples, se=None, df=None, se_seeds=None,
               se_examples=math.sqrt(example_var) if example_var else 0.0, seed_diffs=d.tolist())
    if S < MIN_SEEDS_FOR_INTERVAL:
        return out
    v_seeds, v_examples = d.var(ddof=1) / S, float(example_var)
    if v_seeds + v_examples == 0:
        return dict(out, se=0.0, df=math.inf, se_seeds=0.0)
    parts = v_seeds ** 2 / (S - 1) + (v_examples ** 2 / (n_examples - 1) if v_examples and n_examples else 0.0)
    df = (v_seeds + v_examples) ** 2 / parts if parts > 0 else math.inf
    return dict(out, se=math.sqrt(v_seeds + v_examples), df=df, se_seeds=math.sqrt(v_seeds))


def _sf(x, df):
    from scipy import stats
    return float(stats.t.sf(x, df))


def interval(p, level):
    """The two-sided t interval of a paired difference at `level`; None without a standard error."""
    from scipy import stats
    if p["se"] is None:
        return None
    half = 0.0 if p["se"] == 0 else float(stats.t.ppf(0.5 + level / 2, p["df"])) * p["se"]
    return [p["diff"] - half, p["diff"] + half]


def _p_greater(p, shift):
    """p of H0: d ≤ shift against d > shift (one-sided t on the paired difference)."""
    if p["se"] == 0:
        return 0.0 if p["diff"] > shift else 1.0
    return _sf((p["diff"] - shift) / p["se"], p["df"])


def margin_tests(p, margin, alpha=ALPHA):
    """The margin tests of a paired difference at ±margin, each one-sided at α: p_noninferior (H0: d ≤ −δ),
    p_worse (H0: d ≥ −δ: worse by more than δ), p_equivalent (TOST: max of H0 d ≤ −δ and H0 d ≥ +δ), with the
    (1 − 2α) interval (each end a one-sided bound at α). All None below MIN_SEEDS_FOR_INTERVAL seeds."""
    if p["se"] is None:
        return dict(margin=margin, alpha=alpha, level=1 - 2 * alpha, ci=None, p_noninferior=None, p_worse=None,
                    p_equivalent=None)
    p_ni = _p_greater(p, -margin)
    p_worse = 1.0 - p_ni if p["se"] > 0 else (0.0 if p["diff"] < -margin else 1.0)
    p_superior = 1.0 - _p_greater(p, margin) if p["se"] > 0 else (1.0 if p["diff"] >= margin else 0.0)
    return dict(margin=margin, alpha=alpha, level=1 - 2 * alpha, ci=interval(p, 1 - 2 * alpha), p_noninferior=p_ni,
                p_worse=p_worse, p_equivalent=max(p_ni, p_superior))


def two_sided(p):
    """p of H0: d = 0 (two-sided t on the paired difference); None below MIN_SEEDS_FOR_INTERVAL seeds."""
    if p["se"] is None:
        return None
    if p["se"] == 0:
        return 0.0 if p["diff"] != 0 else 1.0
    return min(1.0, 2 * _sf(abs(p["diff"]) / p["se"], p["df"]))


def seeds_needed(p, margin, alpha=ALPHA, power=POWER):
    """What it would take to decide a margin claim at the observed paired difference and variances: the seeds S for
    `power` to show non-inferiority (when d > −δ) or worse-by-more-than-δ (when d < −δ) at one-sided α, the
    example part held fixed (every seed is scored on the same test set, so more seeds do not shrink it), and the
    margin today's seeds decide non-inferiority at (−(lower (1 − 2α) bound)). seeds: None when no S up to MAX_SEEDS
    does (`limited_by`: "test set" when the example part alone is too wide, else "seeds")."""
    from scipy import stats
    if p["se"] is None:
        return dict(power=power, seeds=None, limited_by=None, margin_decided=None)
    gap = abs(p["diff"] + margin)
    v_seed = (p["se_seeds"] or 0.0) ** 2 * p["n_seeds"]  # s²_D
    v_ex = (p["se_examples"] or 0.0) ** 2
    margin_decided = float(stats.t.ppf(1 - alpha, p["df"])) * p["se"] - p["diff"] if p["se"] > 0 else -p["diff"]
    seeds = None
    for S in range(2, MAX_SEEDS + 1):
        v = v_seed / S + v_ex
        df = (v ** 2 / ((v_seed / S) ** 2 / (S - 1) + (v_ex ** 2 / (p["n_examples"] - 1) if v_ex else 0.0))
              if v > 0 else math.inf)
        need = (stats.t.ppf(1 - alpha, df) + stats.t.ppf(power, df)) * math.sqrt(v)
        if gap > need:
            seeds = S
            break
    limited = None
    if seeds is None:
        limited = "test set" if gap <= (stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)) * math.sqrt(v_ex) \
            else "seeds"
    return dict(power=power, seeds=seeds, limited_by=limited, margin_decided=margin_decided)


def paired_seeds(first, second, level=LEVEL):
    """A paired difference over seeds only (scipy's ttest_rel: no per-example part), with its two-sided p and its
    interval at `level`: what a diagnostic measured once per run (intruders, λ_max, Ĝ) is compared by."""
    p = paired_difference(first, second)
    return dict(p, p=two_sided(p), ci=interval(p, level), level=level)


def holm(pvalues):
    """Holm's step-down adjustment (statsmodels' multipletests, method "holm") of the p-values of one family; None
    entries stay None and are not counted."""
    from statsmodels.stats.multitest import multipletests
    given = [i for i, p in enumerate(pvalues) if p is not None]
    out = [None] * len(pvalues)
    if given:
        adjusted = multipletests([pvalues[i] for i in given], method="holm")[1]
        for i, q in zip(given, adjusted):
            out[i] = float(q)
    return out


def direction_verdict(diff, p_holm, positive=True, alpha=1 - LEVEL):
    """A direction claim (the difference is > 0, or < 0 with positive=False) from its Holm-adjusted two-sided p:
    holds when p_holm < α on the claimed side, fails when p_holm < α on the other, undecided otherwise."""
    holds, fails, undecided = VERDICTS
    if p_holm is None or p_holm >= alpha:
        return undecided
    return holds if (diff > 0) == positive else fails


def margin_verdict(p_noninferior_holm, p_equivalent_holm, p_worse_holm, alpha=ALPHA):
    """The verdict of a margin claim from its Holm-adjusted p's: equivalent (TOST), else non-inferior, else worse by
    more than the margin, else undecided."""
    # In this order: equivalence implies non-inferiority; worse-by-more-than-δ excludes both.
    for verdict, p in zip(MARGIN_VERDICTS, (p_equivalent_holm, p_noninferior_holm, p_worse_holm)):
        if p is not None and p < alpha:
            return verdict
    return MARGIN_VERDICTS[-1]


# ---- bootstraps -------------------------------------------------------------------------------------------------

def two_level_bootstrap(sizes, statistic, n_resamples=2000, level=LEVEL, seed=0):
    """A percentile bootstrap over two levels: the groups (methods) drawn with replacement, then within each drawn
    group its members (seeds) drawn with replacement; statistic(picks) gets [(group, member indices)] of one
    resample. scipy.stats.bootstrap resamples one level only, hence numpy's generator here.

    An undefined statistic (None: every drawn method ties, say) counts as 0, no ordering. Returns {interval, p (the
    bootstrap's two-sided p of 0: twice the smaller tail, at most 1), n_resamples, undefined (how many counted as
    0)}; None below MIN_SEEDS_FOR_INTERVAL members in some group or fewer than 2 groups."""
    if len(sizes) < 2 or min(sizes) < MIN_SEEDS_FOR_INTERVAL:
        return None
    rng = np.random.default_rng(seed)
    values, undefined = np.empty(n_resamples), 0
    for i in range(n_resamples):
        groups = rng.integers(0, len(sizes), len(sizes))
        picks = [(int(g), rng.integers(0, sizes[g], sizes[g])) for g in groups]
        value = statistic(picks)
        undefined += value is None
        values[i] = 0.0 if value is None else value
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    # +1 on both counts: the observed statistic is one of the resamples, so no p is 0 from a finite bootstrap
    tails = [(np.sum(values <= 0) + 1) / (n_resamples + 1), (np.sum(values >= 0) + 1) / (n_resamples + 1)]
    p = min(1.0, 2 * min(tails))
    return dict(interval=[float(lo), float(hi)], p=float(p), n_resamples=n_resamples, undefined=undefined)


# ---- methods ranked across tasks ---------------------------------------------------------------------------------
# A suite's table: scores tasks × methods, each task's row oriented so that higher is better (a perplexity negated).
# Ranks, Friedman's test and the pairwise post-hoc over the tasks every method completed, as benchmark papers rank
# methods across data sets.

def ranks(scores):
    """Each method's rank in each task (rows), 1 = best, methods that tie sharing the mean of the ranks they span
    (scipy.stats.rankdata, method "average"). `scores`: tasks × methods, higher is better."""
    from scipy import stats
    return np.vstack([stats.rankdata(-np.asarray(row, dtype=float), method="average") for row in np.atleast_2d(scores)])


def friedman(scores):
    """Friedman's test that every method ranks alike over the tasks (scipy.stats.friedmanchisquare: tasks are the
    blocks, ties corrected): {statistic, p, tasks, methods}; None with fewer than 3 methods or 2 tasks. When every
    task ties every method the statistic is undefined (0/0): no evidence of a difference, statistic 0 and p 1."""
    from scipy import stats
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    n, k = scores.shape
    if k < 3 or n < 2:
        return None
    if all(len(set(row)) == 1 for row in scores.tolist()):
        return dict(statistic=0.0, p=1.0, tasks=n, methods=k)
    res = stats.friedmanchisquare(*scores.T)
    return dict(statistic=float(res.statistic), p=float(res.pvalue), tasks=n, methods=k)


POSTHOC_NAME = "Wilcoxon signed-rank, Holm"
POSTHOC = ("the Wilcoxon signed-rank test of each pair of methods over the tasks (scikit-posthocs' posthoc_wilcoxon, "
           "zero differences split), Holm within the pairs: a pair's verdict rests on the two methods' own paired "
           "differences, task by task, and not on the mean ranks of whichever other methods the suite includes, "
           "as the Nemenyi test's does")


def posthoc(scores, methods):
    """Pairwise comparisons after a Friedman test (POSTHOC says which and why): {"p": {a: {b: Holm-adjusted p}},
    "min_p": the smallest two-sided p one pair can reach with this many tasks (an exact Wilcoxon test can go no lower
    than 2 / 2^n, before Holm), "method"}; None with fewer than 2 methods or 2 tasks."""
    import pandas as pd
    import scikit_posthocs as sp
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    n, k = scores.shape
    if k < 2 or n < 2:
        return None
    long = pd.DataFrame({"score": scores.T.ravel(), "method": np.repeat(methods, n)})
    with warnings.catch_warnings():  # an exact p is not available with zero differences: scipy says so each time
        warnings.simplefilter("ignore")
        table = sp.posthoc_wilcoxon(long, val_col="score", group_col="method", zero_method="zsplit", p_adjust="holm")
    p = {a: {b: float(table.loc[a, b]) for b in methods if b != a} for a in methods}
    return dict(p=p, min_p=2 / 2 ** n, method=POSTHOC_NAME)
