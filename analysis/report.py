"""The study's report: Tables 2 and 3, the bounds, the diagnostics, and how consistently each orders the methods.

    python -m analysis.report RUNS_DIR [--out figures/] [--loss-clip 4.0] [--bootstrap 2000] [--readme README.md]

Every number is read from a run's own files (training_stats.json, diagnostics/*/…json) or computed by
the package that owns its formula (bounds.report for the bounds, bounds.stats for every interval, test and τ,
analysis.spectral for intruder averages); nothing is re-typed. This module puts the report together: the records
(analysis.records), the statistics over seeds (analysis.summary), the claims (analysis.claims), the tables
(analysis.tables), the figures (analysis.figures) and the README section (analysis.readme). `--readme FILE` rewrites
FILE's results section, between the lines <!-- results:begin --> and <!-- results:end -->, with the same tables and
the figures.

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
from pathlib import Path

from adapters.errors import AdapterError, ArgumentParser, cli
from adapters.io import write_json, write_text
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


def report(runs, out="figures", loss_clip=4.0, n_boot=2000, formats=("png", "pdf"), readme=None, margin=MARGIN):
    """Read every run under `runs`, write report.{md,tex,json} and the figures to `out` (and the results section
    of `readme`); return the dict."""
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
    figures = (plot_outcomes(table, out, formats) + plot_consistency(records, taus, out, formats)
               + plot_landscapes(records, out, formats) + plot_spectral(records, matrices, out, formats))
    md = markdown(table, taus, settings, found)
    result = dict(settings=settings, methods=table, consistency=taus, claims=found,
                  runs=[_run_row(r) for r in records], figures=[str(p) for p in figures], markdown=md)
    if readme is not None:
        result["readme_section"] = readme_section(result, readme)
    write_text(out / "report.md", md)
    write_text(out / "report.tex", latex(table, settings["reference"], study))
    write_json(out / "report.json", result)
    if readme is not None:
        write_readme(readme, result["readme_section"])
    return result


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs")
    p.add_argument("--out", default="figures", help="where the tables and figures go (default: figures)")
    p.add_argument("--loss-clip", type=float, default=4.0,
                   help="σ = b/2 for the clipped loss min(ℓ, b) in the MI bound (docs/THEORY.md section 1; default 4)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for τ and for the test examples "
                                                               "of a paired difference (default 2000)")
    p.add_argument("--margin", type=float, default=MARGIN, help=f"δ of the accuracy claims (non-inferiority, "
                                                                f"equivalence; default {MARGIN:g})")
    p.add_argument("--formats", default="png,pdf", help="figure formats (default png,pdf)")
    p.add_argument("--readme", default=None, help=f"rewrite this file's section between {README_BEGIN} and "
                                                  f"{README_END} with the results")
    args = p.parse_args(argv)
    if not Path(args.runs).is_dir():
        raise AdapterError(f"runs directory not found: {args.runs}")
    if args.bootstrap < 1:
        raise AdapterError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    if not 0 < args.margin < 1:
        raise AdapterError(f"--margin must be in (0, 1), a difference of accuracies, got {args.margin}")
    result = report(args.runs, args.out, args.loss_clip, args.bootstrap, tuple(args.formats.split(",")), args.readme,
                    args.margin)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
