"""The study's report: Tables 2 and 3, the bounds, the diagnostics, and how consistently each orders the methods.

    python -m analysis.report RUNS_DIR [--out figures/] [--loss-clip 4.0] [--bootstrap 2000] [--readme README.md]

Every number is read from a run's own files (training_stats.json, diagnostics/*/…json) or computed by
the package that owns its formula (bounds.report for the bounds and τ, analysis.spectral for intruder
averages); nothing is re-typed. `--readme FILE` rewrites FILE's results section, between the lines
<!-- results:begin --> and <!-- results:end -->, with the same tables and the figures.

Comparable across methods:
- intruders are averaged over one matrix set for every method: the matrices the LoRA-family runs adapt (full
  FT restricted to them), listed in report.json with a breakdown per matrix type. Head-only adapts no matrix: n/a.
- sharpness and λ_max are taken in one space for every method, the weights W0 + ΔW of those matrices along the
  same directions (diagnostics/landscape, diagnostics/hessian); each method's own trainable space, whose size
  differs by method, is a second, labelled view (diagnostics/*_trainable).
Honest about itself:
- every aggregate records n (seeds); ± is the sample standard deviation over seeds; a 95 % interval is given only
  from n ≥ 3 (Student t for a mean, percentile bootstrap over seeds for τ), else it is null.
- MI bounds ≥ b are marked vacuous, and Ĝ of the loss clipped at b (the loss they hold for) stands beside Ĝ.
- a λ_max whose Lanczos run did not converge is marked; where τ is shown, so are ties (the MI bound depends on P alone).
"""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from adapters.errors import AdapterError, ArgumentParser, cli
from adapters.io import write_json, write_text
from analysis import style
from analysis.study import SELECTION_FILE
from bounds.report import VACUOUS, kendall_tau, ties_note

# Intervals from fewer seeds are not worth their name: with n = 2 a nominal 95 % bootstrap interval of a mean
# covers the truth about half the time, and a t-interval needs n − 1 ≥ 2 degrees of freedom to be usable.
MIN_SEEDS_FOR_INTERVAL = 3
LEVEL = 0.95
NOT_CONVERGED = "†"
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def _rise(landscape):
    return landscape["sharpness"]["loss_rise"][-1]["mean_rise"] if landscape else None


def _top(hessian):
    return hessian["eigenvalues"][0] if hessian else None


# Each diagnostic: its label and how to read its number for one run (None when the run lacks it). All are
# oriented so that "larger" is the diagnostic's prediction of a larger generalization gap.
DIAGNOSTICS = {
    "mi_bound": ("MI bound √(2qσ²ln2·P/|N|)", lambda run: run["bounds"]["mi_bound"]),
    "intruders": ("intruders per compared matrix (ε = 0.5, k = all)",
                  lambda run: run["intruders"]["mean_intruders"] if run["intruders"] else None),
    "sharpness": ("loss rise at ρ, common space W0+ΔW", lambda run: _rise(run["landscape"])),
    "hessian": ("Hessian λ_max, common space W0+ΔW", lambda run: _top(run["hessian"])),
    "sharpness_trainable": ("loss rise at ρ, own trainable space", lambda run: _rise(run["landscape_trainable"])),
    "hessian_trainable": ("Hessian λ_max, own trainable space", lambda run: _top(run["hessian_trainable"])),
}
OUTCOMES = {
    "test_metric": ("test accuracy", lambda run: run["stats"]["test_metric"]),
    "gap": ("Ĝ = L_test − L_train", lambda run: run["stats"]["generalization_gap"]),
    "gap_clipped": ("Ĝ of the loss clipped at b", lambda run: run["bounds"]["clipped_gap"]),
}
# Where each landscape/Hessian diagnostic lives in a run, and the space it must have been taken in.
SOURCES = {"landscape": ("landscape", "effective"), "landscape_trainable": ("landscape", "trainable"),
           "hessian": ("hessian", "effective"), "hessian_trainable": ("hessian", "trainable")}


def _json_or_none(path):
    return json.loads(path.read_text()) if path.exists() else None


