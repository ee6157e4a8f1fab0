"""The report's figures: outcomes per method, each diagnostic against Ĝ, the 1-D landscapes, the spectral figures."""
import numpy as np

from analysis import style
from analysis.records import DIAGNOSTICS, OUTCOMES, hessian_converged
from analysis.tables import task_metric


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
        ax.set_ylabel(OUTCOMES[key][0] if key != "test_metric" else f"test {task_metric(table)}")
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
                hollow = hessian_converged(r, key) is False
                ax.scatter(v, OUTCOMES["gap"][1](r), s=14, label=style.label(r["method"]),
                           facecolors="none" if hollow else c, edgecolors=c)
        # the label as a title: the x offset text (×1e−5 …) then never runs into it
        ax.set_title(f"{label}\nτ = " + ("n/a" if t["tau"] is None else f"{t['tau']:+.2f}" if t["informative"]
                                          else "not informative"), fontsize=7)
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
    """The 1-D train-loss curves of the first final seed's runs, one per method: common space, then own space."""
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
    """The spectral figures (ε-sweep, heatmap, spectra, totals) over the compared matrices of the first final
    seed's runs; methods that adapt no matrix (head-only) are left out."""
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


def plot_cd_diagram(average_rank, pvalues, alpha, out, formats, title=""):
    """The critical-difference diagram of a suite: each method at its average rank over the tasks (1 = best, left),
    a bar joining methods whose pairwise post-hoc p (Holm-adjusted) is ≥ α: those the tasks cannot tell apart.
    Drawn by scikit-posthocs from our ranks and p's."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import scikit_posthocs as sp
    style.use()
    methods = list(average_rank)
    sig = pd.DataFrame([[1.0 if a == b else pvalues[a][b] for b in methods] for a in methods], index=methods,
                       columns=methods)
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.3 * len(methods)))
    sp.critical_difference_diagram({style.label(m): r for m, r in average_rank.items()},
                                   sig.rename(index=style.label, columns=style.label), alpha=alpha, ax=ax,
                                   color_palette={style.label(m): style.color(m) for m in methods})
    ax.set_title(title, fontsize=8)
    return style.save(fig, out, "cd_diagram", formats)
