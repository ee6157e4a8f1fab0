"""The bounds' tables: one row per checkpoint (bounds.report.checkpoint_row) and the comparison across them, as
Markdown (with the notes a reader needs) and LaTeX; a vacuous bound is marked VACUOUS (‡) in both."""
import math

from adapters.methods import GROUPS as METHOD_GROUPS, label, paper_order as method_order
from bounds.report import TRANSFORMER_NOTE, ties_note
from bounds.stats import MIN_DISTINCT_FOR_TAU


def fmt(x, digits=4):
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _rk(row):
    """r and k mean nothing for full fine-tuning or a trained head."""
    return ("–", "–") if row["method"] in ("fft", "head") else (fmt(row["rank"]), fmt(row["chain_length"]))


VACUOUS = "‡"  # the mark of a vacuous bound in md and LaTeX


def _mark(vacuous):
    return f" {VACUOUS}" if vacuous else ""


def _paper(row):
    lg = row.get("log10_paper_bound")
    if lg is None:
        return "–"
    return (fmt(row["paper_bound"]) if lg < 6 else f"10^{lg:.2f}") + _mark(row.get("paper_bound_vacuous"))


def _log10(row, key):
    t = row.get("theorem1") or {}
    return fmt(t.get(f"log10_phi_{key}")) if t.get("layers") else "–"


