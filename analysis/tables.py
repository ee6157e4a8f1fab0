"""The report's tables: Markdown (the report and the README's results section) and LaTeX (booktabs)."""
from analysis import style
from analysis.layout import data_label
from bounds.report import ties_note
from bounds.tables import VACUOUS
from adapters.methods import METHODS
from bounds.stats import LEVEL, MAX_SEEDS, MIN_DISTINCT_FOR_TAU, MIN_SEEDS_FOR_INTERVAL

NOT_CONVERGED = "†"


def _signed(x):
    return f"{x:+.3g}"


def p_text(p):
    """A p-value with its digits: 0.997, not 1; '< 0.001' and '> 0.999' at the ends; n/a when there is none. Never
    rounded onto the 0.05 line it is compared with: 0.0498 stays 0.0498, 0.0502 stays 0.0502."""
    if p is None:
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    if p > 0.999:
        return "> 0.999"
    return f"{p:.3f}" if f"{p:.3f}" != "0.050" else f"{p:.4f}"


def _ci(ci):
    return "n/a" if ci is None else f"[{_signed(ci[0])}, {_signed(ci[1])}]"


def _verdict(c):
    text = c["verdict"]
    if c.get("note"):
        text += f" ({c['note']})"
    if c["not_converged"]:
        text += f"; rests on runs stopped at the cap still improving: {', '.join(c['not_converged'])}"
    return text


def _to_decide(c):
    """What would decide an accuracy claim: the margin today's seeds decide non-inferiority at, and the seeds for
    80 % power at the observed difference and variances (or why no number of seeds does)."""
    w = c.get("power") or {}
    if w.get("margin_decided") is None:
        return "n/a"
    now = f"non-inferior now for δ > {w['margin_decided']:.3f}"
    if c["verdict"] != "undecided":
        return f"decided; {now}"
    goal = "non-inferiority" if c["diff"] > -c["margin"] else "worse by more than δ"
    seeds = (f"{w['seeds']} seeds for {w['power']:.0%} power to show {goal}" if w["seeds"] is not None else
             f"no number of seeds shows {goal} with this test set (its own error is too large)"
             if w["limited_by"] == "test set" else f"more than {MAX_SEEDS} seeds to show {goal}")
    return f"{now}; at δ = {c['margin']:g}: {seeds}"


def _lengths(c):
    """Both methods' training lengths: steps per seed, and the chain's best link per seed."""
    parts = []
    for m, run in c["lengths"].items():
        links = [b for b in run["best_link"] if b is not None]
        parts.append(f"{m} {'/'.join(str(s) for s in run['steps'])}"
                     + (f" (best link {'/'.join(map(str, links))})" if links and max(links) > 0 and
                        METHODS[m].chain_length > 1 else ""))
    return " · ".join(parts)


