"""The paper's claims, each decided on this study by a test that can say "undecided", with its family's
multiplicity controlled (Holm) and every comparison paired.

Three families, Holm within each (bounds.stats.holm), every verdict decided on its Holm-adjusted p:
- accuracy: each sparse method against its parameter-matched baseline (cla, rcla vs asym: the same P with a fixed A;
  c3la, rc3la vs rac: the same chained P) and against LoRA. "Competitive", as the paper means it, is
  non-inferiority at margin δ (3 points by default): one-sided, H0 "worse by δ or more". Beside it the TOST
  equivalence at ±δ and the opposite one-sided test, "worse by more than δ". The difference is paired by seed (the
  same seed gives both methods the same split, head initialisation and data order: checked from the runs'
  `pairing` records) and its error has two parts, the seeds and the test examples both methods are scored on
  (bounds.stats.paired_difference). Each claim also says what would decide it: the seeds for 80 % power at the
  observed difference and variances, or the margin today's seeds decide.
- direction: each chained method against its one-link twin (more intruders, sharper, a lower Ĝ), paired by seed
  (ttest_rel): holds when p_holm < α on the claimed side, fails when on the other, else undecided; both methods'
  training lengths (steps, and the chain's best link) are shown, since a longer run can explain a difference.
- tau: the MI bound against every other diagnostic, τ(bound, Ĝ) − τ(other, Ĝ), with a two-level bootstrap over the
  methods compared and their seeds (an ordering of methods is a sample of methods as much as of seeds).
Every difference is first − second, named as in the claim. A claim resting on a run that stopped at its cap while
validation loss still improved (converged: false) says so.
"""
import numpy as np

from adapters.errors import AdapterError
from adapters.methods import METHODS
from analysis.records import DIAGNOSTICS, OUTCOMES
from analysis.summary import tau_difference
from bounds import stats

MARGIN = 0.03  # "within a few points" of accuracy: 3 points, as a difference of accuracies in [0, 1]
# Sparse method -> its parameter-matched baseline (same trained-scalar count P: the README's table of the methods).
MATCHED = {"cla": "asym", "rcla": "asym", "c3la": "rac", "rc3la": "rac"}
# Each chained method and its one-link twin, from the registry (the sparse ones first, as the paper discusses them).
CHAINS = sorted(((name, m.adapter.twin) for name, m in METHODS.items() if m.adapter is not None and m.adapter.chained),
                key=lambda pair: pair[0] not in MATCHED)
# What a chained method is claimed to do against its twin: quantity, the claim's words, the claimed sign.
DIRECTIONS = (("intruders", "more intruders", True), ("sharpness", "sharper (loss rise)", True),
              ("hessian", "sharper (λ_max)", True), ("gap", "a lower Ĝ (not a worse one)", False))
FAMILIES = {"accuracy": "each sparse method's test accuracy against a baseline (non-inferiority, equivalence and "
                        "worse-by-more-than-δ at ±δ)",
            "direction": "each chained method against its one-link twin (more intruders, sharper, a lower Ĝ)",
            "tau": "the MI bound against each other diagnostic (difference of Kendall τ with Ĝ)"}
PAIRING_KEYS = ("split_sha256", "head_init_sha256", "data_order_sha256")


def _by_seed(records, method):
    return {r["seed"]: r for r in records if r["method"] == method}


def paired_runs(records, first, second):
    """The two methods' runs paired by seed (the seeds both have, in order). Runs of one seed must share the split,
    the head initialisation and the data order (each run's training_stats `pairing`, where recorded): a pair that
    does not is refused, since its difference would mix the methods with those."""
    a, b = _by_seed(records, first), _by_seed(records, second)
    seeds = sorted(set(a) & set(b))
    for s in seeds:
        pa, pb = a[s]["stats"].get("pairing"), b[s]["stats"].get("pairing")
        if pa and pb:
            differ = [k for k in PAIRING_KEYS if pa.get(k) != pb.get(k)]
            if differ:
                raise AdapterError(f"seed {s}: {a[s]['path']} and {b[s]['path']} differ in {', '.join(differ)}; "
                                   "runs of one seed must share them to be compared paired")
    return [a[s] for s in seeds], [b[s] for s in seeds]


def _not_converged(records, methods):
    """The methods among `methods` with a run that hit its cap still improving."""
    return [m for m in methods if any(r["method"] == m and r.get("converged") is False for r in records)]


def _lengths(runs):
    """How long each run trained: steps (stopped_at) per seed, and a chain's best link per seed."""
    return dict(steps=[r["stats"].get("stopped_at") for r in runs],
                best_link=[r["stats"].get("best_link") for r in runs])


