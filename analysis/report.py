"""The study's report: Tables 2 and 3, the bounds, the diagnostics, and how consistently each orders the methods.

    python -m analysis.report RUNS_DIR [--out figures/] [--loss-clip 4.0] [--bootstrap 2000]

Every number is read from a run's own files (training_stats.json, diagnostics/*/…json) or computed by
the package that owns its formula (bounds.report for the bounds); nothing is re-typed. The consistency
analysis ranks the methods by each diagnostic (mean over seeds) and by the empirical gap Ĝ = L_test − L_train,
and reports Kendall τ between the two orderings with a bootstrap interval over seeds.
"""
import json
import sys
from pathlib import Path

import numpy as np

from adapters.errors import AdapterError, ArgumentParser, cli
from adapters.io import write_json, write_text
from analysis import style
from bounds.report import kendall_tau

# Each diagnostic: how to read its number for one run (None when the run lacks it), and its label.
# All are oriented so that "larger" is the diagnostic's prediction of a larger generalization gap.
DIAGNOSTICS = {
    "mi_bound": ("MI bound √(2qσ²ln2·P/|N|)", lambda run: run["bounds"]["mi_bound"]),
    "intruders": ("intruders per matrix (ε=0.5, k=all)",
                  lambda run: run["spectral"]["mean_intruders"] if run["spectral"] else None),
    "sharpness": ("loss rise at ρ (1-D, filter-normalised)",
                  lambda run: run["landscape"]["sharpness"]["loss_rise"][-1]["mean_rise"] if run["landscape"] else None),
    "hessian": ("Hessian λ_max (trainable)",
                lambda run: run["hessian"]["eigenvalues"][0] if run["hessian"] else None),
}
OUTCOMES = {
    "test_metric": ("test accuracy", lambda run: run["stats"]["test_metric"]),
    "gap": ("Ĝ = L_test − L_train", lambda run: run["stats"]["generalization_gap"]),
}


def _json_or_none(path):
    return json.loads(path.read_text()) if path.exists() else None


def collect(runs, loss_clip=4.0):
    """One record per run directory (a checkpoint with training_stats.json) under `runs`."""
    from bounds.report import checkpoint_row
    import adapters
    runs = Path(runs)
    dirs = sorted(p.parent for p in runs.glob("*/training_stats.json"))
    if not dirs:
        raise AdapterError(f"no runs in {runs}: expected RUNS/<run>/training_stats.json")
    records = []
    for d in dirs:
        meta = adapters.read_meta(d)
        diag = d / "diagnostics"
        spectral = _json_or_none(diag / "spectral" / "spectral.json")
        records.append(dict(
            path=str(d), method=meta["method"], seed=meta.get("seed", 0), stats=adapters.read_stats(d),
            bounds=checkpoint_row(d, loss_clip=loss_clip),
            spectral=spectral["checkpoints"][0] if spectral else None, spectral_settings=(spectral or {}).get("settings"),
            landscape=_json_or_none(diag / "landscape" / "landscape.json"),
            hessian=_json_or_none(diag / "hessian" / "hessian.json")))
    return records


def per_method(records, read):
    """{method: [value per seed]} in the paper's method order, skipping runs without the value."""
    out = {}
    for m in style.method_order({r["method"] for r in records}):
        values = [read(r) for r in records if r["method"] == m]
        values = [float(v) for v in values if v is not None]
        if values:
            out[m] = values
    return out


def consistency(records, diagnostic, n_boot=2000, seed=0):
    """τ between the diagnostic's and the gap's orderings of the methods (means over seeds), and a
    percentile bootstrap interval: resample the seeds of each method with replacement."""
    read = DIAGNOSTICS[diagnostic][1]
    gap = OUTCOMES["gap"][1]
    both = [r for r in records if read(r) is not None]
    d, g = per_method(both, read), per_method(both, gap)
    methods = [m for m in d if m in g]
    tau = kendall_tau([np.mean(d[m]) for m in methods], [np.mean(g[m]) for m in methods])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if tau is not None else 0):
        pick = {m: rng.integers(0, len(d[m]), len(d[m])) for m in methods}  # the same seeds for both
        t = kendall_tau([np.mean(np.asarray(d[m])[pick[m]]) for m in methods],
                        [np.mean(np.asarray(g[m])[pick[m]]) for m in methods])
        if t is not None:
            boots.append(t)
    interval = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else None
    return dict(diagnostic=diagnostic, label=DIAGNOSTICS[diagnostic][0], tau=tau, interval=interval,
                methods=methods, n_bootstrap=len(boots))