def _diagnostic(run_dir, name):
    kind, space = SOURCES[name]
    result = _json_or_none(Path(run_dir) / "diagnostics" / name / f"{kind}.json")
    if result is not None and result.get("space") != space:
        raise AdapterError(f"{run_dir}/diagnostics/{name} holds a {kind} in space {result.get('space')!r}, "
                           f"the report reads space {space!r} there: rerun the study to recompute it")
    return result


def collect(runs, loss_clip=4.0):
    """One record per run directory (a checkpoint with training_stats.json) under `runs`."""
    from bounds.report import checkpoint_row
    import adapters
    runs = Path(runs)
    selection = _json_or_none(runs / SELECTION_FILE)
    # The study's learning-rate search leaves runs at the lrs it did not choose: only the final ones are reported.
    # Final runs are children of `runs` (listed by name; older lists held paths): found wherever `runs` now lies.
    dirs = (sorted(runs / Path(d).name for m in selection["methods"].values() for d in m["runs"]) if selection
            else sorted(p.parent for p in runs.glob("*/training_stats.json")))
    if not dirs:
        raise AdapterError(f"no runs in {runs}: expected RUNS/<run>/training_stats.json")
    records = []
    for d in dirs:
        meta = adapters.read_meta(d)
        spectral = _json_or_none(d / "diagnostics" / "spectral" / "spectral.json")
        stats = adapters.read_stats(d)
        records.append(dict(
            path=str(d), method=meta["method"], seed=meta.get("seed", 0), stats=stats,
            lr=(meta.get("training") or {}).get("lr"), val_loss_falling=val_loss_falling(stats["history"]),
            bounds=checkpoint_row(d, loss_clip=loss_clip),
            spectral=spectral["checkpoints"][0] if spectral else None, spectral_settings=(spectral or {}).get("settings"),
            **{name: _diagnostic(d, name) for name in SOURCES}))
    return records


def val_loss_falling(history):
    """Whether the validation loss still fell over the run's last evaluation interval (it had not yet fit, or
    was not yet overfitting); None without two validation evaluations."""
    losses = [h.get("val_loss") for h in history if h.get("val_loss") is not None]
    return losses[-1] < losses[-2] if len(losses) >= 2 else None


# -- one matrix set for the intruders -------------------------------------------------------------

def _adapts_matrices(method):
    from adapters.methods import get_method
    spec = get_method(method)
    return spec.adapter is not None or spec.trains_base


def compared_matrices(records):
    """The matrices every method's intruders are averaged over, in forward order: those every LoRA-family run
    adapts (without LoRA-family runs: those every full fine-tune has)."""
    from adapters.methods import get_method
    with_spectral = [r for r in records if r["spectral"]]
    pool = ([r for r in with_spectral if get_method(r["method"]).adapter is not None]
            or [r for r in with_spectral if _adapts_matrices(r["method"])])
    if not pool:
        return []
    common = set.intersection(*({x["name"] for x in r["spectral"]["layers"]} for r in pool))
    return [x["name"] for x in pool[0]["spectral"]["layers"] if x["name"] in common]


def restrict_intruders(record, names):
    """analysis.spectral's totals over the compared matrices of one run; None for a method that adapts none."""
    from analysis import spectral
    if not record["spectral"] or not names or not _adapts_matrices(record["method"]):
        return None
    layers = {x["name"]: x for x in record["spectral"]["layers"]}
    missing = [n for n in names if n not in layers]
    if missing:
        raise AdapterError(f"{record['path']}: spectral.json has no record of the compared matrix {missing[0]}")
    return spectral.summarise([layers[n] for n in names])


# -- statistics over seeds ------------------------------------------------------------------------