def _count(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def _accuracy_row(c):
    n = (f"{_count(c['n_seeds'], 'seed')} × {c['n_examples']} test examples" if c["examples_paired"] else
         f"{_count(c['n_seeds'], 'seed')} (no per-example outcomes: seeds only)")
    parts = "" if c["se"] is None else f" (± {c['se_seeds']:.3f}, ± {c['se_examples']:.3f})"
    return [c["claim"], f"{c['first']} − {c['second']} = {_signed(c['diff'])}", n, _ci(c["ci"]) + parts,
            *(f"{p_text(c[p])} ({p_text(c[p + '_holm'])})" for p in ("p_noninferior", "p_equivalent", "p_worse")),
            _verdict(c), _to_decide(c)]


def _direction_row(c):
    return [c["claim"], f"{c['first']} − {c['second']} = {_signed(c['diff'])}", str(c["n_seeds"]), _ci(c["ci"]),
            f"{p_text(c['p'])} ({p_text(c['p_holm'])})", _verdict(c), _lengths(c)]


def _tau_row(c):
    seeds = sorted(set(c["n"]))
    n = f"{len(c['n'])} methods, {'–'.join(map(str, [seeds[0], seeds[-1]] if len(seeds) > 1 else seeds))} seeds each"
    return [c["claim"].replace("|", "\\|"), f"τ({c['first']}) − τ({c['second']}) = {_signed(c['diff'])}", n,
            _ci(c["ci"]), f"{p_text(c['p'])} ({p_text(c['p_holm'])})", _verdict(c)]


# Each family's table: its title, what it tests (from a claim, which says the margin), its columns, a row per claim.
FAMILY_TABLES = {
    "accuracy": ("Accuracy against a baseline",
                 lambda c: f"Competitive = non-inferior at δ = {c['margin']:g} "
                           "(one-sided, H0: worse by δ or more); equivalent = TOST at ±δ; worse by more than δ = the "
                           "opposite one-sided test. The interval is the 90 % one (each end a one-sided bound at α); "
                           "its error adds the seeds' and the test examples' (one bootstrap of the examples for both "
                           "methods and every seed), with Welch–Satterthwaite degrees of freedom.",
                 ["claim", "difference", "n", "90 % interval (± seeds, ± examples)", "p non-inferior (Holm)",
                  "p equivalent (Holm)", "p worse by > δ (Holm)", "verdict", "to decide it"], _accuracy_row),
    "direction": ("Chained method against its one-link twin",
                  lambda c: "The paired t-test over seeds (two-sided), "
                            "95 % interval; holds when the adjusted p < α on the claimed side, fails on the other. "
                            "Last column: steps trained per seed (and the chain's best link), since a longer run can "
                            "explain a difference.",
                  ["claim", "difference", "seeds", "95 % interval", "p (Holm)", "verdict", "steps per seed"],
                  _direction_row),
    "tau": ("The MI bound against each other diagnostic",
            lambda c: "τ(bound, Ĝ) − τ(other, Ĝ); 95 % two-level "
                      "percentile bootstrap interval and p (the methods compared resampled, then each drawn method's "
                      "seeds; both τ's from the same resample).",
            ["claim", "difference", "n", "95 % interval", "p (Holm)", "verdict"], _tau_row),
}


def claim_lines(found, settings=None):
    """The claims tables, one per family (analysis.claims.FAMILIES), each with its Holm-adjusted p's; difference =
    first − second as the claim names them, paired by seed."""
    if not found:
        return []
    alpha = (settings or {}).get("alpha", 0.05)
    lines = [f"The paper's claims on this study, in {len({c['family'] for c in found})} families; Holm's correction "
             f"within each family, every verdict decided on its adjusted p at α = {alpha:g}; differences are "
             "first − second, paired by seed (the same split, head initialisation and data order for both); no "
             f"interval below n = {MIN_SEEDS_FOR_INTERVAL} seeds (undecided then).", ""]
    for family, (title, text, columns, row) in FAMILY_TABLES.items():
        rows = [c for c in found if c["family"] == family]
        if rows:
            lines += [f"**{title}** ({_count(len(rows), 'claim')}). {text(rows[0])}", "",
                      "| " + " | ".join(columns) + " |",
                      "|" + "---|" * len(columns), *("| " + " | ".join(row(c)) + " |" for c in rows), ""]
    counts = {v: sum(c["verdict"] == v for c in found) for v in dict.fromkeys(c["verdict"] for c in found)}
    return lines + [" · ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(found)} claims.", ""]


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


def task_metric(table):
    """The study's task metric (every run of a study has one task): accuracy, or a causal LM's perplexity."""
    return next(iter(table.values()), {}).get("metric", "accuracy")


def _columns(table, columns):
    """The columns, the test metric's named after the task's own (accuracy is "test acc.")."""
    metric = task_metric(table)
    return [(k, f"test {metric}" if k == "test_metric" and metric != "accuracy" else c) for k, c in columns]


def _rows(table, columns):
    columns = _columns(table, columns)
    head = "| method | n | lr | trained scalars | " + " | ".join(c for _, c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 4)]
    for m, row in table.items():
        lines.append(f"| {style.label(m)} | {len(row['seeds'])} | {_lr(row)} | {row['trained_parameters']:,} | "
                     + " | ".join(_cell(row, k) for k, _ in columns) + " |")
    return lines


REFERENCE_LABEL = "untrained model (reference)"


def _reference_cells(reference):
    """The untrained model's cells in COLUMNS' order (adapters.evaluate on the runs' task and splits): its test metric
    and Ĝ; it trains nothing and has no diagnostics (n/a). None without a reference with train and test splits."""
    if not reference or not {"train", "test"} <= set(reference["splits"]):
        return None
    train, test = reference["splits"]["train"], reference["splits"]["test"]
    cells = {"test_metric": f"{test['metric']:.3g}", "gap": f"{test['loss'] - train['loss']:.3g}"}
    return [cells.get(k, "n/a") for k, _ in COLUMNS]


