"""A suite of studies: one queue, per-study reports as each finishes, ranks and Friedman's test across tasks, the
claims across tasks, bad suite files refused before Ray, resume; and every report naming its model and data."""
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

import adapters.train
from adapters import models
from adapters.errors import AdapterError
from analysis import executor, study, suite
from bounds import stats

SUITES = Path(__file__).resolve().parent.parent / "suites"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(models.tiny_model_dir(tmp_path_factory.mktemp("model") / "bert", "bert"))


def _data(path, good, bad, n=120, seed=0):
    """A small sentiment file whose label a word gives away, with filler words drawn at random."""
    rng = np.random.default_rng(seed)
    filler = ["the", "movie", "was", "a", "plot", "and", "it", "really", "very", "quite"]
    rows = ["text,label"]
    for i in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(filler, 4)) + [good if label else bad]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _suite_file(root, model, studies, **top):
    top = dict(dict(budget="tiny", model=model, seeds=[1, 2, 3], diagnostics=["spectral"]), **top)
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(dict(top, studies=studies), sort_keys=False))
    return path


def _recording(monkeypatch, events):
    """adapters.train.train and the studies' reports, recording (what, study name) in the order they run."""
    real_train = adapters.train.train
    real_report = suite._report_job

    @functools.wraps(real_train)  # the same signature: the study checks runs' arguments against train()'s
    def train(**kw):
        events.append(("train", Path(kw["out"]).parent.name, kw["method"], kw["seed"]))
        return real_train(**kw)

    def report(runs, out, margin, formats):
        events.append(("report", Path(runs).name))
        return real_report(runs, out, margin, formats)

    def diagnose(run, which, budget, progress=False, device=None, real=study.diagnose):
        events.append(("diagnose", Path(run).parent.name, which))
        return real(run, which, budget, progress, device)
    monkeypatch.setattr(study, "diagnose", diagnose)
    monkeypatch.setattr(adapters.train, "train", train)
    monkeypatch.setattr(suite, "_report_job", report)


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory, tiny_model):
    """Three tasks of the tiny model (a built-in task, two small files), three methods, three seeds; task c, first in
    the file, has one method fewer, so it finishes first."""
    root = tmp_path_factory.mktemp("suite")
    a, b = _data(root / "a.csv", "good", "bad"), _data(root / "b.csv", "great", "awful", seed=1)
    path = _suite_file(root, tiny_model, [dict(name="c", task="tweets", methods=["lora", "cla"]),
                                          dict(name="a", data=a), dict(name="b", data=b, rank=8)],
                       methods=["lora", "asym", "cla"], **{"lr-grid": [0.05], "max-steps": 6})
    events = []
    with pytest.MonkeyPatch.context() as mp:
        _recording(mp, events)
        result = suite.run(path, runs=root / "runs", out=root / "out", executor="serial", progress=False)
    return root, result, events


def test_suite_report_is_its_studies_own_numbers(tiny_suite):
    root, result, _ = tiny_suite
    saved = json.loads((root / "out" / "suite.json").read_text())
    assert saved["tasks"] == ["c", "a", "b"] and saved["methods"] == ["lora", "asym", "cla"]
    for task in saved["tasks"]:
        report = json.loads((root / "out" / task / "report.json").read_text())
        assert saved["metrics"][task] == dict(metric="accuracy", higher_is_better=True)
        for m in saved["methods"]:
            cell = report["methods"].get(m)
            assert saved["table"][m][task] == (cell["test_metric"]["mean"] if cell else None)
            assert saved["gap"][m][task] == (cell["gap"]["mean"] if cell else None)
    # asym is not in task c: ranks and Friedman are over the tasks every method completed
    assert saved["complete_tasks"] == ["a", "b"] and saved["friedman"]["tasks"] == 2
    assert (root / "out" / "cd_diagram.png").stat().st_size > 1000
    assert str(root / "out" / "cd_diagram.png") in saved["figures"]