def aggregate(values):
    """mean, std (sample, ddof 1; None for one seed), n, the values, and a Student-t interval from n ≥ 3."""
    from scipy import stats
    n, mean = len(values), float(np.mean(values))
    std = float(np.std(values, ddof=1)) if n > 1 else None
    ci = None
    if n >= MIN_SEEDS_FOR_INTERVAL:
        half = float(stats.t.ppf((1 + LEVEL) / 2, n - 1)) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return dict(mean=mean, std=std, n=n, values=values, ci=ci,
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


def _converged(record, key):
    """For the Hessian diagnostics: whether the run's Lanczos iteration converged (None elsewhere)."""
    source = {"hessian": "hessian", "hessian_trainable": "hessian_trainable"}.get(key)
    result = record.get(source) if source else None
    return None if result is None else bool(result["lanczos"]["converged"])


def consistency(records, diagnostic, n_boot=2000, seed=0):
    """τ-b between the diagnostic's and the gap's orderings of the methods (means over seeds), the number of
    distinct diagnostic values (ties), and a percentile bootstrap interval over seeds when every method has
    n ≥ 3 seeds (null otherwise): resample each method's seeds with replacement, the same ones for both."""
    read = DIAGNOSTICS[diagnostic][1]
    gap = OUTCOMES["gap"][1]
    both = [r for r in records if read(r) is not None]
    d, g = per_method(both, read), per_method(both, gap)
    methods = [m for m in d if m in g]
    means = [np.mean(d[m]) for m in methods]
    tau = kendall_tau(means, [np.mean(g[m]) for m in methods])
    n = {m: len(d[m]) for m in methods}
    boots = []
    if tau is not None and methods and min(n.values()) >= MIN_SEEDS_FOR_INTERVAL:
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            pick = {m: rng.integers(0, n[m], n[m]) for m in methods}
            t = kendall_tau([np.mean(np.asarray(d[m])[pick[m]]) for m in methods],
                            [np.mean(np.asarray(g[m])[pick[m]]) for m in methods])
            if t is not None:
                boots.append(t)
    lo, hi = (1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100
    interval = [float(np.percentile(boots, lo)), float(np.percentile(boots, hi))] if boots else None
    flags = [_converged(r, diagnostic) for r in both]
    return dict(diagnostic=diagnostic, label=DIAGNOSTICS[diagnostic][0], tau=tau, methods=methods, n=n,
                distinct=len(set(means)), interval=interval, n_bootstrap=len(boots),
                interval_method=f"percentile bootstrap over seeds, {len(boots)} resamples" if interval else None,
                not_converged=sum(f is False for f in flags))


def summary(records, matrices, selection=None):
    """{method: {quantity: aggregate or None}} for every outcome and diagnostic, with the intruders' matrices
    and per-type breakdown, the Hessians' convergence per seed, the trained-scalar count, the seeds, the lr and
    how it was chosen (`selection`: the study's lr_selection.json), and whether validation loss was still falling."""
    table = {m: {} for m in style.method_order({r["method"] for r in records})}
    for key, (_, read) in {**OUTCOMES, **DIAGNOSTICS}.items():
        values = per_method(records, read)
        for m in table:
            table[m][key] = aggregate(values[m]) if m in values else None
            flags = [_converged(r, key) for r in records if r["method"] == m and read(r) is not None]
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
        row["vacuous"] = any(r["bounds"]["vacuous"] for r in runs)
        row["seeds"] = sorted(r["seed"] for r in runs)
        lrs = sorted({r["lr"] for r in runs if r["lr"] is not None})
        row["lr"] = lrs[0] if len(lrs) == 1 else lrs or None
        chosen = ((selection or {}).get("methods") or {}).get(m)
        row["lr_selection"] = {k: v for k, v in chosen.items() if k != "runs"} if chosen else None
        row["val_loss_falling"] = [r["val_loss_falling"] for r in sorted(runs, key=lambda r: r["seed"])]
    return table


# -- the paper's claims, checked on this study ------------------------------------------------------

FEW_POINTS = 0.03  # "within a few points" of accuracy
CHAINS = [("c3la", "cla"), ("rc3la", "rcla"), ("cola", "lora"), ("rac", "asym")]  # chained method, its twin


def difference(a, b):
    """mean(a) − mean(b) over seeds, with a Welch t-interval when both have n ≥ 3 (else None)."""
    from scipy import stats
    d = float(np.mean(a) - np.mean(b))
    if min(len(a), len(b)) < MIN_SEEDS_FOR_INTERVAL:
        return dict(diff=d, ci=None)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    half = float(stats.t.ppf((1 + LEVEL) / 2, dof)) * math.sqrt(va + vb)
    return dict(diff=d, ci=[d - half, d + half])


def claims(table, taus):
    """The paper's headline claims (THEORY.md, reference figures), each with the numbers that decide it here."""
    def values(m, key):
        return (table.get(m, {}).get(key) or {}).get("values")
    out = []
    # "Within a few points of LoRA" is about accuracy; a perplexity has no points to be within.
    if values("lora", "test_metric") and _metric(table) == "accuracy":
        for m in ("cla", "rcla", "c3la", "rc3la"):
            if values(m, "test_metric"):
                d = difference(values("lora", "test_metric"), values(m, "test_metric"))
                out.append(dict(claim=f"{m} within {FEW_POINTS:.0%} test accuracy of lora", pair=[m, "lora"],
                                quantity="test_metric", **d, holds=d["diff"] <= FEW_POINTS))
    for chained, twin in CHAINS:
        for key, word, want in (("intruders", "more intruders", True), ("sharpness", "sharper (loss rise)", True),
                                ("hessian", "sharper (λ_max)", True), ("gap", "not a worse Ĝ", False)):
            if values(chained, key) and values(twin, key):
                d = difference(values(chained, key), values(twin, key))
                out.append(dict(claim=f"{chained} vs {twin}: {word}", pair=[chained, twin], quantity=key, **d,
                                holds=(d["diff"] > 0) if want else (d["diff"] <= 0)))
    by = {t["diagnostic"]: t["tau"] for t in taus if t["tau"] is not None}
    if "mi_bound" in by and len(by) > 1:
        best = max((d for d in by if d != "mi_bound"), key=by.get)
        out.append(dict(claim="the bound ordering tracks Ĝ at least as well as every other diagnostic",
                        pair=["mi_bound", best], quantity="kendall_tau", diff=by["mi_bound"] - by[best], ci=None,
                        holds=by["mi_bound"] >= by[best]))
    return out


def _claim_lines(found):
    if not found:
        return []
    lines = ["The paper's claims on this study (difference = first − second, mean over seeds; 95 % Welch interval "
             "from n ≥ 3 seeds each):", "", "| claim | difference | interval | holds here |", "|---|---|---|---|"]
    for c in found:
        ci = "n/a" if c["ci"] is None else f"[{c['ci'][0]:+.3g}, {c['ci'][1]:+.3g}]"
        lines.append(f"| {c['claim']} | {c['diff']:+.3g} | {ci} | {'yes' if c['holds'] else 'no'} |")
    n = sum(c["holds"] for c in found)
    return lines + ["", f"{n} of {len(found)} hold as point estimates; "
                        f"{sum(c['ci'] is not None and (c['ci'][0] > 0 or c['ci'][1] < 0) for c in found)} "
                        "differences have an interval that excludes 0.", ""]


# -- tables -----------------------------------------------------------------------------------------

def _fmt(cell, digits=3):
    if cell is None:
        return "n/a"
    text = f"{cell['mean']:.{digits}g}" + (f" ± {cell['std']:.2g}" if cell["std"] is not None else "")
    return text + (f" {NOT_CONVERGED}" if False in cell.get("converged", []) else "")


COLUMNS = [("test_metric", "test acc."), ("gap", "Ĝ"), ("gap_clipped", "Ĝ clipped at b"), ("mi_bound", "MI bound"),
           ("intruders", "intruders"), ("sharpness", "sharpness W0+ΔW"), ("hessian", "λ_max W0+ΔW")]
SECOND_VIEW = [("sharpness_trainable", "sharpness (own space)"), ("hessian_trainable", "λ_max (own space)")]


def _cell(row, key):
    return _fmt(row.get(key)) + (f" {VACUOUS}" if key == "mi_bound" and row["vacuous"] else "")


def _lr(row):
    lr = row.get("lr")
    return "n/a" if lr is None else f"{lr:g}" if not isinstance(lr, list) else ", ".join(f"{x:g}" for x in lr)


def _metric(table):
    """The study's task metric (every run of a study has one task): accuracy, or a causal LM's perplexity."""
    return next(iter(table.values()), {}).get("metric", "accuracy")


def _columns(table, columns):
    """The columns, the test metric's named after the task's own (accuracy is "test acc.")."""
    metric = _metric(table)
    return [(k, f"test {metric}" if k == "test_metric" and metric != "accuracy" else c) for k, c in columns]


def _rows(table, columns):
    columns = _columns(table, columns)
    head = "| method | n | lr | trained scalars | " + " | ".join(c for _, c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 4)]
    for m, row in table.items():
        lines.append(f"| {style.label(m)} | {len(row['seeds'])} | {_lr(row)} | {row['trained_parameters']:,} | "
                     + " | ".join(_cell(row, k) for k, _ in columns) + " |")
    return lines


def _selection_rows(table):
    """The lr search: each method's grid with its validation scores, the choice, and whether training still
    improved validation loss at the end (per seed)."""
    rows = [(m, row) for m, row in table.items() if row.get("lr_selection")]
    if not rows:
        return []
    by = rows[0][1]["lr_selection"]["by"]
    lines = [f"Learning rates, each chosen on the validation split by {by} (ties: lower validation loss), at the "
             "first seed; * = the choice, at the edge of its grid (‖); last column: did validation loss still fall "
             "over the last evaluation interval, per seed:", "",
             "| method | grid: validation score | chosen | val. loss still falling |", "|---|---|---|---|"]
    for m, row in rows:
        sel = row["lr_selection"]
        grid = " · ".join(f"{lr}{'*' if float(lr) == sel['lr'] else ''}: {score:.3f}"
                          for lr, score in sel["scores"].items())
        falling = " ".join({True: "yes", False: "no", None: "n/a"}[f] for f in row["val_loss_falling"])
        lines.append(f"| {style.label(m)} | {grid} | {sel['lr']:g}{' ‖' if sel['at_edge'] else ''} | {falling} |")
    return lines + [""]


def _study_line(study, elapsed=None, executor=None):
    if not study:
        return []
    train = ", ".join(f"{k} {v}" for k, v in (study.get("train") or {}).items())
    where = ""
    if elapsed is not None:
        cpus = f", {executor['cluster_cpus']:g} CPUs" if executor and executor.get("cluster_cpus") else ""
        where = (f" It took {elapsed / 60:.1f} min from its start to its last result "
                 f"(executor {(executor or {}).get('executor', 'serial')}{cpus}).")
    return [f"Study (runs/study.json): model {study.get('model')}, task {study.get('task')}, r = {study.get('rank')}, "
            f"α = {study.get('alpha')}, chain length k = {study.get('chain_length')} for the chained methods, "
            f"budget {study.get('budget')}: {train}.{where}", ""]


def study_elapsed(runs):
    """Seconds from the study's start (runs/study.json, written first) to the last result file any run wrote; None
    outside a study. Measured off the files, so it holds for the runs as they are, however they were scheduled."""
    runs = Path(runs)
    if not (runs / "study.json").exists():
        return None
    results = [p.stat().st_mtime for pattern in ("*/training_stats.json", "*/diagnostics/*/*.json")
               for p in runs.glob(pattern)]
    return max(results) - (runs / "study.json").stat().st_mtime if results else None


def markdown(table, taus, settings):
    matrices = settings["matrices"]
    types = sorted({t for row in table.values() if row["intruders"] for t in row["intruders"]["by_type"]})
    lines = _study_line(settings.get("study"), settings.get("elapsed_seconds"), settings.get("executor")) + [
        f"Runs: {settings['runs_count']} in {settings['runs']} · σ from loss clip b = {settings['loss_clip']:g} "
        f"(σ = b/2) · each cell: mean ± sample standard deviation over the n seeds (no ± for n = 1) · "
        f"training time summed over the runs: {settings['training_seconds'] / 60:.1f} min", "",
        *_rows(table, COLUMNS), "",
        f"Intruders and the W0+ΔW columns are taken on the same {len(matrices)} matrices for every method "
        f"(those the LoRA-family runs adapt: {', '.join(types) or 'none'}; full FT restricted to them, head-only "
        "adapts none: n/a); sharpness: mean loss rise at ρ = range along filter-normalised random directions "
        "(normalised against W0, the same for every method).", "",
        "Second view, each method's own trainable space as it trained it (B with the scale s in the forward); its "
        "size differs by method, so these compare curvature of different functions:", "",
        *_rows(table, SECOND_VIEW), "", *_selection_rows(table)]
    if types:
        lines += ["Intruders per matrix type (mean ± std over seeds):", "",
                  "| method | " + " | ".join(types) + " |", "|" + "---|" * (len(types) + 1)]
        for m, row in table.items():
            by = (row["intruders"] or {}).get("by_type", {})
            lines.append(f"| {style.label(m)} | " + " | ".join(_fmt(by.get(t)) for t in types) + " |")
        lines.append("")
    lines += [f"Consistency with the empirical gap Ĝ (Kendall τ-b over methods of the means over seeds; {LEVEL:.0%} "
              f"percentile bootstrap interval over seeds only when every method has n ≥ {MIN_SEEDS_FOR_INTERVAL}):",
              "", "| diagnostic | τ | interval | methods | distinct values |", "|---|---|---|---|---|"]
    for t in taus:
        tau = "n/a" if t["tau"] is None else f"{t['tau']:+.2f}"
        ci = "n/a" if t["interval"] is None else f"[{t['interval'][0]:+.2f}, {t['interval'][1]:+.2f}]"
        mark = f" {NOT_CONVERGED}" if t["not_converged"] else ""
        label = t["label"].replace("|", "\\|")  # |N| inside a Markdown table cell
        lines.append(f"| {label}{mark} | {tau} | {ci} | {len(t['methods'])} | {t['distinct']} |")
    lines += ["", *_claim_lines(claims(table, taus))]
    lines += [f"- {n}" for n in _notes(table, taus)]
    return "\n".join(lines) + "\n"


def _notes(table, taus):
    notes = []
    n_min = min((min(t["n"].values()) for t in taus if t["n"]), default=0)
    if n_min < MIN_SEEDS_FOR_INTERVAL:
        notes.append(f"No intervals: the fewest seeds of a method is n = {n_min} < {MIN_SEEDS_FOR_INTERVAL}.")
    for t in taus:
        ties = ties_note(t["label"].split(" √")[0], t["distinct"], len(t["methods"]))
        if ties:
            notes.append(ties + ".")
    if any(row["vacuous"] for row in table.values()):
        notes.append(f"{VACUOUS} vacuous: the MI bound is ≥ b, and the loss clipped to [0, b] has |G| ≤ b for any "
                     "weights; the bound is about Ĝ clipped at b.")
    if any(t["not_converged"] for t in taus):
        notes.append(f"{NOT_CONVERGED} some Lanczos runs did not converge: those λ_max are Ritz values below the "
                     "true top eigenvalue (hessian.json: lanczos.converged, eigenvalue_residuals).")
    return notes


def _tex(s):
    return (s.replace("_", r"\_").replace("±", r"$\pm$").replace("Ĝ", r"$\hat G$").replace("λ", r"$\lambda$")
            .replace(VACUOUS, r"$^\ddagger$").replace(NOT_CONVERGED, r"$^\dagger$").replace("W0+ΔW", r"$W_0+\Delta W$"))


def latex(table):
    """A booktabs table, methods grouped as full FT / LoRA family / sparse variants."""
    cols = "l" + "r" * (len(COLUMNS) + 2)
    lines = [r"\begin{tabular}{" + cols + "}", r"\toprule",
             "Method & $n$ & Trained & " + " & ".join(_tex(c) for _, c in _columns(table, COLUMNS)) + r" \\",
             r"\midrule"]
    for group, methods in style.METHOD_GROUPS.items():
        rows = [m for m in methods if m in table]
        if not rows:
            continue
        lines.append(rf"\multicolumn{{{len(COLUMNS) + 3}}}{{l}}{{\emph{{{group}}}}} \\")
        for m in rows:
            row = table[m]
            lines.append(f"{_tex(style.label(m))} & {len(row['seeds'])} & {row['trained_parameters']:,} & "
                         + " & ".join(_tex(_cell(row, k)) for k, _ in COLUMNS) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "",
              r"% mean $\pm$ sample standard deviation over $n$ seeds; $^\ddagger$ vacuous bound; "
              r"$^\dagger$ Lanczos not converged"]
    return "\n".join(lines) + "\n"


# -- figures ----------------------------------------------------------------------------------------

def plot_outcomes(table, out, formats):
    import matplotlib.pyplot as plt
    style.use()
    methods = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), layout="constrained")
    for ax, key in zip(axes, ("test_metric", "gap")):
        cells = [table[m][key] for m in methods]
        ax.bar(range(len(methods)), [c["mean"] for c in cells], yerr=[c["std"] or 0 for c in cells],
               color=[style.color(m) for m in methods], capsize=2)
        ax.set_xticks(range(len(methods)), [style.label(m) for m in methods], rotation=60, ha="right")
        ax.set_ylabel(OUTCOMES[key][0] if key != "test_metric" else f"test {_metric(table)}")
    axes[0].set_ylim(min(table[m]["test_metric"]["mean"] for m in methods) - 0.05, None)
    fig.suptitle("mean over seeds; error bars: sample standard deviation", fontsize=8)
    return style.save(fig, out, "outcomes", formats)


