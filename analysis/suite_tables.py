"""The suite's tables, from the dict analysis.suite writes to suite.json: Markdown, LaTeX and the README section."""
import os
from pathlib import Path

from analysis import style
from analysis.tables import _tex, p_text


def _value(x, metric):
    """A cell's number: accuracy in percent, anything else (a perplexity, Ĝ) to 3 significant digits."""
    return f"{100 * x:.1f}" if metric == "accuracy" else f"{x:.3g}"


def _row(s, task, key, sd_key, metric, drops):
    """One task's cells as (text, the row's best?): mean ± sd, and with `drops` each other cell's drop from the
    best (in `metric`'s units); None for a method without a result."""
    means = {m: s[key][m][task] for m in s["methods"]}
    known = [v for v in means.values() if v is not None]
    higher = s["metrics"][task]["higher_is_better"] if key == "table" else False  # Ĝ: lower is better
    best = (max if higher else min)(known) if known else None
    cells = []
    for m in s["methods"]:
        v, sd = means[m], s[sd_key][m][task]
        if v is None:
            cells.append(None)
            continue
        text = _value(v, metric) + (f" ± {_value(sd, metric)}" if sd is not None else "")
        # how far from the best: a drop ("−") where higher is better, a rise ("+") where lower is
        away = f" ({'−' if higher else '+'}{_value(abs(v - best), metric)})" if drops and v != best else ""
        cells.append((text + away, v == best))
    return cells


def _md_cells(cells):
    return ["n/a" if c is None else f"**{c[0]}**" if c[1] else c[0] for c in cells]


def _tex_cells(cells):
    return ["--" if c is None else r"\textbf{" + _tex(c[0]) + "}" if c[1] else _tex(c[0]) for c in cells]


def _tasks_table(s):
    lines = ["| task | model | data | metric | seeds | report |", "|---|---|---|---|---|---|"]
    for st in s["settings"]["studies"]:
        name = st["name"]
        seeds = max((s["n"][m][name] or 0) for m in s["methods"])
        metric = s["metrics"][name]
        lines.append(f"| {name} | {st['model']} | {st['label']} | {metric['metric']} "
                     f"({'higher' if metric['higher_is_better'] else 'lower'} is better) | {seeds} | "
                     f"{st['report']}/report.md |")
    return lines


def _table(s, key, sd_key, title):
    lines = [title, "", "| task | " + " | ".join(style.label(m) for m in s["methods"]) + " |",
             "|---|" + "---|" * len(s["methods"])]
    for task in s["tasks"]:
        metric = s["metrics"][task]["metric"] if key == "table" else "gap"
        lines.append(f"| {task} | " + " | ".join(_md_cells(_row(s, task, key, sd_key, metric, True))) + " |")
    return lines


def _ranks(s):
    if not s["average_rank"]:
        return ["No task has a result for every method: no ranks."]
    lines = [f"Ranks (1 = best; tied methods share the mean of their ranks) over the {len(s['complete_tasks'])} "
             f"tasks every method completed ({', '.join(s['complete_tasks'])}):", "",
             "| task | " + " | ".join(style.label(m) for m in s["methods"]) + " |",
             "|---|" + "---|" * len(s["methods"])]
    for task, r in s["ranks"].items():
        lines.append(f"| {task} | " + " | ".join(f"{r[m]:g}" for m in s["methods"]) + " |")
    lines.append("| **average rank** | " + " | ".join(f"**{s['average_rank'][m]:.2f}**" for m in s["methods"])
                 + " |")
    f = s["friedman"]
    lines += ["", f"Friedman's test that every method ranks alike: χ² = {f['statistic']:.2f} with "
                  f"{f['methods'] - 1} degrees of freedom, p = {p_text(f['p'])} ({f['tasks']} tasks × "
                  f"{f['methods']} methods)." if f else
              "Friedman's test needs at least 3 methods and 2 tasks: not computed."]
    return lines