def test_friedman_and_ranks_against_scipy_on_the_suites_table(tiny_suite):
    _, result, _ = tiny_suite
    tasks, methods = result["complete_tasks"], result["methods"]
    scores = np.array([[result["table"][m][t] for m in methods] for t in tasks])
    assert len(np.unique(scores)) > 1  # a table on which the statistic means something
    want = sps.friedmanchisquare(*scores.T)
    assert result["friedman"]["statistic"] == pytest.approx(want.statistic, rel=1e-12)
    assert result["friedman"]["p"] == pytest.approx(want.pvalue, rel=1e-12)
    for t, row in zip(tasks, scores):
        assert [result["ranks"][t][m] for m in methods] == list(sps.rankdata(-row))
    assert result["average_rank"] == pytest.approx({m: np.mean([result["ranks"][t][m] for t in tasks])
                                                    for m in methods})


def _table(values, higher=None):
    """A suite table from {task: {method: mean}} (None: no result)."""
    tasks = list(values)
    methods = list(next(iter(values.values())))
    higher = higher or {}
    return dict(tasks=tasks, methods=methods, table={m: {t: values[t][m] for t in tasks} for m in methods},
                metrics={t: dict(metric="accuracy" if higher.get(t, True) else "perplexity",
                                 higher_is_better=higher.get(t, True)) for t in tasks})


def test_average_ranks_with_ties_by_hand():
    t = _table({"t1": {"a": 0.9, "b": 0.8, "c": 0.8, "d": 0.7},
                "t2": {"a": 12.0, "b": 10.0, "c": 15.0, "d": 10.0},  # a perplexity: lower is better
                "t3": {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.6},
                "t4": {"a": 0.9, "b": None, "c": 0.1, "d": 0.2}},  # b has no result: left out of the ranks
               higher={"t2": False})
    got = suite.rankings(t)
    # by hand: t1 a 1, b and c share 2 and 3 -> 2.5, d 4; t2 b and d share 1, 2 -> 1.5, a 3, c 4;
    # t3 d 1, a b c share 2, 3, 4 -> 3
    assert got["complete_tasks"] == ["t1", "t2", "t3"]
    assert got["ranks"] == {"t1": dict(a=1, b=2.5, c=2.5, d=4), "t2": dict(a=3, b=1.5, c=4, d=1.5),
                            "t3": dict(a=3, b=3, c=3, d=1)}
    assert got["average_rank"] == pytest.approx(dict(a=7 / 3, b=7 / 3, c=9.5 / 3, d=6.5 / 3))


def test_friedman_of_a_table_where_every_method_ties_is_no_evidence():
    assert stats.friedman(np.ones((3, 4))) == dict(statistic=0.0, p=1.0, tasks=3, methods=4)
    assert stats.friedman(np.ones((3, 2))) is None  # fewer than 3 methods


def test_posthoc_is_wilcoxon_per_pair_with_holm():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(12, 4)) + np.array([0.0, 0.3, 1.0, 1.1])
    methods = ["a", "b", "c", "d"]
    got = stats.posthoc(scores, methods)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    raw = [sps.wilcoxon(scores[:, i], scores[:, j], zero_method="zsplit").pvalue for i, j in pairs]
    for (i, j), q in zip(pairs, stats.holm(raw)):
        assert got["p"][methods[i]][methods[j]] == pytest.approx(q) == got["p"][methods[j]][methods[i]]
    assert got["min_p"] == 2 / 2 ** 12