def plot_consistency(records, taus, out, formats):
    """One panel per diagnostic: its value against the empirical gap, one point per run (hollow: not converged)."""
    import matplotlib.pyplot as plt
    style.use()
    cols = 3
    rows = -(-len(DIAGNOSTICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.9 * rows), squeeze=False)
    for ax, (key, (label, read)), t in zip(axes.flat, DIAGNOSTICS.items(), taus):
        for r in records:
            v = read(r)
            if v is not None:
                c = style.color(r["method"])
                hollow = _converged(r, key) is False
                ax.scatter(v, OUTCOMES["gap"][1](r), s=14, label=style.label(r["method"]),
                           facecolors="none" if hollow else c, edgecolors=c)
        # the label as a title: the x offset text (×1e−5 …) then never runs into it
        ax.set_title(f"{label}\nτ = " + ("n/a" if t["tau"] is None else f"{t['tau']:+.2f}"), fontsize=7)
        if key == "mi_bound":
            ax.set_xscale("log")
    for ax in axes[:, 0]:
        ax.set_ylabel(OUTCOMES["gap"][0])
    for ax in axes.flat[len(DIAGNOSTICS):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        handles.update(zip(*ax.get_legend_handles_labels()[::-1]))
    methods = style.method_order({r["method"] for r in records})
    unique = {style.label(m): handles[style.label(m)] for m in methods if style.label(m) in handles}
    fig.tight_layout()
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(6, len(unique)), fontsize=6,
               bbox_to_anchor=(0.5, -0.04))
    return style.save(fig, out, "consistency", formats)