def _posthoc(s):
    post = s["posthoc"]
    if post is None:
        return []
    alpha, methods = s["settings"]["alpha"], s["methods"]
    lines = ["", f"Post-hoc: {s['settings']['posthoc']}. Holm-adjusted p of each pair (the critical-difference "
                 f"diagram, cd_diagram.png, joins the methods no p < α = {alpha:g} separates):", "",
             "| | " + " | ".join(style.label(m) for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for a in methods:
        lines.append(f"| {style.label(a)} | " + " | ".join("–" if a == b else p_text(post["p"][a][b])
                                                          for b in methods) + " |")
    pairs = len(methods) * (len(methods) - 1) // 2
    if post["min_p"] >= alpha:
        lines += ["", f"With {len(s['complete_tasks'])} tasks the smallest two-sided p a pair can reach is "
                      f"{post['min_p']:.3g} ≥ α (before Holm over {pairs} pairs): no pair can be told apart by "
                      "these tasks, whatever the results; more tasks can."]
    return lines


def _claims(s):
    rows = s["claims"]
    if not rows:
        return []
    lines = ["", "The paper's claims across tasks: per task the study's own verdict; over the tasks the mean of the "
                 "per-task paired differences with its interval over tasks (t, the tasks as the sample), decided as "
                 "one study decides, Holm within each family (a τ that is not informative in a task is left out of its "
                 "mean):", "",
             "| claim | per task (difference: verdict) | over tasks: mean [interval] | p, Holm-adjusted | verdict |",
             "|---|---|---|---|---|"]
    for c in rows:
        per = " · ".join(f"{t} {v['diff']:+.3f}: {v['verdict']}" if v["diff"] is not None else f"{t}: {v['verdict']}"
                         for t, v in c["per_task"].items())
        diff = "n/a" if c["diff"] is None else f"{c['diff']:+.3f}"
        ci = (f" [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] ({c.get('level', 0.9):.0%}, {c['tasks']} tasks)"
              if c.get("ci") else " (τ not informative in any task)" if not c["tasks"] else
              f" (no interval from {c['tasks']} task{'s' * (c['tasks'] != 1)})")
        p = (" · ".join(f"{name} {p_text(c.get(key + '_holm'))}" for name, key in
                        (("non-inferior", "p_noninferior"), ("equivalent", "p_equivalent"), ("worse", "p_worse")))
             if c["family"] == "accuracy" else p_text(c.get("p_holm")))
        lines.append(f"| {c['claim']} | {per} | {diff}{ci} | {p} | {c['verdict']} |")
    return lines


def _header(s):
    st = s["settings"]
    on = sorted({m for x in st["studies"] for m in (x.get("machines") or [])})
    took = (f" It took {st['elapsed_seconds'] / 60:.1f} min from its first study's start to its last result"
            + (f" on {' and '.join(on)}" if on else "") + " (measured off the files: a pause between an interrupted "
            "invocation and its resume counts)." if st.get("elapsed_seconds") is not None else "")
    ex = st.get("executor") or {}
    last = (f" Its last invocation took {st['this_invocation_seconds'] / 60:.1f} min: one {ex['executor']} queue of "
            f"{ex.get('jobs')} jobs (finished ones skipped at once) over {ex.get('slots')} slots."
            if ex.get("executor") and st.get("this_invocation_seconds") is not None else "")
    return [f"Suite {st['suite']}: {len(s['tasks'])} tasks × {len(s['methods'])} methods, every task a full study "
            f"(its own lr per method, chosen at the selection seed, then its final seeds).{took}{last}", ""]


def markdown(s):
    metrics = {m["metric"] for m in s["metrics"].values()}
    unit = "accuracy in %" if metrics == {"accuracy"} else "accuracy in %, other metrics as they are"
    lines = (_header(s) + _tasks_table(s) + [""]
             + _table(s, "table", "sd", f"Table 2: test metric per task ({unit}), mean ± sd over seeds; bold: the "
                                        "row's best; (−x): the cell's drop from it.")
             + [""] + _ranks(s) + _posthoc(s) + [""]
             + _table(s, "gap", "gap_sd", "Table 3: empirical generalization gap Ĝ (test loss − train loss) per "
                                          "task, mean ± sd over seeds; bold: the row's lowest; (+x): the cell's rise "
                                          "above it.")
             + _claims(s))
    return "\n".join(lines) + "\n"


def caption(s):
    """What the suite was computed on: each task's model and data."""
    return "; ".join(f"{st['name']}: model {st['model']}, {st['label']}" for st in s["settings"]["studies"])


def latex(s):
    """Tables 2 and 3 as booktabs tables, their captions naming each task's model and data."""
    out = []
    for key, sd_key, what in (("table", "sd", r"Test metric (accuracy in \%), mean $\pm$ sd over seeds; bold: the "
                                              "task's best"),
                              ("gap", "gap_sd", r"Empirical generalization gap $\hat G$, mean $\pm$ sd over seeds; "
                                                "bold: the task's lowest")):
        cols = "l" + "r" * len(s["methods"])
        lines = [r"\begin{table}", r"\centering",
                 r"\caption{" + what + ". " + _tex(caption(s))
                 + "}", r"\begin{tabular}{" + cols + "}", r"\toprule",
                 "Task & " + " & ".join(_tex(style.label(m)) for m in s["methods"]) + r" \\", r"\midrule"]
        for task in s["tasks"]:
            metric = s["metrics"][task]["metric"] if key == "table" else "gap"
            lines.append(_tex(task) + " & " + " & ".join(_tex_cells(_row(s, task, key, sd_key, metric, False)))
                         + r" \\")
        if key == "table" and s["average_rank"]:
            lines += [r"\midrule", "Average rank & " + " & ".join(f"{s['average_rank'][m]:.2f}" for m in s["methods"])
                      + r" \\"]
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
        out += lines
    return "\n".join(out)


def readme_section(s, readme):
    """The README's suite section: the suite's Markdown, then its critical-difference diagram."""
    where = Path(readme).resolve().parent
    links = [f"![{Path(p).stem}]({os.path.relpath(Path(p).resolve(), where)})" for p in s["figures"]
             if p.endswith(".png")]
    command = f"python -m analysis.suite {s['settings']['suite']} --readme {Path(readme).name}"
    return f"<!-- written by `{command}`: edits here are overwritten -->\n\n" + s["markdown"] + "\n" + \
        "\n".join(links) + "\n"