def summary(records):
    """{method: {quantity: {"mean", "std", "values"}}} for every outcome and diagnostic."""
    table = {}
    for key, (_, read) in {**OUTCOMES, **DIAGNOSTICS}.items():
        for m, values in per_method(records, read).items():
            table.setdefault(m, {})[key] = dict(mean=float(np.mean(values)),
                                                std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                                                values=values)
    for m in table:
        run = next(r for r in records if r["method"] == m)
        table[m]["trained_parameters"] = run["bounds"]["trained_parameters"]
        table[m]["seeds"] = sorted(r["seed"] for r in records if r["method"] == m)
    return table


# -- tables -----------------------------------------------------------------------------------------

def _fmt(cell, digits=3):
    if cell is None:
        return "–"
    if cell["std"]:
        return f"{cell['mean']:.{digits}g} ± {cell['std']:.2g}"
    return f"{cell['mean']:.{digits}g}"


COLUMNS = [("test_metric", "test acc."), ("gap", "Ĝ"), ("mi_bound", "MI bound"), ("intruders", "intruders"),
           ("sharpness", "sharpness"), ("hessian", "λ_max")]


def markdown(table, taus, settings):
    head = "| method | trained scalars | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [f"Runs: {settings['runs']} · σ from loss clip b = {settings['loss_clip']} (σ = b/2) · "
             f"mean ± std over seeds", "", head, "|" + "---|" * (len(COLUMNS) + 2)]
    for m, row in table.items():
        lines.append(f"| {style.label(m)} | {row['trained_parameters']:,} | "
                     + " | ".join(_fmt(row.get(k)) for k, _ in COLUMNS) + " |")
    lines += ["", "Consistency with the empirical gap (Kendall τ over methods, 95 % bootstrap interval over seeds):",
              "", "| diagnostic | τ | interval | methods |", "|---|---|---|---|"]
    for t in taus:
        tau = "–" if t["tau"] is None else f"{t['tau']:+.2f}"
        ci = "–" if t["interval"] is None else f"[{t['interval'][0]:+.2f}, {t['interval'][1]:+.2f}]"
        lines.append(f"| {t['label']} | {tau} | {ci} | {len(t['methods'])} |")
    return "\n".join(lines) + "\n"


def _tex(s):
    return s.replace("_", r"\_").replace("±", r"$\pm$").replace("Ĝ", r"$\hat G$").replace("λ", r"$\lambda$")


def latex(table):
    """A booktabs table, methods grouped as full FT / LoRA family / sparse variants."""
    cols = "l" + "r" * (len(COLUMNS) + 1)
    lines = [r"\begin{tabular}{" + cols + "}", r"\toprule",
             "Method & Trained & " + " & ".join(_tex(c) for _, c in COLUMNS) + r" \\", r"\midrule"]
    for group, methods in style.METHOD_GROUPS.items():
        rows = [m for m in methods if m in table]
        if not rows:
            continue
        lines.append(rf"\multicolumn{{{len(COLUMNS) + 2}}}{{l}}{{\emph{{{group}}}}} \\")
        for m in rows:
            row = table[m]
            lines.append(f"{_tex(style.label(m))} & {row['trained_parameters']:,} & "
                         + " & ".join(_tex(_fmt(row.get(k))) for k, _ in COLUMNS) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


# -- figures ----------------------------------------------------------------------------------------

def plot_outcomes(table, out, formats):
    import matplotlib.pyplot as plt
    style.use()
    methods = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key in zip(axes, ("test_metric", "gap")):
        cells = [table[m].get(key) for m in methods]
        ax.bar(range(len(methods)), [c["mean"] for c in cells], yerr=[c["std"] for c in cells],
               color=[style.color(m) for m in methods], capsize=2)
        ax.set_xticks(range(len(methods)), [style.label(m) for m in methods], rotation=60, ha="right")
        ax.set_ylabel(OUTCOMES[key][0])
    axes[0].set_ylim(min(c["mean"] for m in methods for c in [table[m]["test_metric"]]) - 0.05, None)
    return style.save(fig, out, "outcomes", formats)


def plot_consistency(records, taus, out, formats):
    """One panel per diagnostic: its value against the empirical gap, one point per run."""
    import matplotlib.pyplot as plt
    style.use()
    fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(3.0 * len(DIAGNOSTICS), 3.0))
    for ax, (key, (label, read)), t in zip(axes, DIAGNOSTICS.items(), taus):
        for r in records:
            v = read(r)
            if v is not None:
                ax.scatter(v, OUTCOMES["gap"][1](r), color=style.color(r["method"]), s=14,
                           label=style.label(r["method"]))
        ax.set_xlabel(label, fontsize=7)
        ax.set_title("τ = –" if t["tau"] is None else f"τ = {t['tau']:+.2f}")
        if key == "mi_bound":
            ax.set_xscale("log")
    axes[0].set_ylabel(OUTCOMES["gap"][0])
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(6, len(unique)), fontsize=6,
               bbox_to_anchor=(0.5, -0.12))
    return style.save(fig, out, "consistency", formats)