def plot_landscapes(records, out, formats):
    """The 1-D train-loss curves of the first seed's runs, one per method: common space, then own space."""
    import matplotlib.pyplot as plt
    panels = {}
    for key in ("landscape", "landscape_trainable"):
        for r in sorted(records, key=lambda r: r["seed"]):
            if r[key] and r[key]["settings"]["dims"] == 1:
                panels.setdefault(key, {}).setdefault(r["method"], r[key])
    if not panels:
        return []
    style.use()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False, sharey=False)
    titles = {"landscape": "common space: W0+ΔW of the compared matrices (directions normalised against W0)",
              "landscape_trainable": "each method's own trainable scalars, as trained"}
    for ax, (key, first) in zip(axes[0], panels.items()):
        for m in style.method_order(first):
            ls = first[m]
            ax.plot(ls["coords"][0], np.asarray(ls["loss"]) - ls["center_loss"], color=style.color(m),
                    linestyle=style.linestyle(m), label=style.label(m))
        ax.set_title(titles[key], fontsize=7)
        ax.set_xlabel("α (filter-normalised random direction)")
        ax.set_ylabel("train loss − loss at θ*")
    axes[0, 0].legend(ncol=2)
    return style.save(fig, out, "landscape_1d", formats)


def plot_spectral(records, matrices, out, formats):
    """The spectral figures (ε-sweep, heatmap, spectra, totals) over the compared matrices of the first seed's
    runs; methods that adapt no matrix (head-only) are left out."""
    from analysis import spectral
    first = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["intruders"]:
            first.setdefault(r["method"], r)
    if not first:
        return []
    ordered = [first[m] for m in style.method_order(first)]
    checkpoints = []
    for r in ordered:
        layers = {x["name"]: x for x in r["spectral"]["layers"]}
        checkpoints.append({"path": r["path"], "method": r["method"], **r["intruders"],
                            "layers": [layers[n] for n in matrices]})
    merged = {"settings": dict(ordered[0]["spectral_settings"]), "checkpoints": checkpoints}
    merged["settings"]["spectrum_matrix"] = spectral._spectrum_matrix(checkpoints)
    return spectral.plot_all(merged, out, formats, sweep_figure=True)