def test_claims_across_tasks_are_the_mean_of_the_per_task_differences(tiny_suite):
    root, result, _ = tiny_suite
    rows = {(c["family"], c["first"], c["second"], c["quantity"]): c for c in result["claims"]}
    for task in result["tasks"]:
        for c in json.loads((root / "out" / task / "report.json").read_text())["claims"]:
            row = rows[(c["family"], c["first"], c["second"], c["quantity"])]
            assert row["per_task"][task] == dict(diff=c["diff"], ci=c.get("ci"), verdict=c["verdict"],
                                                 informative=c.get("informative", True))
    cla = rows[("accuracy", "cla", "lora", "test_metric")]
    d = [v["diff"] for v in cla["per_task"].values()]
    assert cla["diff"] == pytest.approx(np.mean(d)) and cla["tasks"] == 3
    # the interval over tasks is the paired t of the per-task differences, one-sided at α each end (90 %)
    half = sps.t.ppf(0.95, 2) * np.std(d, ddof=1) / np.sqrt(3)
    assert cla["ci"] == pytest.approx([np.mean(d) - half, np.mean(d) + half])
    assert sum(cla["verdict_counts"].values()) == 3
    family = [c for c in result["claims"] if c["family"] == "accuracy"]
    assert all(c["family_size"] == len(family) for c in family)


def test_one_queue_and_each_studys_report_as_it_finishes(tiny_suite):
    _, _, events = tiny_suite
    at = {name: [i for i, e in enumerate(events) if e[0] in ("train", "diagnose") and e[1] == name] for name in "abc"}
    # one queue, no barrier between studies: study b trains before study a's last run (a barrier: after it)
    assert min(at["a"]) < max(at["c"]) and min(at["b"]) < max(at["a"])
    # each study's report comes once, after its own last run; task c (two methods) finishes first and its report is
    # written while the others still run
    reports = {e[1]: i for i, e in enumerate(events) if e[0] == "report"}
    assert sorted(reports) == ["a", "b", "c"] and sum(e[0] == "report" for e in events) == 3
    assert all(reports[name] > max(at[name]) for name in "abc")
    assert reports["c"] < max(at["a"] + at["b"])


def test_every_report_names_its_model_and_data(tiny_suite):
    root, result, _ = tiny_suite
    sha = json.loads((root / "runs" / "a" / "study.json").read_text())["data_sha256"]
    study_json = json.loads((root / "runs" / "a" / "study.json").read_text())
    assert study_json["task"] == "a" and study_json["data"] == "a.csv"
    assert sha == __import__("hashlib").sha256((root / "a.csv").read_bytes()).hexdigest()
    label = f"data a.csv (sha256 {sha[:12]}…)"
    report = json.loads((root / "out" / "a" / "report.json").read_text())
    assert report["settings"]["data"] == dict(task="a", file="a.csv", sha256=sha, label=label)
    assert report["settings"]["model"] == result["settings"]["studies"][1]["model"]
    first = (root / "out" / "a" / "report.md").read_text().splitlines()[0]
    assert label in first and "movie-reviews" not in first
    assert label.replace("_", r"\_") in (root / "out" / "a" / "report.tex").read_text().split(r"\caption{")[1]
    assert "task tweets (built in)" in (root / "out" / "c" / "report.md").read_text().splitlines()[0]
    md, tex = result["markdown"], (root / "out" / "suite.tex").read_text()
    for st in result["settings"]["studies"]:
        assert f"| {st['name']} | {st['model']} | {st['label']} |" in md
        assert f"{st['name']}: model" in tex


def test_interrupted_suite_resumes_without_redoing_a_finished_run(tmp_path, tiny_model, monkeypatch):
    a = _data(tmp_path / "a.csv", "good", "bad")
    path = _suite_file(tmp_path, tiny_model, [dict(name="a", data=a), dict(name="b", task="tweets")],
                       methods=["lora", "cla"], seeds=[1], diagnostics=[], **{"lr-grid": [0.05]})
    real_train = adapters.train.train

    @functools.wraps(real_train)
    def crashing(**kw):
        if Path(kw["out"]).parent.name == "b" and kw["method"] == "cla":
            raise KeyboardInterrupt  # the machine went away in the middle of the suite
        return real_train(**kw)
    monkeypatch.setattr(adapters.train, "train", crashing)
    kwargs = dict(runs=tmp_path / "runs", out=tmp_path / "out", executor="serial", progress=False)
    with pytest.raises(KeyboardInterrupt):
        suite.run(path, **kwargs)
    finished = sorted((tmp_path / "runs").glob("*/*/training_stats.json"))
    assert finished and not (tmp_path / "out" / "suite.json").exists()
    before = {p: p.stat().st_mtime_ns for p in finished}
    events = []
    monkeypatch.setattr(adapters.train, "train", real_train)
    _recording(monkeypatch, events)
    suite.run(path, **kwargs)
    redone = {e[1:] for e in events if e[0] == "train"}
    done_before = {(p.parent.parent.name, p.parent.name.split("-")[0], int(p.parent.name.rsplit("-s", 1)[1]))
                   for p in finished}
    assert redone and not redone & done_before  # nothing that finished is trained again
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert json.loads((tmp_path / "out" / "suite.json").read_text())["tasks"] == ["a", "b"]