def plot_landscapes(records, out, formats):
    """The 1-D train-loss curves of the first seed's runs, one per method, on one axis."""
    import matplotlib.pyplot as plt
    first = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["landscape"] and r["landscape"]["settings"]["dims"] == 1:
            first.setdefault(r["method"], r["landscape"])
    if not first:
        return []
    style.use()
    fig, ax = plt.subplots()
    for m in style.method_order(first):
        ls = first[m]
        ax.plot(ls["coords"][0], np.asarray(ls["loss"]) - ls["center_loss"], color=style.color(m),
                linestyle=style.linestyle(m), label=style.label(m))
    ax.set_xlabel("α (filter-normalised random direction, trainable parameters)")
    ax.set_ylabel("train loss − loss at θ*")
    ax.legend(ncol=2)
    return style.save(fig, out, "landscape_1d", formats)


def plot_spectral(records, out, formats):
    """The spectral figures (ε-sweep, heatmap, spectra, totals) over the first seed's runs."""
    from analysis import spectral
    first = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["spectral"]:
            first.setdefault(r["method"], r)
    if not first:
        return []
    ordered = [first[m] for m in style.method_order(first)]
    merged = {"settings": {**ordered[0]["spectral_settings"], "spectrum_matrix": None},
              "checkpoints": [r["spectral"] for r in ordered]}
    merged["settings"]["spectrum_matrix"] = spectral._spectrum_matrix(merged["checkpoints"])
    return spectral.plot_all(merged, out, formats, sweep_figure=True)


# -- the report ---------------------------------------------------------------------------------

def report(runs, out="figures", loss_clip=4.0, n_boot=2000, formats=("png", "pdf")):
    """Read every run under `runs`, write report.{md,tex,json} and the figures to `out`; return the dict."""
    records = collect(runs, loss_clip)
    table = summary(records)
    taus = [consistency(records, d, n_boot) for d in DIAGNOSTICS]
    settings = dict(runs=str(runs), loss_clip=loss_clip, sigma=loss_clip / 2, n_bootstrap=n_boot,
                    runs_count=len(records))
    out = Path(out)
    figures = (plot_outcomes(table, out, formats) + plot_consistency(records, taus, out, formats)
               + plot_landscapes(records, out, formats) + plot_spectral(records, out, formats))
    md = markdown(table, taus, settings)
    result = dict(settings=settings, methods=table, consistency=taus,
                  runs=[dict(path=r["path"], method=r["method"], seed=r["seed"],
                             **{k: read(r) for k, (_, read) in {**OUTCOMES, **DIAGNOSTICS}.items()})
                        for r in records],
                  figures=[str(p) for p in figures], markdown=md)
    write_text(out / "report.md", md)
    write_text(out / "report.tex", latex(table))
    write_json(out / "report.json", result)
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
    args = p.parse_args(argv)
    if not Path(args.runs).is_dir():
        raise AdapterError(f"runs directory not found: {args.runs}")
    result = report(args.runs, args.out, args.loss_clip, args.bootstrap, tuple(args.formats.split(",")))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