# -- the README's results section ----------------------------------------------------------------

def _readme_parts(path):
    """(text before the section, text after it) of a README with exactly one results section."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"--readme {path}: no such file")
    text = path.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise AdapterError(f"--readme {path}: needs one line {README_BEGIN} and, after it, one line {README_END}")
    head, rest = text.split(README_BEGIN)
    return head, rest.split(README_END)[1]


def readme_section(result, readme):
    """The results section: the report's tables, then its figures linked relative to the README."""
    where = Path(readme).resolve().parent
    pngs = [p for p in result["figures"] if p.endswith(".png")]
    links = [f"![{Path(p).stem}]({os.path.relpath(Path(p).resolve(), where)})" for p in pngs]
    command = f"python -m analysis.report {result['settings']['runs']} --out {result['settings']['out']} --readme " \
              f"{Path(readme).name}"
    return (f"<!-- written by `{command}`: edits here are overwritten -->\n\n" + result["markdown"] + "\n"
            + "\n".join(links) + "\n")


# -- the report ---------------------------------------------------------------------------------

def report(runs, out="figures", loss_clip=4.0, n_boot=2000, formats=("png", "pdf"), readme=None):
    """Read every run under `runs`, write report.{md,tex,json} and the figures to `out` (and the results section
    of `readme`); return the dict."""
    if readme is not None:
        _readme_parts(readme)  # bad input first: nothing is written then
    records = collect(runs, loss_clip)
    matrices = compared_matrices(records)
    for r in records:
        r["intruders"] = restrict_intruders(r, matrices)
    selection = _json_or_none(Path(runs) / SELECTION_FILE)
    table = summary(records, matrices, selection)
    taus = [consistency(records, d, n_boot) for d in DIAGNOSTICS]
    settings = dict(runs=str(runs), out=str(out), loss_clip=loss_clip, sigma=loss_clip / 2, n_bootstrap=n_boot,
                    runs_count=len(records), matrices=matrices, min_seeds_for_interval=MIN_SEEDS_FOR_INTERVAL,
                    training_seconds=sum(r["stats"].get("wall_time_s") or 0.0 for r in records),
                    study=_json_or_none(Path(runs) / "study.json"), elapsed_seconds=study_elapsed(runs),
                    executor=(selection or {}).get("executor"), select_by=(selection or {}).get("select_by"))
    out = Path(out)
    figures = (plot_outcomes(table, out, formats) + plot_consistency(records, taus, out, formats)
               + plot_landscapes(records, out, formats) + plot_spectral(records, matrices, out, formats))
    md = markdown(table, taus, settings)
    result = dict(settings=settings, methods=table, consistency=taus, claims=claims(table, taus),
                  runs=[dict(path=r["path"], method=r["method"], seed=r["seed"], lr=r["lr"],
                             val_loss_falling=r["val_loss_falling"],
                             **{k: read(r) for k, (_, read) in {**OUTCOMES, **DIAGNOSTICS}.items()},
                             hessian_converged=_converged(r, "hessian"),
                             hessian_trainable_converged=_converged(r, "hessian_trainable"),
                             mi_bound_vacuous=r["bounds"]["vacuous"])
                        for r in records],
                  figures=[str(p) for p in figures], markdown=md)
    if readme is not None:
        result["readme_section"] = readme_section(result, readme)
    write_text(out / "report.md", md)
    write_text(out / "report.tex", latex(table))
    write_json(out / "report.json", result)
    if readme is not None:
        head, tail = _readme_parts(readme)
        write_text(readme, head + README_BEGIN + "\n" + result["readme_section"] + README_END + tail)
    return result


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs")
    p.add_argument("--out", default="figures")
    p.add_argument("--loss-clip", type=float, default=4.0,
                   help="σ = b/2 for the clipped loss min(ℓ, b) in the MI bound (THEORY.md section 1)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--formats", default="png,pdf")
    p.add_argument("--readme", default=None, help=f"rewrite this file's section between {README_BEGIN} and "
                                                  f"{README_END} with the results")
    args = p.parse_args(argv)
    if not Path(args.runs).is_dir():
        raise AdapterError(f"runs directory not found: {args.runs}")
    result = report(args.runs, args.out, args.loss_clip, args.bootstrap, tuple(args.formats.split(",")), args.readme)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