BAD = {
    "an unknown key at the top": ({"learning-rate": 0.1}, [{"name": "x", "task": "tweets"}],
                                  "unknown key 'learning-rate'"),
    "an unknown key in a study": ({}, [{"name": "x", "task": "tweets", "colour": "red"}],
                                  "study x: unknown key 'colour'"),
    "a study without a task": ({}, [{"name": "x", "task": "tweets"}, {"name": "y", "model": "minilm"}],
                               "study y: no task"),
    "a duplicate name": ({}, [{"name": "x", "task": "tweets"}, {"name": "x", "task": "editorials"}],
                         "study x: the name is given twice"),
    "a study without a name": ({}, [{"task": "tweets"}], "study 1: needs a `name`"),
    "a wrong value": ({}, [{"name": "x", "task": "tweets", "rank": "big"}], "study x: key 'rank'"),
    "a missing data file": ({}, [{"name": "x", "data": "nowhere.csv"}], "study x: .*nowhere.csv"),
    "an unknown task": ({}, [{"name": "x", "task": "poems"}], "study x: unknown task 'poems'"),
    "where runs go, in the file": ({}, [{"name": "x", "task": "tweets", "runs": "elsewhere"}], "study x: key 'runs'"),
    "a suite-wide key in a study": ({}, [{"name": "x", "task": "tweets", "executor": "serial"}],
                                    "study x: key 'executor'"),
    "the device, in the file": ({"device": "cpu"}, [{"name": "x", "task": "tweets"}],
                                "the top level: key 'device'"),
    "formats, in a study": ({}, [{"name": "x", "task": "tweets", "formats": "md"}], "study x: key 'formats'"),
    "no studies": ({"task": "tweets"}, [], "non-empty list `studies:`"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_suite_file_is_refused_before_ray_starts(case, tmp_path, tiny_model, monkeypatch, capsys):
    top, studies, message = BAD[case]
    path = _suite_file(tmp_path, tiny_model, studies, **top)
    monkeypatch.setattr(executor, "make_executor", lambda *a, **k: pytest.fail("Ray started for a bad suite file"))
    assert suite.main([str(path), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0]
    err = errors[0]
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted(SUITES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_builtin_suite_is_valid(path, tmp_path):
    """Each built-in suite file reads as a suite (every key a study flag of the right type, every study named, with
    a task or data); the offline ones name offline models and built-in tasks, and text.yaml prepares fully (its
    data and model checked) without running."""
    settings, studies = suite.read_suite(path)
    assert studies and len({name for name, _ in studies}) == len(studies)
    for name, args in studies:
        assert args["model"] and (args["task"] or args["data_file"]), name
        study.expand_methods(args["methods"])
    if path.name in ("text.yaml", "families.yaml"):
        from adapters.data import BUILTIN
        assert all(args["model"] in models.OFFLINE_MODELS and args["task"] in BUILTIN for _, args in studies)
    if path.name == "text.yaml":
        _, prepared = suite.prepare(path, tmp_path / "runs", tmp_path / "out")
        assert [s.settings["task"] for _, s in prepared] == ["movie-reviews", "product-reviews", "editorials",
                                                             "tweets"]
    if path.name == "paper.yaml":
        assert all(args["data_file"] for _, args in studies) and len(studies) >= 10


def test_a_suite_needs_its_studies_reports_for_report_only(tmp_path, tiny_model, capsys):
    path = _suite_file(tmp_path, tiny_model, [dict(name="x", task="tweets")])
    assert suite.main([str(path), "--report-only", "--out", str(tmp_path / "out")]) == 2
    assert "no report for study x" in capsys.readouterr().err
    with pytest.raises(AdapterError, match="study x"):
        suite.prepare(_suite_file(tmp_path, tiny_model, [dict(name="x", task="tweets", seeds=[0])]), tmp_path, tmp_path)


def test_every_setting_is_a_flag_and_a_config_file_is_the_same_flags(tmp_path, tiny_model, monkeypatch):
    from adapters import command
    from tests.test_bounds_cli import check_flags_are_the_fields
    check_flags_are_the_fields(suite.parser(), suite.SuiteConfig)
    assert command.parse(suite.parser(), suite.SuiteConfig, ["s.yaml"]) == (suite.SuiteConfig(), {"suite": "s.yaml"})
    config = tmp_path / "suite-cli.yaml"
    config.write_text("runs: r\nout: o\nexecutor: serial\naddress: auto\ncpus-per-run: 2\ngpus_per_run: 0.5\n"
                      "no-report: true\nreport-only: true\nreadme: R.md\nformats: tex,pdf\ndevice: cpu\n")
    flags = ["s.yaml", "--runs", "r", "--out", "o", "--executor", "serial", "--address", "auto", "--cpus-per-run", "2",
             "--gpus-per-run", "0.5", "--no-report", "--report-only", "--readme", "R.md", "--formats", "tex,pdf",
             "--device", "cpu"]
    want = suite.SuiteConfig(runs="r", out="o", executor="serial", address="auto", cpus_per_run=2.0, gpus_per_run=0.5,
                             report=False, report_only=True, readme="R.md", formats=("tex", "pdf"), device="cpu")
    for argv in (flags, ["s.yaml", "--config", str(config)]):
        assert command.parse(suite.parser(), suite.SuiteConfig, argv) == (want, {"suite": "s.yaml"})
    # main hands them to run(): the formats to every report, the device to every study
    seen = {}
    monkeypatch.setattr(suite, "run", lambda *a, **kw: seen.update(args=a, **kw))
    assert suite.main(["s.yaml", "--device", "cpu", "--formats", "md", "--no-report"]) == 0
    assert seen == dict(args=("s.yaml", None, None, None, None, None, None), report=False, readme=None,
                        formats=("md",), device="cpu")
    path = _suite_file(tmp_path, tiny_model, [dict(name="x", task="tweets", methods=["lora"])])
    _, [(_, prepared)] = suite.prepare(path, tmp_path / "runs", tmp_path / "out", device="cpu")
    assert prepared.device == "cpu" and prepared.common["device"] == "cpu"


def test_formats_say_which_tables_and_figures_the_reports_are_written_in(tiny_suite, tmp_path, capsys):
    root, result, _ = tiny_suite
    import shutil
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    for name in ("suite.json", "suite.md", "suite.tex", "cd_diagram.png", "cd_diagram.pdf"):
        (out / name).unlink()
    path = root / "suite.yaml"
    assert suite.main([str(path), "--report-only", "--runs", str(root / "runs"), "--out", str(out),
                       "--formats", "md,svg"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["cd_diagram.svg", "suite.json", "suite.md"]
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == (f"wrote {out}/suite.json, {out}/suite.md, {out}/cd_diagram.svg (each study's "
                                        f"report in {out}/<name>/)")
    assert json.loads((out / "suite.json").read_text())["table"] == result["table"]  # the same numbers
    assert suite.main([str(path), "--report-only", "--out", str(tmp_path / "o2"), "--formats", "md,xls"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--formats" in err and not (tmp_path / "o2").exists()