def _reference_row(reference):
    cells = _reference_cells(reference)
    return [] if cells is None else [f"| {REFERENCE_LABEL} | – | – | 0 | " + " | ".join(cells) + " |"]


def _selection_rows(table):
    """The lr search: each method's grid with its validation scores (extensions marked +), the choice, and how
    each seed's run ended (best step / stopped at; whether it hit its cap still improving)."""
    rows = [(m, row) for m, row in table.items() if row.get("lr_selection")]
    if not rows:
        return []
    by = rows[0][1]["lr_selection"]["by"]
    lines = [f"Learning rates, each chosen on the validation split by {by} (ties: lower validation loss), at the "
             "selection seed, whose runs are not among the final ones; * = the choice; + = a grid point added because "
             "the choice was at an edge; ‖ = the choice "
             "is still at an edge (the search's bound reached). Last column, per final seed: the step of the best "
             "validation evaluation (the weights kept; a chain's: and its link) / the step the run stopped at; \"cap, "
             "improving\": it hit its cap while still improving (not converged):", "",
             "| method | grid: validation score | chosen | best / stopped, per seed |", "|---|---|---|---|"]
    for m, row in rows:
        sel = row["lr_selection"]
        added = {f"{e['lr']:g}" for e in sel.get("extensions", [])}
        grid = " · ".join(f"{'+' if lr in added else ''}{lr}{'*' if float(lr) == sel['lr'] else ''}: {score:.3f}"
                          for lr, score in sorted(sel["scores"].items(), key=lambda kv: float(kv[0])))
        ends = " · ".join(_ending(s, c) for s, c in zip(row.get("stopped", []), row.get("converged", [])))
        lines.append(f"| {style.label(m)} | {grid} | {sel['lr']:g}{' ‖' if sel['at_edge'] else ''} | {ends} |")
    return lines + [""]


def _ending(stopped, converged):
    """'96 / 160' (best step / stopped at; a chain's: '96 (link 1 of 3) / 160'), marked when the run hit its cap
    still improving."""
    if stopped.get("stopped_at") is None:
        return "n/a"
    link = (f" (link {stopped['best_link']} of {stopped['links']})"
            if (stopped.get("links") or 0) > 1 and stopped.get("best_link") else "")
    return (f"{stopped['best_step'] if stopped['best_step'] is not None else 'n/a'}{link} / {stopped['stopped_at']}"
            + (" (cap, improving)" if converged is False else ""))


def _study_line(study, elapsed=None, executor=None, machines=()):
    if not study:
        return []
    train = ", ".join(f"{k} {v}" for k, v in (study.get("train") or {}).items())
    where = ""
    if elapsed is not None:
        executor = executor or {}
        cpus = f", {executor['cluster_cpus']:g} CPUs" if executor.get("cluster_cpus") else ""
        busy = (f"; its {executor['jobs']} jobs kept its {executor['slots']} slot{'s' * (executor['slots'] != 1)} busy "
                f"{executor['utilisation']:.0%} of the time" if executor.get("utilisation") is not None else "")
        on = f" on {' and '.join(machines)}" if machines else ""
        where = (f" It took {elapsed / 60:.1f} min from its start to its last result{on} "
                 f"(executor {executor.get('executor', 'serial')}{cpus}{busy}).")
    seeds = (f" Each method's lr chosen on validation at seed {study['select_seed']}, whose runs are never tested; "
             f"the final runs, tested and compared, are seeds {', '.join(map(str, seeds_of))}."
             if study.get("select_seed") is not None and (seeds_of := study.get("seeds")) else "")
    return [f"Study (runs/study.json): model {study.get('model')}, {data_label(study)}, r = {study.get('rank')}, "
            f"α = {study.get('alpha')}, chain length k = {study.get('chain_length')} for the chained methods, "
            f"budget {study.get('budget')}: {train}.{seeds}{where}", ""]


