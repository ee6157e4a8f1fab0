"""A suite of studies: every method over many tasks, ranked across them, with the statistics benchmark papers use.

    python -m analysis.suite suites/text.yaml                    # -> runs/text/<study>/, figures/text/
    python -m analysis.suite suites/paper.yaml --address auto    # the same on a Ray cluster
    python -m analysis.suite suites/text.yaml --report-only      # the suite's report again, from the studies' reports

A suite file is YAML. Its top-level keys are analysis.study's flags (dashes or underscores) and apply to every
study; `studies:` lists the studies, each a mapping with a `name` and its own flags (model, task or data, ...),
which override the top level:

    methods: [lora, asym, cla, rcla, c3la]
    seeds: [1, 2, 3]
    studies:
      - {name: movies, task: movie-reviews}
      - {name: mine, data: my.csv, model: roberta-base}

Every study is a full analysis.study (its lr chosen on validation at the selection seed, its final seeds tested,
early stopping, diagnostics, its own report and claims) in RUNS/<name>/, its report in OUT/<name>/. Every argument
and file problem of every study is found before Ray starts (one line naming the study and the key, exit 2). All the
studies' runs and diagnostics go into one executor queue (a local Ray instance, or `--address`) with no barrier
between studies, resumable as a study is; each study's report is written as soon as its last job is done.

The suite's own report (OUT/suite.{json,md,tex}, OUT/cd_diagram.png) puts the studies side by side, a task a row:
- Table 2: each method's mean test metric ± sd over seeds per task, the row's best in bold and each cell's drop from
  it; Table 3: the empirical gap Ĝ the same way.
- each method's rank in each task (1 = best, ties sharing the mean rank), its average rank over the tasks, and
  Friedman's test that all methods rank alike (bounds.stats.friedman), over the tasks every method completed;
- pairwise post-hoc comparisons (bounds.stats.POSTHOC: Wilcoxon signed-rank over the tasks, Holm) and the
  critical-difference diagram they give, with the smallest p that many tasks can reach;
- the paper's claims across tasks: per task the study's own verdict, and over the tasks one estimate per claim, the
  mean over tasks of the per-task paired difference with its t interval (the tasks are the sample: the spread of
  the per-task differences holds both how methods differ between tasks and each task's own error), decided as one
  study decides (non-inferiority, equivalence and worse-by-more-than-δ for accuracy; the claimed direction
  otherwise), Holm within each family.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from adapters import command
from adapters.errors import AdapterError, cli
from adapters.io import write_json
from adapters.methods import paper_order
from adapters.settings import setting
from analysis import suite_tables
from analysis.claims import FAMILIES, decide
from analysis.layout import STUDY_FILE, data_label
from analysis.readme import readme_parts, write_readme
from bounds import stats

# Keys that are the suite's, not a study's: one queue (executor, where, resources) and one margin for the claims
# across tasks. They may be given at the top level only.
SUITE_KEYS = ("executor", "address", "cpus_per_run", "gpus_per_run", "margin")
# Where things go is the suite's command line: a study's runs are RUNS/<name>, its report OUT/<name>; so are the
# formats of the reports and the device every study runs on.
NOT_IN_FILE = ("runs", "out", "readme", "no_report", "config", "formats", "device")
# The reports' file formats unless --formats says otherwise: tables (md, tex) and figures (png, pdf).
FORMATS = ("md", "tex", "png", "pdf")
# A study's report goes ahead of every queued run (analysis.study's priorities are 0-3): it is a minute's work, and
# it is what a user waits for while the other studies still train.
REPORT = -1


# ---- the suite file -----------------------------------------------------------------------------------------------

def read_suite(path):
    """The suite file as (suite settings {key: value}, [(study name, {dest: value}), ...]): every key checked as
    analysis.study checks its flags (its parser: the type and choices of each), the top level applied to every study
    and each study's own keys over it. An unknown key, a study without a name or without a task or data, a
    duplicate name: AdapterError naming the study and the key."""
    import yaml
    from adapters.config import config_values
    from analysis.study import parser as study_parser
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"suite file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AdapterError(f"cannot read suite file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("studies"), list) or not data["studies"]:
        raise AdapterError(f"{path}: a suite file is a mapping with a non-empty list `studies:` of studies")
    parser = study_parser()
    top = {k: v for k, v in data.items() if k != "studies"}
    _refuse(path, "the top level", top, NOT_IN_FILE)
    shared = config_values(parser, top, f"{path}")
    suite = {k: shared.pop(k) for k in SUITE_KEYS if k in shared}
    defaults = {a.dest: a.default for a in parser._actions if a.dest not in ("help",)}
    studies, names = [], set()
    for i, entry in enumerate(data["studies"], 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise AdapterError(f"{path}: study {i}: needs a `name` (a string)")
        name = entry["name"]
        where = f"{path}: study {name}"
        if name in names:
            raise AdapterError(f"{where}: the name is given twice; each study needs its own")
        if "/" in name or name.startswith("."):
            raise AdapterError(f"{where}: a name is a directory name (no '/', not starting with '.')")
        names.add(name)
        own = {k: v for k, v in entry.items() if k != "name"}
        _refuse(path, f"study {name}", own, NOT_IN_FILE + SUITE_KEYS)
        values = {**shared, **config_values(parser, own, where)}
        if values.get("task") is None and values.get("data_file") is None:
            raise AdapterError(f"{where}: no task: give `task` (a built-in task) or `data` (a file), here or at the "
                               "top level")
        args = {k: v for k, v in {**defaults, **values}.items() if k not in NOT_IN_FILE + SUITE_KEYS}
        studies.append((name, args))
    margin = suite.get("margin", defaults["margin"])
    if not 0 < margin < 1:
        raise AdapterError(f"{path}: key 'margin': must be in (0, 1), a difference of accuracies, got {margin}")
    return dict({k: defaults[k] for k in SUITE_KEYS}, **suite), studies


def _refuse(path, where, keys, refused):
    for key in keys:
        if str(key).replace("-", "_") in refused:
            raise AdapterError(f"{path}: {where}: key {key!r} is not a suite file's (the suite's command line sets "
                               "where runs and reports go, their formats and the device; executor, address, "
                               "resources and margin are the top level's)")


def prepare(path, runs, out, device=None):
    """(suite settings, [(name, Study)]): every study prepared (its arguments, model and data checked), before any
    job runs, each to run on `device` (analysis.study's --device). An error names its study."""
    from analysis.study import Study
    suite, entries = read_suite(path)
    studies = []
    for name, args in entries:
        try:
            studies.append((name, Study(runs=Path(runs) / name, device=device, **args)))
        except AdapterError as e:
            raise AdapterError(f"{path}: study {name}: {e}") from None
    return suite, studies


# ---- running it ---------------------------------------------------------------------------------------------------

def _report_job(runs, out, margin, formats=FORMATS):
    """A study's report (analysis.report) once its last run and diagnostic are done."""
    from analysis import report
    report.report(runs, out, margin=margin, formats=formats)
    return str(out)


def run(path, runs=None, out=None, executor=None, address=None, cpus_per_run=None, gpus_per_run=None, progress=True,
        report=True, readme=None, formats=FORMATS, device=None):
    """Run every study of the suite file at `path` in one queue, write each study's report as it finishes and then
    the suite's report (write_report), in `formats` (tables md, tex; figures png, pdf, svg). Every study's runs,
    diagnostics and reference run on `device` (default: cuda if available, else cpu). Returns the suite's report (a
    dict), or None with report=False."""
    from analysis.executor import make_executor
    from analysis.study import stream
    path = Path(path)
    runs, out = locations(path, runs, out)
    if readme is not None:
        readme_parts(readme, "suite")  # a bad --readme stops the suite before hours of training
    suite, studies = prepare(path, runs, out, device=device)
    given = dict(executor=executor, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
    suite.update({k: v for k, v in given.items() if v is not None})  # the command line over the file
    pool = make_executor(suite["executor"], address=suite["address"], cpus_per_run=suite["cpus_per_run"],
                         gpus_per_run=suite["gpus_per_run"])
    by_runs = {study.runs: (name, study) for name, study in studies}

    def finished(study):  # a study's last job is done: its selection now, its report as a job of the queue
        name, _ = by_runs[study.runs]
        study.finish(pool.settings())
        return [(REPORT, _report_job, (study.runs, str((out / name).resolve()), suite["margin"], formats))] \
            if report else []

    began = time.time()
    try:
        stream(pool, [s for _, s in studies], progress=progress, desc="suite: runs, diagnostics, reports",
               finished=finished)
        executor_settings = pool.settings()
    finally:
        pool.close()
    if not report:
        return None
    settings = dict(suite=str(path), runs=str(runs), out=str(out), margin=suite["margin"],
                    executor=executor_settings, this_invocation_seconds=time.time() - began)
    return write_report([name for name, _ in studies], runs, out, settings, readme=readme, formats=formats)


def locations(path, runs=None, out=None):
    """(the runs directory, the report directory) of the suite file at `path`: as given, else runs/<its name> and
    figures/<its name>."""
    stem = Path(path).stem
    return Path(runs or Path("runs") / stem), Path(out or Path("figures") / stem)


def report_again(path, runs=None, out=None, readme=None, formats=FORMATS):
    """The suite's report made again from its studies' reports (each study's report.json in OUT/<name>/), keeping
    what the run recorded of its queue."""
    import json
    suite, entries = read_suite(path)
    runs, out = locations(path, runs, out)
    names = [name for name, _ in entries]
    missing = [name for name in names if not (out / name / "report.json").exists()]
    if missing:
        raise AdapterError(f"no report for study {', '.join(missing)} in {out}: run the suite first")
    before = out / "suite.json"
    kept = {k: v for k, v in (json.loads(before.read_text())["settings"] if before.exists() else {}).items()
            if k in ("executor", "this_invocation_seconds")}
    return write_report(names, runs, out, dict(kept, suite=str(path), runs=str(runs), out=str(out),
                                               margin=suite["margin"]), readme=readme, formats=formats)


# ---- the suite's report -------------------------------------------------------------------------------------------

def _load(name, runs, out):
    import json
    report = json.loads((Path(out) / "report.json").read_text())
    study = report["settings"].get("study") or {}
    return dict(name=name, report=report, study=study, runs=str(runs), out=str(out),
                model=study.get("model"), data=report["settings"].get("data"), label=data_label(study))


def suite_table(loaded):
    """{tasks, methods, metrics, table, sd, n, gap, gap_sd}: each method's mean (and sd, n) over its seeds of the
    task's metric and of Ĝ, per task (a study), from the studies' reports."""
    tasks = [s["name"] for s in loaded]
    methods = paper_order({m for s in loaded for m in s["report"]["methods"]})
    out = dict(tasks=tasks, methods=methods, metrics={}, table={}, sd={}, n={}, gap={}, gap_sd={})
    for s in loaded:
        rows = s["report"]["methods"]
        first = next(iter(rows.values()))
        out["metrics"][s["name"]] = dict(metric=first["metric"], higher_is_better=first.get("higher_is_better", True))
        for m in methods:
            cell, gap = (rows.get(m) or {}).get("test_metric"), (rows.get(m) or {}).get("gap")
            for key, source, field in (("table", cell, "mean"), ("sd", cell, "std"), ("n", cell, "n"),
                                       ("gap", gap, "mean"), ("gap_sd", gap, "std")):
                out[key].setdefault(m, {})[s["name"]] = None if source is None else source.get(field)
    return out


def rankings(t):
    """Ranks per task, average ranks, Friedman's test and the post-hoc, over the tasks every method completed."""
    complete = [task for task in t["tasks"] if all(t["table"][m][task] is not None for m in t["methods"])]
    # Each task's scores oriented so that higher is better: a perplexity (lower is better) is negated.
    sign = {task: 1.0 if t["metrics"][task]["higher_is_better"] else -1.0 for task in complete}
    scores = np.array([[sign[task] * t["table"][m][task] for m in t["methods"]] for task in complete])
    if not complete:
        return dict(complete_tasks=[], ranks={}, average_rank={}, friedman=None, posthoc=None)
    r = stats.ranks(scores)
    ranks = {task: dict(zip(t["methods"], map(float, row))) for task, row in zip(complete, r)}
    average = {m: float(r[:, j].mean()) for j, m in enumerate(t["methods"])}
    return dict(complete_tasks=complete, ranks=ranks, average_rank=average, friedman=stats.friedman(scores),
                posthoc=stats.posthoc(scores, t["methods"]))


CLAIM_KEY = ("family", "first", "second", "quantity")


def claims_across(loaded, margin):
    """Each claim the studies decide, per task (the study's verdict and difference) and over the tasks: the mean of
    the per-task differences with its t interval over tasks (bounds.stats.paired_difference with the tasks as the
    pairs), tested as one study tests it, Holm within each family (analysis.claims.decide)."""
    found = {}
    for s in loaded:
        for c in s["report"]["claims"]:
            key = tuple(c[k] for k in CLAIM_KEY)
            found.setdefault(key, dict(claim=c["claim"], positive=c.get("positive"), per_task={}))
            found[key]["per_task"][s["name"]] = dict(diff=c["diff"], ci=c.get("ci"), verdict=c["verdict"],
                                                     informative=c.get("informative", True))
    rows = []
    for key, c in found.items():
        family = key[0]
        # A τ from too few distinct values orders nothing (its study says "not informative"): not averaged in.
        diffs = [v["diff"] for v in c["per_task"].values() if v["diff"] is not None and v["informative"]]
        p = stats.paired_difference(diffs, np.zeros(len(diffs))) if diffs else dict(diff=None, se=None, df=None)
        counts = {}
        for v in c["per_task"].values():
            counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
        row = dict(dict(zip(CLAIM_KEY, key)), claim=c["claim"], per_task=c["per_task"], verdict_counts=counts,
                   tasks=len(diffs), diff=p["diff"], se=p["se"], df=p["df"])
        if family == "accuracy":
            tests = stats.margin_tests(p, margin)
            row.update(tests, p=tests["p_noninferior"])
        else:
            two = p["se"] is not None and p["se"] > 0
            row.update(positive=c["positive"], level=stats.LEVEL, p=stats.two_sided(p) if two else None,
                       ci=stats.interval(p, stats.LEVEL) if two else None)
        rows.append(row)
    return decide(rows)


def write_report(names, runs, out, settings, readme=None, formats=FORMATS):
    """The suite's report from its studies' reports (study `name`: runs in RUNS/name, report in OUT/name):
    OUT/suite.json, the tables OUT/suite.md and OUT/suite.tex (the table formats of `formats`) and the
    critical-difference diagram (its figure formats). Returns the dict written to suite.json."""
    from analysis.figures import plot_cd_diagram
    from analysis.records import study_elapsed
    loaded = [_load(name, Path(runs) / name, Path(out) / name) for name in names]
    t = suite_table(loaded)
    ranked = rankings(t)
    found = claims_across(loaded, settings["margin"])
    starts = [(Path(s["runs"]) / STUDY_FILE).stat().st_mtime for s in loaded]
    ends = [start + (study_elapsed(s["runs"]) or 0.0) for start, s in zip(starts, loaded)]
    settings = dict(settings, elapsed_seconds=max(ends) - min(starts), alpha=stats.ALPHA,
                    posthoc=stats.POSTHOC, families=FAMILIES,
                    studies=[dict(name=s["name"], model=s["model"], data=s["data"], label=s["label"],
                                  runs=s["runs"], report=s["out"], machines=s["report"]["settings"].get("machines"),
                                  elapsed_seconds=s["report"]["settings"].get("elapsed_seconds"))
                             for s in loaded])
    figures = []
    post = ranked["posthoc"]
    drawn = command.figure_formats(formats)
    if post is not None and ranked["average_rank"] and drawn:
        figures = plot_cd_diagram(ranked["average_rank"], post["p"], stats.ALPHA, Path(out), drawn,
                                  title=f"average rank over {len(ranked['complete_tasks'])} tasks; a bar joins "
                                        f"methods the post-hoc ({post['method']}) cannot tell apart at α = "
                                        f"{stats.ALPHA:g}")
    result = dict(settings=settings, tasks=t["tasks"], methods=t["methods"], metrics=t["metrics"], table=t["table"],
                  sd=t["sd"], n=t["n"], gap=t["gap"], gap_sd=t["gap_sd"], **ranked, claims=found,
                  figures=[str(p) for p in figures])
    result["markdown"] = suite_tables.markdown(result)
    if readme is not None:
        result["readme_section"] = suite_tables.readme_section(result, readme)
    command.write_tables(out, "suite", formats, {"md": result["markdown"], "tex": suite_tables.latex(result)})
    write_json(Path(out) / "suite.json", result)
    if readme is not None:
        write_readme(readme, result["readme_section"], "suite")
    return result


@dataclass(frozen=True)
class SuiteConfig:
    """The settings of `python -m analysis.suite` (the suite file is its positional argument); a study's own
    settings are the suite file's."""
    runs: Optional[str] = setting(None, "one study directory per name goes here (default: runs/<suite file's name>)",
                                  results=False, metavar="DIR")
    out: Optional[str] = command.out(None, "the suite's report (suite.json, suite.md / suite.tex, cd_diagram.*) and "
                                     "each study's (OUT/<name>/) (default: figures/<suite file's name>)")
    executor: Optional[str] = setting(None, "ray (default: a local instance, or --address) or serial (in this "
                                      "process, for debugging)", choices=("ray", "serial"), results=False)
    address: Optional[str] = setting(None, "join this Ray cluster ('auto', HOST:PORT or ray://HOST:PORT)",
                                     results=False)
    cpus_per_run: Optional[float] = setting(None, "CPUs Ray reserves for each run and diagnostic (default: the "
                                            "file's, else 1)", results=False)
    gpus_per_run: Optional[float] = setting(None, "GPUs Ray reserves for each run and diagnostic (default: the "
                                            "file's, else 0)", results=False)
    report: bool = setting(True, "only train and diagnose", flag="--no-report", results=False)
    report_only: bool = setting(False, "only the suite's report, from the studies' reports in OUT", results=False)
    readme: Optional[str] = setting(None, "also rewrite this README's suite section (between <!-- suite:begin --> "
                                    "and <!-- suite:end -->)", results=False, metavar="FILE")
    formats: tuple = command.formats(FORMATS)
    device: Optional[str] = setting(None, "where every study's runs train (adapters.train --device: cpu or cuda) and "
                                    "its diagnostics and reference run (default: cuda if available, else cpu)",
                                    results=False)


def parser():
    p = command.parser("python -m analysis.suite", __doc__, SuiteConfig)
    p.add_argument("suite", help="the suite file (YAML): analysis.study's flags at the top level, `studies:` a list "
                                 "of {name, flags}; built-in suites in suites/")
    return p


def written(result, path, runs, out, formats, readme=None):
    """The summary line: where the suite's report (and its studies') went, or where the runs are."""
    if result is None:
        return f"wrote the runs of every study of {path} in {locations(path, runs, out)[0]}"
    out = locations(path, runs, out)[1]
    files = [out / "suite.json"] + command.table_paths(out, "suite", formats) + [Path(f) for f in result["figures"]]
    return f"wrote {', '.join(map(str, files))} (each study's report in {out}/<name>/)" + (
        f"; the suite section of {readme}" if readme is not None else "")


@cli
def main(argv=None):
    config, args = command.parse(parser(), SuiteConfig, argv)
    if config.report_only:
        result = report_again(args["suite"], config.runs, config.out, config.readme, formats=config.formats)
    else:
        result = run(args["suite"], config.runs, config.out, config.executor, config.address, config.cpus_per_run,
                     config.gpus_per_run, report=config.report, readme=config.readme, formats=config.formats,
                     device=config.device)
    if result is not None:
        print(result["markdown"])
    print(written(result, args["suite"], config.runs, config.out, config.formats, config.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
