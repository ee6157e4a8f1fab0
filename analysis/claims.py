"""The paper's claims (THEORY.md, reference figures), each decided on this study by a test that can say "undecided".

- Competitiveness: each sparse method against its parameter-matched baseline (cla, rcla vs asym: the same P with
  a fixed A; c3la, rc3la vs rac: the same chained P) and against LoRA, within MARGIN of test accuracy (3 points),
  by TOST: two one-sided Welch tests at α = 0.05, verdict equivalent / different / undecided with n and the 90 %
  interval (bounds.stats.tost).
- Direction: each chained method against its one-link twin (more intruders, sharper, a lower Ĝ): holds only when
  the 95 % Welch interval excludes 0 on the claimed side, fails when it excludes 0 on the other, else undecided.
- The MI bound against every other diagnostic: τ(bound, Ĝ) − τ(other, Ĝ) with a paired bootstrap interval (the
  same seed resamples for both τ's), decided as a direction claim.
Every difference is mean(first) − mean(second), first and second named as in the claim. A claim resting on a run
that stopped at its cap while validation loss still improved (converged: false) says so.
"""
from adapters.methods import METHODS
from analysis.records import DIAGNOSTICS
from analysis.summary import tau_difference
from bounds.stats import ALPHA, direction, tost, welch

MARGIN = 0.03  # "within a few points" of accuracy: 3 points, as a difference of accuracies in [0, 1]
# Sparse method -> its parameter-matched baseline (same trained-scalar count P, METHODS.md).
MATCHED = {"cla": "asym", "rcla": "asym", "c3la": "rac", "rc3la": "rac"}
# Each chained method and its one-link twin, from the registry (the sparse ones first, as the paper discusses them).
CHAINS = sorted(((name, m.adapter.twin) for name, m in METHODS.items() if m.adapter is not None and m.adapter.chained),
                key=lambda pair: pair[0] not in MATCHED)
# What a chained method is claimed to do against its twin: quantity, the claim's words, the claimed sign.
DIRECTIONS = (("intruders", "more intruders", True), ("sharpness", "sharper (loss rise)", True),
              ("hessian", "sharper (λ_max)", True), ("gap", "a lower Ĝ (not a worse one)", False))


def _values(table, m, key):
    return (table.get(m, {}).get(key) or {}).get("values")


def _not_converged(table, methods):
    """The methods among `methods` with a run that hit its cap still improving."""
    return [m for m in methods if False in (table.get(m, {}).get("converged") or [])]


def _accuracy_claims(table):
    out = []
    for m, baselines in ((m, (MATCHED[m], "lora")) for m in MATCHED):
        for base in baselines:
            a, b = _values(table, m, "test_metric"), _values(table, base, "test_metric")
            if a and b:
                t = tost(a, b, MARGIN, ALPHA)
                out.append(dict(claim=f"{m} within {MARGIN * 100:g} points of {base} (test accuracy)", kind="tost",
                                first=m, second=base, quantity="test_metric", **t,
                                not_converged=_not_converged(table, [m, base])))
    return out


def _direction_claims(table):
    out = []
    for chained, twin in CHAINS:
        for key, words, positive in DIRECTIONS:
            a, b = _values(table, chained, key), _values(table, twin, key)
            if a and b:
                d = welch(a, b)
                out.append(dict(claim=f"{chained} vs {twin}: {words}", kind="direction", first=chained, second=twin,
                                quantity=key, positive=positive, level=0.95, **d,
                                verdict=direction(d["ci"], positive), not_converged=_not_converged(table, [chained, twin])))
    return out


def _bound_claims(table, records, n_boot):
    out = []
    for other in (d for d in DIAGNOSTICS if d != "mi_bound"):
        d = tau_difference(records, "mi_bound", other, n_boot) if records else None
        if d is None:
            continue
        # A τ from too few distinct values decides nothing (bounds.stats.MIN_DISTINCT_FOR_TAU).
        verdict = direction(d["ci"], True) if d["informative"] else "undecided"
        note = None if d["informative"] else (f"τ not informative: {' and '.join(map(str, d['distinct']))} "
                                              "distinct values")
        out.append(dict(claim=f"the MI bound orders the methods by Ĝ better than {DIAGNOSTICS[other][0]}",
                        kind="tau", first="mi_bound", second=other, quantity="kendall_tau", positive=True,
                        level=0.95, diff=d["diff"], ci=d["ci"], n=d["n"], methods=d["methods"], verdict=verdict,
                        note=note, not_converged=_not_converged(table, d["methods"])))
    return out


def claims(table, records=(), n_boot=2000):
    """Every claim this study can decide: accuracy only where the metric is accuracy (a perplexity has no points to
    be within), the τ rows only with the runs' records."""
    metric = next(iter(table.values()), {}).get("metric", "accuracy")
    return ((_accuracy_claims(table) if metric == "accuracy" else []) + _direction_claims(table)
            + _bound_claims(table, list(records), n_boot))
