"""The study's report: Tables 2 and 3, the bounds, the diagnostics, and how consistently each orders the methods.

    python -m analysis.report RUNS_DIR [--out figures/] [--loss-clip 4.0] [--bootstrap 2000] [--readme README.md]
                                       [--formats md,tex,png,pdf]

Every number is read from a run's own files (training_stats.json, diagnostics/*/…json) or computed by
the package that owns its formula (bounds.report for the bounds, bounds.stats for every interval, test and τ,
analysis.spectral for intruder averages); nothing is re-typed. This module puts the report together: the records
(analysis.records), the statistics over seeds (analysis.summary), the claims (analysis.claims), the tables
(analysis.tables), the figures (analysis.figures) and the README section (analysis.readme). It writes OUT/report.json,
the tables OUT/report.md and OUT/report.tex and the figures (--formats: md, tex; png, pdf, svg). `--readme FILE`
rewrites FILE's results section, between the lines <!-- results:begin --> and <!-- results:end -->, with the same
tables and the figures.

Comparable across methods:
- intruders are averaged over one matrix set for every method: the matrices the LoRA-family runs adapt (full
  FT restricted to them), listed in report.json with a breakdown per matrix type. Head-only adapts no matrix: n/a.
- sharpness and λ_max are taken in one space for every method, the weights W0 + ΔW of those matrices along the
  same directions (diagnostics/landscape, diagnostics/hessian); each method's own trainable space, whose size
  differs by method, is a second, labelled view (diagnostics/*_trainable).
Honest about itself:
- every aggregate records n (seeds); ± is the sample standard deviation over seeds; a 95 % interval is given only
  from n ≥ 3 (Student t for a mean, a two-level percentile bootstrap over methods and their seeds for τ), else it is
  null; a τ from fewer than 4 distinct values is marked not informative.
- the final runs are seeds apart from the one the lr was chosen at; the claims compare methods paired by seed and by
  test example, in three families with Holm's correction within each (analysis.claims): non-inferiority and
  equivalence at ±δ for accuracy, with the seeds it would take to decide; a claim resting on a run stopped at its
  cap while still improving says so.
- MI bounds ≥ b are marked vacuous, and Ĝ of the loss clipped at b (the loss they hold for) stands beside Ĝ.
- a λ_max whose Lanczos run did not converge is marked; where τ is shown, so are ties (the MI bound depends on P alone).
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from adapters import command
from adapters.errors import AdapterError, cli
from adapters.io import write_json
from adapters.settings import AT_LEAST_1, POSITIVE, Check, setting
from analysis.claims import FAMILIES, MARGIN, claims
from analysis.figures import plot_consistency, plot_landscapes, plot_outcomes, plot_spectral
from analysis.layout import REFERENCE_FILE, SELECTION_FILE, STUDY_FILE, data_label
from analysis.readme import README_BEGIN, README_END, readme_parts, readme_section, write_readme
from analysis.records import (DIAGNOSTICS, OUTCOMES, hessian_converged, read_json, collect, compared_matrices,
                              machines, restrict_intruders, study_elapsed)
from analysis.summary import consistency, summary
from analysis.tables import latex, markdown
from bounds.stats import ALPHA, MIN_SEEDS_FOR_INTERVAL


def _run_row(r):
    """A run's line in report.json: where it is, what it measured."""
    return dict(path=r["path"], method=r["method"], seed=r["seed"], lr=r["lr"], val_loss_falling=r["val_loss_falling"],
                **{k: read(r) for k, (_, read) in {**OUTCOMES, **DIAGNOSTICS}.items()},
                hessian_converged=hessian_converged(r, "hessian"),
                hessian_trainable_converged=hessian_converged(r, "hessian_trainable"),
                mi_bound_vacuous=r["bounds"]["vacuous"], converged=r["converged"],
                **{k: r["stats"].get(k) for k in ("best_step", "stopped_at", "cap_steps", "kept")})