def _outcomes(runs):
    """{"correct", "losses", "units"}: arrays seeds × test examples, or None when a run lacks them."""
    if any(r.get("outcomes") is None for r in runs):
        return None
    return {k: np.stack([np.asarray(r["outcomes"][k], dtype=float) for r in runs]) for k in ("correct", "losses",
                                                                                            "units")}


def _accuracy_claim(records, m, base, margin, n_boot):
    ra, rb = paired_runs(records, m, base)
    if not ra:
        return None
    a, b = [r["stats"]["test_metric"] for r in ra], [r["stats"]["test_metric"] for r in rb]
    oa, ob = _outcomes(ra), _outcomes(rb)
    paired_examples = oa is not None and ob is not None and oa["units"].shape == ob["units"].shape
    n_examples = oa["units"].shape[1] if paired_examples else None
    v = stats.example_variance(oa, ob, "accuracy", n_boot) if paired_examples and len(ra) >= 2 else 0.0
    p = stats.paired_difference(a, b, v, n_examples)
    tests = stats.margin_tests(p, margin)
    return dict(claim=f"{m} within {margin * 100:g} points of {base} (test accuracy)", family="accuracy",
                kind="margin", first=m, second=base, quantity="test_metric", seeds=[r["seed"] for r in ra], **p,
                **tests, p=tests["p_noninferior"], examples_paired=paired_examples,
                power=stats.seeds_needed(p, margin), not_converged=_not_converged(records, [m, base]))


def _direction_claims(records):
    out = []
    for chained, twin in CHAINS:
        ra, rb = paired_runs(records, chained, twin)
        for key, words, positive in DIRECTIONS:
            read = {**OUTCOMES, **DIAGNOSTICS}[key][1]
            pairs = [(read(x), read(y)) for x, y in zip(ra, rb) if read(x) is not None and read(y) is not None]
            if not pairs:
                continue
            d = stats.paired_seeds([x for x, _ in pairs], [y for _, y in pairs], level=stats.LEVEL)
            out.append(dict(claim=f"{chained} vs {twin}: {words}", family="direction", kind="direction",
                            first=chained, second=twin, quantity=key, positive=positive, **d,
                            lengths={chained: _lengths(ra), twin: _lengths(rb)},
                            not_converged=_not_converged(records, [chained, twin])))
    return out


def _tau_claims(records, n_boot):
    out = []
    for other in (d for d in DIAGNOSTICS if d != "mi_bound"):
        d = tau_difference(records, "mi_bound", other, n_boot) if records else None
        if d is None:
            continue
        # A τ from too few distinct values decides nothing (bounds.stats.MIN_DISTINCT_FOR_TAU).
        note = None if d["informative"] else (f"τ not informative: {' and '.join(map(str, d['distinct']))} "
                                              "distinct values")
        out.append(dict(claim=f"the MI bound orders the methods by Ĝ better than {DIAGNOSTICS[other][0]}",
                        family="tau", kind="tau", first="mi_bound", second=other, quantity="kendall_tau",
                        positive=True, level=stats.LEVEL, diff=d["diff"], ci=d["ci"], n=d["n"], methods=d["methods"],
                        p=d["p"] if d["informative"] else None, interval_method=d["interval_method"],
                        informative=d["informative"], note=note, not_converged=_not_converged(records, d["methods"])))
    return out


def decide(found):
    """Holm within each family, then each verdict from its adjusted p's."""
    for family in FAMILIES:
        rows = [c for c in found if c["family"] == family]
        for key in ("p_noninferior", "p_equivalent", "p_worse") if family == "accuracy" else ("p",):
            for c, q in zip(rows, stats.holm([c.get(key) for c in rows])):
                c[f"{key}_holm"] = q
        for c in rows:
            c["family_size"] = len(rows)
            if family == "accuracy":  # the claim's own p is non-inferiority's: "competitive"
                c["p_holm"] = c["p_noninferior_holm"]
                c["verdict"] = stats.margin_verdict(c["p_holm"], c["p_equivalent_holm"], c["p_worse_holm"])
            else:
                c["verdict"] = stats.direction_verdict(c["diff"], c["p_holm"], c["positive"])
    return found


def claims(records, n_boot=2000, margin=MARGIN):
    """Every claim this study can decide from its final runs' records: accuracy only where the metric is accuracy
    (a perplexity has no points to be within)."""
    records = list(records)
    metric = next((r["stats"].get("metric", "accuracy") for r in records), "accuracy")
    accuracy = [] if metric != "accuracy" else [
        c for m in MATCHED for base in (MATCHED[m], "lora")
        if (c := _accuracy_claim(records, m, base, margin, n_boot)) is not None]
    return decide(accuracy + _direction_claims(records) + _tau_claims(records, n_boot))