def to_markdown(rows, comparison):
    head = ["method", "r", "k", "\\|N\\|", "q", "σ", "P adapter", "P head", "P total", "formula (adapter)",
            "MI bound", "Φ_W0 + √ (paper)", "log10 Φ_ΔW", "log10 Φ_W0", "Ĝ (empirical)", "Ĝ clipped at b"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        check = fmt(r["formula_adapter_parameters"]) + (
            "" if r["formula_match"] is None else " ✓" if r["formula_match"] else " ✗ MISMATCH")
        cells = [label(r["method"]), *_rk(r), fmt(r["n_train"]), fmt(r["bits"]),
                 fmt(r["sigma"]) + ("*" if r["sigma_heuristic"] else ""), fmt(r["adapter_parameters"]),
                 fmt(r["head_parameters"]), fmt(r["trained_parameters"]), check,
                 fmt(r["mi_bound"]) + _mark(r["vacuous"]), _paper(r), _log10(r, "delta"), _log10(r, "base"),
                 fmt(r["empirical_gap"]), fmt(r["clipped_gap"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _notes(rows, comparison)
    return "\n".join(lines) + "\n"


def _notes(rows, comparison):
    notes = ["MI bound = sqrt(2 q σ² ln2 · P / |N|) with P = all trained scalars (adapter + head + other); "
             "it alone bounds the expected generalization error (W0 does not depend on the data)."]
    for r in rows:
        notes.append(f"{r['path']}: σ from {r['sigma_source']}. Ĝ: {r.get('gap_source') or 'none'}. "
                     f"Clipped gap: {r['clipped_gap_source']}.")
        t = r.get("theorem1")
        if t and t.get("layers"):
            notes.append(f"{r['path']}: Theorem 1 ({t['convention']}) over {t['layers']} adapted matrices, "
                         f"λ = {t['act_lipschitz']:g}, ‖σ(0)‖ = {t['act_zero_norm']:g}, C = {t['input_bound']:g}, "
                         f"L_ℓ = {t['loss_lipschitz']:g}.")
        elif t:
            notes.append(f"{r['path']}: Theorem 1 not computed: {t['skipped']}.")
        if r["method"] == "fft":
            notes.append(f"{r['path']}: fft formula = Σ m_i n_i over the weight matrices only; P counts every "
                         "trained tensor (biases, norms, embeddings, head).")
        if r["formula_match"] is False:
            notes.append(f"{r['path']}: WARNING counted adapter scalars {r['adapter_parameters']:,} differ from "
                         f"the docs/METHODS.md formula {r['formula_adapter_parameters']:,}.")
    if any(r.get("theorem1") for r in rows):
        notes.append(TRANSFORMER_NOTE + ".")
    if any(r["sigma_heuristic"] for r in rows):
        notes.append("* σ from the largest per-example loss seen: a heuristic, not a guarantee.")
    if any(r["vacuous"] or r["paper_bound_vacuous"] for r in rows):
        notes.append(f"{VACUOUS} vacuous: the bound is ≥ b, and a loss in [0, b] has |G| ≤ b for any weights, so it "
                     "says nothing. The bounds hold for the loss in [0, b]; Ĝ clipped at b is the gap they are about.")
    if comparison:
        for key, name in (("mi_bound", "MI bound"), ("paper_bound", "paper's form Φ_W0 + √")):
            c = comparison[key]
            ties = ties_note(name, c["distinct"], c["n"])
            notes.append(f"Kendall τ ({name} vs empirical gap Ĝ, n = {c['n']}): " + _tau_text(c)
                         + (f"; {ties}" if ties else ""))
    return [f"- {n}" for n in notes]


def _tau_text(c):
    """τ with its p-value, or why it is not shown: undefined (a constant ordering), or not informative (fewer than
    MIN_DISTINCT_FOR_TAU distinct values)."""
    if c["tau"] is None:
        return "n/a"
    if not c["informative"]:
        return (f"not informative ({c['distinct']} distinct values; τ needs at least {MIN_DISTINCT_FOR_TAU} to say "
                "anything)")
    return f"{c['tau']:.3f} (p = {c['p_value']:.3g})"


def to_latex(rows, comparison):
    """A booktabs table: methods grouped as full FT / LoRA family / sparse variants."""
    cols = ["Method", "$r$", "$k$", "$P$", "$|N|$", "MI bound", r"$\Phi_{W_0}+\sqrt{\cdot}$", r"$\hat G$"]
    out = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}",
           r"\toprule", " & ".join(cols) + r" \\", r"\midrule"]
    grouped = {g: [r for r in rows if r["method"] in ms] for g, ms in METHOD_GROUPS.items()}
    known = {m for ms in METHOD_GROUPS.values() for m in ms}
    grouped["other"] = [r for r in rows if r["method"] not in known]
    first = True
    for group, members in grouped.items():
        if not members:
            continue
        if not first:
            out.append(r"\midrule")
        first = False
        out.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{\emph{{{_tex(group)}}}}} \\")
        order = method_order([r["method"] for r in members])
        for r in sorted(members, key=lambda r: order.index(r["method"])):
            paper = _paper(r)
            if paper.startswith("10^"):
                paper = rf"$10^{{{paper[3:]}}}$"
            cells = [_tex(label(r["method"])), *_rk(r),
                     fmt(r["trained_parameters"]).replace(",", "{,}"), fmt(r["n_train"]).replace(",", "{,}"),
                     fmt(r["mi_bound"]) + _mark(r["vacuous"]), paper, fmt(r["empirical_gap"])]
            out.append(" & ".join(_tex_cell(c) for c in cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    sig = "; ".join(sorted({_tex(r["sigma_source"]) for r in rows}))
    caption = (r"Generalization bounds: MI bound $\sqrt{2q\sigma^2\ln 2\,P/|N|}$ over all $P$ trained scalars, "
               rf"the paper's form $\Phi_{{W_0}}+\sqrt{{\cdot}}$, and the empirical gap $\hat G$. $\sigma$: {sig}.")
    if any(r["vacuous"] or r["paper_bound_vacuous"] for r in rows):
        caption += (r" $^\ddagger$vacuous: $\geq b$, while a loss in $[0, b]$ has $|G| \leq b$ for any weights.")
    if comparison:
        c = comparison["mi_bound"]
        caption += (r" Kendall $\tau$ (MI bound vs $\hat G$) "
                    + (r"undefined (constant column)." if c["tau"] is None else rf"$= {c['tau']:.2f}$."
                       if c["informative"] else f"not informative ({c['distinct']} distinct values)."))
        ties = ties_note("MI bound", c["distinct"], c["n"])
        caption += f" {_tex(ties.replace('τ-b', 'tau-b'))}." if ties else ""
    out += [rf"\caption{{{caption}}}", r"\label{tab:bounds}", r"\end{table}"]
    return "\n".join(out) + "\n"


def _tex_cell(c):
    """A table cell: "–" (missing) as an en dash, a minus sign in math mode, the vacuous mark as a superscript."""
    if c == "–":
        return "--"
    c = c.replace(f" {VACUOUS}", r"$^\ddagger$")
    return "$-$" + c[1:] if c.startswith("-") else c


def _tex(s):
    for a, b in (("\\", r"\textbackslash{}"), ("--", "-{}-"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("$", r"\$"), ("σ", r"$\sigma$"), ("ℓ", r"$\ell$"), ("−", "-"), ("–", "--")):
        s = s.replace(a, b)
    return s