def report(runs, out="figures", loss_clip=4.0, n_boot=2000, formats=("md", "tex", "png", "pdf"), readme=None,
           margin=MARGIN):
    """Read every run under `runs`, write report.json, the tables (report.md, report.tex: the table formats of
    `formats`) and the figures (its figure formats) to `out` (and the results section of `readme`); return the
    dict."""
    if readme is not None:
        readme_parts(readme)  # bad input first: nothing is written then
    records = collect(runs, loss_clip)
    matrices = compared_matrices(records)
    for r in records:
        r["intruders"] = restrict_intruders(r, matrices)
    selection = read_json(Path(runs) / SELECTION_FILE)
    table = summary(records, matrices, selection)
    taus = [consistency(records, d, n_boot) for d in DIAGNOSTICS]
    found = claims(records, n_boot, margin)
    study = read_json(Path(runs) / STUDY_FILE)
    settings = dict(runs=str(runs), out=str(out), loss_clip=loss_clip, sigma=loss_clip / 2, n_bootstrap=n_boot,
                    margin=margin, alpha=ALPHA, families=FAMILIES,
                    select_seed=(selection or {}).get("select_seed", (study or {}).get("select_seed")),
                    seeds=(selection or {}).get("seeds", (study or {}).get("seeds")),
                    runs_count=len(records), matrices=matrices, min_seeds_for_interval=MIN_SEEDS_FOR_INTERVAL,
                    training_seconds=sum(r["stats"].get("wall_time_s") or 0.0 for r in records),
                    machines=machines(records),
                    study=study, elapsed_seconds=study_elapsed(runs), model=(study or {}).get("model"),
                    data=dict(task=(study or {}).get("task"), file=(study or {}).get("data"),
                              sha256=(study or {}).get("data_sha256"), label=data_label(study or {})),
                    reference=read_json(Path(runs) / REFERENCE_FILE),
                    executor=(selection or {}).get("executor"), select_by=(selection or {}).get("select_by"))
    out = Path(out)
    drawn = command.figure_formats(formats)
    figures = (plot_outcomes(table, out, drawn) + plot_consistency(records, taus, out, drawn)
               + plot_landscapes(records, out, drawn) + plot_spectral(records, matrices, out, drawn)) if drawn else []
    md = markdown(table, taus, settings, found)
    result = dict(settings=settings, methods=table, consistency=taus, claims=found,
                  runs=[_run_row(r) for r in records], figures=[str(p) for p in figures], markdown=md)
    if readme is not None:
        result["readme_section"] = readme_section(result, readme)
    command.write_tables(out, "report", formats, {"md": md, "tex": latex(table, settings["reference"], study)})
    write_json(out / "report.json", result)
    if readme is not None:
        write_readme(readme, result["readme_section"])
    return result


# δ of the accuracy claims: a difference of accuracies, strictly between 0 and 1 (analysis.study checks it too).
MARGIN_RANGE = Check("in (0, 1), a difference of accuracies", lambda v: 0 < v < 1)


@dataclass(frozen=True)
class ReportConfig:
    """The settings of `python -m analysis.report` (the runs directory is its positional argument)."""
    loss_clip: float = setting(4.0, "σ = b/2 for the clipped loss min(ℓ, b) in the MI bound (docs/THEORY.md "
                               "section 1)", check=POSITIVE)
    bootstrap: int = setting(2000, "bootstrap resamples for τ and for the test examples of a paired difference",
                             check=AT_LEAST_1)
    margin: float = setting(MARGIN, "δ of the accuracy claims (non-inferiority, equivalence)", check=MARGIN_RANGE)
    formats: tuple = command.formats()
    readme: Optional[str] = setting(None, f"rewrite this file's section between {README_BEGIN} and {README_END} "
                                    "with the results", results=False, metavar="FILE")
    out: str = command.out("figures", "report.json, report.md / report.tex and the figures per --formats")


def parser():
    p = command.parser("python -m analysis.report", __doc__, ReportConfig)
    p.add_argument("runs", metavar="RUNS", help="the study's runs directory (analysis.study --runs)")
    return p


def written(result, out, formats, readme=None):
    """The summary line of what report() wrote into `out` (and `readme`)."""
    out = Path(out)
    files = [out / "report.json"] + command.table_paths(out, "report", formats)
    drawn = command.figure_formats(formats)
    text = f"wrote {', '.join(map(str, files))}"
    if drawn:
        text += f" and {len(result['figures'])} figures ({', '.join(drawn)}) in {out}"
    return text + (f"; the results section of {readme}" if readme is not None else "")


@cli
def main(argv=None):
    config, args = command.parse(parser(), ReportConfig, argv)
    if not Path(args["runs"]).is_dir():
        raise AdapterError(f"runs directory not found: {args['runs']}")
    result = report(args["runs"], config.out, config.loss_clip, config.bootstrap, config.formats, config.readme,
                    config.margin)
    print(result["markdown"])
    print(written(result, config.out, config.formats, config.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
