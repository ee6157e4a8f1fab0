"""Statistics over seeds: each method's aggregates, and how consistently each diagnostic orders the methods by Ĝ.

Every aggregate records n (seeds); ± is the sample standard deviation over seeds; an interval is given only from
n ≥ MIN_SEEDS_FOR_INTERVAL (Student t for a mean, a percentile bootstrap over methods and their seeds for τ), else
it is null. The
formulas are bounds.stats's.
"""
import numpy as np

from analysis import style
from analysis.records import DIAGNOSTICS, OUTCOMES, hessian_converged
from bounds.stats import LEVEL, kendall_tau, tau_informative, two_level_bootstrap


def aggregate(values):
    """mean, std (sample, ddof 1; None for one seed), n, the values, and a Student-t interval from n ≥ 3."""
    from bounds.stats import mean_interval
    n, mean = len(values), float(np.mean(values))
    ci = mean_interval(values, LEVEL)
    return dict(mean=mean, std=float(np.std(values, ddof=1)) if n > 1 else None, n=n, values=values, ci=ci,
                ci_method=f"Student t, {LEVEL:.0%}, n − 1 degrees of freedom" if ci else None)


def per_method(records, read):
    """{method: [value per seed]} in the paper's method order, skipping runs without the value."""
    out = {}
    for m in style.method_order({r["method"] for r in records}):
        values = [read(r) for r in records if r["method"] == m]
        values = [float(v) for v in values if v is not None]
        if values:
            out[m] = values
    return out


def seed_table(records, keys):
    """{method: array (seeds × keys)} of the runs that have every key's value (OUTCOMES or DIAGNOSTICS), in the
    paper's method order: what a τ and its bootstrap resample together, seed by seed."""
    read = {**OUTCOMES, **DIAGNOSTICS}
    out = {}
    for m in style.method_order({r["method"] for r in records}):
        rows = [[read[k][1](r) for k in keys] for r in sorted(records, key=lambda r: r["seed"]) if r["method"] == m]
        rows = [row for row in rows if None not in row]
        if rows:
            out[m] = np.asarray(rows, dtype=float)
    return out


def _taus(table, pairs, picks=None):
    """Kendall τ of the method means of column a against column b, for each (a, b) in pairs; the methods and each
    method's rows as `picks` ([(method index, row indices)]: one two-level bootstrap resample) or all of them."""
    rows = list(table.values())
    picks = picks if picks is not None else [(g, slice(None)) for g in range(len(rows))]
    means = [rows[g][pick].mean(axis=0) for g, pick in picks]
    return [kendall_tau([x[a] for x in means], [x[b] for x in means]) for a, b in pairs]


INTERVAL_METHOD = "two-level percentile bootstrap (methods, then each method's seeds), {} resamples"


def consistency(records, diagnostic, n_boot=2000, seed=0):
    """τ-b between the diagnostic's and the gap's orderings of the methods (means over seeds), the number of
    distinct diagnostic values (ties), whether that many can make τ informative, and a percentile bootstrap interval
    that resamples the methods compared and, within each, its seeds (bounds.stats.two_level_bootstrap; the same
    resample for both orderings), when every method has n ≥ 3 seeds (null otherwise)."""
    table = seed_table(records, [diagnostic, "gap"])
    methods = list(table)
    tau = _taus(table, [(0, 1)])[0] if methods else None
    n = {m: len(rows) for m, rows in table.items()}
    boot = None
    if tau is not None:
        boot = two_level_bootstrap(list(n.values()), lambda picks: _taus(table, [(0, 1)], picks)[0],
                                             n_resamples=n_boot, seed=seed)
    distinct = len({float(rows[:, 0].mean()) for rows in table.values()})
    flags = [hessian_converged(r, diagnostic) for r in records if DIAGNOSTICS[diagnostic][1](r) is not None]
    return dict(diagnostic=diagnostic, label=DIAGNOSTICS[diagnostic][0], tau=tau, methods=methods, n=n,
                distinct=distinct, informative=tau_informative(distinct), interval=boot and boot["interval"],
                n_bootstrap=n_boot if boot else 0,
                interval_method=INTERVAL_METHOD.format(n_boot) if boot else None,
                not_converged=sum(f is False for f in flags))