def markdown(table, taus, settings, found=None):
    """The report in Markdown: the tables, the lr search, the consistency of each diagnostic with Ĝ, the claims
    (`found`, as analysis.claims decides them) and the notes."""
    matrices = settings["matrices"]
    types = sorted({t for row in table.values() if row["intruders"] for t in row["intruders"]["by_type"]})
    study = dict(settings.get("study") or {}, seeds=settings.get("seeds")) if settings.get("study") else None
    lines = _study_line(study, settings.get("elapsed_seconds"), settings.get("executor"),
                        settings.get("machines") or ()) + [
        f"Runs: {settings['runs_count']} in {settings['runs']} · σ from loss clip b = {settings['loss_clip']:g} "
        f"(σ = b/2) · each cell: mean ± sample standard deviation over the n seeds (no ± for n = 1) · "
        f"training time summed over the runs: {settings['training_seconds'] / 60:.1f} min", "",
        *_rows(table, COLUMNS), *_reference_row(settings.get("reference")), "",
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
              "two-level percentile bootstrap interval, the methods resampled and then each one's seeds, only when "
              f"every method has n ≥ {MIN_SEEDS_FOR_INTERVAL}):",
              "", "| diagnostic | τ | interval | methods | distinct values |", "|---|---|---|---|---|"]
    for t in taus:
        tau = "n/a" if t["tau"] is None else f"{t['tau']:+.2f}" if t["informative"] else "not informative"
        ci = "n/a" if t["interval"] is None or not t["informative"] else \
            f"[{t['interval'][0]:+.2f}, {t['interval'][1]:+.2f}]"
        mark = f" {NOT_CONVERGED}" if t["not_converged"] else ""
        label = t["label"].replace("|", "\\|")  # |N| inside a Markdown table cell
        lines.append(f"| {label}{mark} | {tau} | {ci} | {len(t['methods'])} | {t['distinct']} |")
    lines += ["", *claim_lines(found or [], settings)]
    lines += [f"- {n}" for n in _notes(table, taus)]
    return "\n".join(lines) + "\n"


def _notes(table, taus):
    notes = []
    n_min = min((min(t["n"].values()) for t in taus if t["n"]), default=0)
    if n_min < MIN_SEEDS_FOR_INTERVAL:
        notes.append(f"No intervals: the fewest seeds of a method is n = {n_min} < {MIN_SEEDS_FOR_INTERVAL}.")
    if any(not t["informative"] for t in taus):
        notes.append(f"τ is not informative from fewer than {MIN_DISTINCT_FOR_TAU} distinct values: even τ = ±1 then "
                     "comes often from a random ordering.")
    for t in taus:
        ties = ties_note(t["label"].split(" √")[0], t["distinct"], len(t["methods"]))
        if ties:
            notes.append(ties + ".")
    for m, row in table.items():  # a chain that kept its first link in every seed is its twin's run, said so
        spec = METHODS[m].adapter
        links = [s.get("best_link") for s in row.get("stopped", [])]
        if spec is not None and spec.chained and links and all(b == 1 for b in links):
            twin = (f"those of its one-link twin {style.label(spec.twin)} at its lr ({_lr(row)})" if
                    spec.one_link_is_twin else f"those of one link, which is not its twin {style.label(spec.twin)}")
            notes.append(f"{style.label(m)} kept its first link's weights in every seed (its later links never "
                         f"lowered the validation loss): its numbers are {twin}.")
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


def caption(study):
    """What a table was computed on, for its LaTeX caption: the model and the data (analysis.layout.data_label)."""
    return _tex(f"model {study.get('model')}, {data_label(study)}") if study else ""


def latex(table, reference=None, study=None):
    """A booktabs table in a table environment whose caption names the model and the data (`study`: its settings),
    methods grouped as full FT / LoRA family / sparse variants; the untrained model's row (`reference`,
    adapters.evaluate's result) under them."""
    cols = "l" + "r" * (len(COLUMNS) + 2)
    lines = [r"\begin{table}", r"\centering",
             r"\caption{Test metric, empirical gap and diagnostics per method (" + caption(study) + ")}",
             r"\begin{tabular}{" + cols + "}", r"\toprule",
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
    cells = _reference_cells(reference)
    if cells is not None:
        lines += [r"\midrule", f"{REFERENCE_LABEL.capitalize()} & -- & 0 & " + " & ".join(cells) + r" \\"]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", "",
              r"% mean $\pm$ sample standard deviation over $n$ seeds; $^\ddagger$ vacuous bound; "
              r"$^\dagger$ Lanczos not converged"]
    return "\n".join(lines) + "\n"