def tau_difference(records, first, second, n_boot=2000, seed=0):
    """τ(first, Ĝ) − τ(second, Ĝ) over the methods that have both, with a two-level percentile bootstrap interval and
    its p of 0: one resample of the methods and of each drawn method's seeds gives both τ's (null below three seeds
    per method)."""
    table = seed_table(records, [first, second, "gap"])
    if len(table) < 2:
        return None
    pairs = [(0, 2), (1, 2)]

    def diff(picks=None):
        a, b = _taus(table, pairs, picks)
        return None if a is None or b is None else a - b
    d = diff()
    if d is None:
        return None
    boot = two_level_bootstrap([len(rows) for rows in table.values()], diff, n_resamples=n_boot, seed=seed)
    distinct = [len({float(rows[:, c].mean()) for rows in table.values()}) for c in (0, 1)]
    return dict(diff=d, ci=boot and boot["interval"], p=boot and boot["p"], methods=list(table),
                n=[len(rows) for rows in table.values()], distinct=distinct,
                interval_method=INTERVAL_METHOD.format(n_boot) if boot else None,
                informative=all(tau_informative(k) for k in distinct))


def summary(records, matrices, selection=None):
    """{method: {quantity: aggregate or None}} for every outcome and diagnostic, with the intruders' matrices
    and per-type breakdown, the Hessians' convergence per seed, the trained-scalar count, the seeds, the lr and
    how it was chosen (`selection`: the study's lr_selection.json), and whether validation loss was still falling."""
    table = {m: {} for m in style.method_order({r["method"] for r in records})}
    for key, (_, read) in {**OUTCOMES, **DIAGNOSTICS}.items():
        values = per_method(records, read)
        for m in table:
            table[m][key] = aggregate(values[m]) if m in values else None
            flags = [hessian_converged(r, key) for r in records if r["method"] == m and read(r) is not None]
            if table[m][key] is not None and key in ("hessian", "hessian_trainable"):
                table[m][key]["converged"] = flags
    for m, row in table.items():
        runs = [r for r in records if r["method"] == m]
        if row["intruders"] is not None:
            types = {t for r in runs if r["intruders"] for t in r["intruders"]["by_type"]}
            row["intruders"].update(matrices=matrices, by_type={
                t: aggregate([r["intruders"]["by_type"][t]["mean_intruders"] for r in runs if r["intruders"]])
                for t in sorted(types)})
        row["trained_parameters"] = runs[0]["bounds"]["trained_parameters"]
        row["metric"] = runs[0]["stats"].get("metric", "accuracy")  # the task's: accuracy, or an LM's perplexity
        row["higher_is_better"] = runs[0]["stats"].get("metric_higher_is_better", True)  # perplexity: lower
        row["vacuous"] = any(r["bounds"]["vacuous"] for r in runs)
        row["seeds"] = sorted(r["seed"] for r in runs)
        lrs = sorted({r["lr"] for r in runs if r["lr"] is not None})
        row["lr"] = lrs[0] if len(lrs) == 1 else lrs or None
        chosen = ((selection or {}).get("methods") or {}).get(m)
        row["lr_selection"] = {k: v for k, v in chosen.items() if k != "runs"} if chosen else None
        by_seed = sorted(runs, key=lambda r: r["seed"])
        row["val_loss_falling"] = [r["val_loss_falling"] for r in by_seed]
        row["converged"] = [r.get("converged") for r in by_seed]
        row["stopped"] = [dict(best_step=r["stats"].get("best_step"), stopped_at=r["stats"].get("stopped_at"),
                               cap=r["stats"].get("cap_steps"), best_link=r["stats"].get("best_link"),
                               links=len(r["stats"].get("links") or ())) for r in by_seed]
    return table
