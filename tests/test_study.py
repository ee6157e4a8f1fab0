"""The study: resumable sweep, a report whose numbers are the runs' own, Kendall τ, the main job end to end."""
import functools
import json
import os
import shutil
import stat

import numpy as np
import pytest
from scipy.stats import kendalltau

import adapters
import adapters.checkpoint
import adapters.io
from adapters import models
from analysis import readme as readme_, records as records_, report, spectral, study, summary, tables
from bounds.stats import kendall_tau


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(models.tiny_model_dir(tmp_path_factory.mktemp("model") / "bert", "bert"))


def _record_training(monkeypatch, interrupt=()):
    """[(method, seed)] of every run adapters.train is asked to train from now on; a method in `interrupt` is
    interrupted as it starts (the machine went away in the middle of the sweep), the others trained."""
    import adapters.train
    real_train, trained = adapters.train.train, []

    @functools.wraps(real_train)  # the same signature: the study checks runs' arguments against train()'s
    def recorded(**kw):
        trained.append((kw["method"], kw["seed"]))
        if kw["method"] in interrupt:
            raise KeyboardInterrupt
        return real_train(**kw)
    monkeypatch.setattr(adapters.train, "train", recorded)
    return trained


def test_interrupted_sweep_resumes_without_redoing_runs(tmp_path, tiny_model, monkeypatch):
    runs = tmp_path / "runs"
    kwargs = dict(runs=runs, methods=["lora", "cla"], budget="tiny", model=tiny_model, diagnostics=(),
                  lr_grid=[1e-2], executor="serial", progress=False)
    _record_training(monkeypatch, interrupt=("cla",))
    with pytest.raises(KeyboardInterrupt):
        study.sweep(**kwargs)
    done = runs / "lora-lr0.01-s0" / "training_stats.json"
    assert done.exists() and not (runs / "cla-lr0.01-s0").exists()
    before = done.stat().st_mtime_ns

    monkeypatch.undo()  # the real training again
    trained = _record_training(monkeypatch)
    study.sweep(**kwargs)
    # lora's selection run is not redone; cla's is, then both final runs (seed 1: the tiny budget's)
    assert sorted(trained) == [("cla", 0), ("cla", 1), ("lora", 1)] and done.stat().st_mtime_ns == before
    assert (runs / "cla-lr0.01-s0" / "training_stats.json").exists()
    with pytest.raises(adapters.AdapterError, match="other settings"):
        study.sweep(**{**kwargs, "rank": 8})


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, tiny_model):
    """A tiny study of one method and one final seed, done: (its sweep's arguments, its final run)."""
    runs = tmp_path_factory.mktemp("finished") / "runs"
    kwargs = dict(runs=runs, methods=["lora"], budget="tiny", model=tiny_model, diagnostics=(), lr_grid=[1e-2],
                  executor="serial", progress=False)
    study.sweep(**kwargs)
    return kwargs, runs.resolve() / "lora-lr0.01-s1"


def test_a_finished_run_that_still_matches_its_record_is_not_trained_again(finished_study, monkeypatch, capsys):
    kwargs, run = finished_study
    stats = json.loads((run / "training_stats.json").read_text())
    assert stats["weights_sha256"] == adapters.checkpoint.weights_digest(run)  # the completion record's digest
    trained = _record_training(monkeypatch)
    study.sweep(**kwargs)
    assert trained == [] and "trained it again" not in capsys.readouterr().err


def test_a_finished_run_whose_weights_changed_is_said_and_trained_again(finished_study, monkeypatch, capsys):
    kwargs, run = finished_study
    weights = run / "adapter_model.safetensors"
    original, digest = weights.read_bytes(), json.loads((run / "training_stats.json").read_text())["weights_sha256"]
    weights.write_bytes(original[:100])  # truncated, as a full disk or a killed copy leaves it
    (run / "diagnostics" / "spectral").mkdir(parents=True)
    (run / "diagnostics" / "spectral" / "spectral.json").write_text("{}")  # of the old weights
    _record_training(monkeypatch, interrupt=("lora",))
    with pytest.raises(KeyboardInterrupt):  # the redo, interrupted: its stale diagnostics are gone already
        study.sweep(**kwargs)
    assert not (run / "diagnostics").exists() and weights.read_bytes() == original[:100]
    monkeypatch.undo()
    trained = _record_training(monkeypatch)
    capsys.readouterr()
    study.sweep(**kwargs)
    said = [line for line in capsys.readouterr().err.splitlines() if "trained it again" in line]
    assert trained == [("lora", 1)] and said == [
        f"{run}: its weights (adapter_config.json + adapter_model.safetensors) do not match the digest its run "
        "recorded (changed, truncated or removed); trained it again"]
    # the same seed on CPU: the same weights, bit for bit
    assert weights.read_bytes() == original and adapters.checkpoint.weights_digest(run) == digest
    # what a study writes, others may read (the umask's permissions, not tempfile's or safetensors' 0600)
    mask = adapters.io.umask()
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in run.rglob("*") if p.is_file()} == {oct(0o666 & ~mask)}
    assert oct(stat.S_IMODE(run.stat().st_mode)) == oct(0o777 & ~mask)


def test_a_run_from_before_the_digest_is_trusted_and_an_unreadable_record_is_not(finished_study, tmp_path):
    run = shutil.copytree(finished_study[1], tmp_path / "run")
    stats = json.loads((run / "training_stats.json").read_text())
    assert adapters.checkpoint.weights_changed(run) is None
    (run / "adapter_model.safetensors").write_bytes(b"")
    assert "do not match the digest" in adapters.checkpoint.weights_changed(run)
    (run / "training_stats.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "weights_sha256"}))
    assert adapters.checkpoint.weights_changed(run) is None  # no digest recorded: trusted, as before it was
    (run / "training_stats.json").write_text("[1, 2]")
    assert adapters.checkpoint.weights_changed(run) == "its training_stats.json holds no JSON object"
    (run / "training_stats.json").write_text('{"weights_sha256": ')  # cut short
    assert adapters.checkpoint.weights_changed(run).startswith(f"corrupt training statistics {run}")


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("study")
    study.sweep(runs=root / "runs", methods=["lora", "cla", "c3la"], seeds=[1, 2], budget="tiny", model=tiny_model,
                lr_grid=[1e-2], executor="serial", progress=False)
    return root, report.report(root / "runs", root / "figures", n_boot=200, formats=("md", "tex", "png"))


def test_report_numbers_are_the_runs_own(tiny_study):
    root, result = tiny_study
    assert len(result["runs"]) == 6
    for row in result["runs"]:
        run = root / "runs" / f"{row['method']}-lr0.01-s{row['seed']}"
        assert row["path"] == str(run) and row["lr"] == 1e-2
        stats = json.loads((run / "training_stats.json").read_text())
        assert row["test_metric"] == stats["test_metric"] and row["gap"] == stats["generalization_gap"]
        spectral = json.loads((run / "diagnostics/spectral/spectral.json").read_text())
        assert row["intruders"] == spectral["checkpoints"][0]["mean_intruders"]
        hessian = json.loads((run / "diagnostics/hessian/hessian.json").read_text())
        assert row["hessian"] == hessian["eigenvalues"][0]
        landscape = json.loads((run / "diagnostics/landscape/landscape.json").read_text())
        assert row["sharpness"] == landscape["sharpness"]["loss_rise"][-1]["mean_rise"]
        from bounds.report import checkpoint_row
        assert row["mi_bound"] == checkpoint_row(run, loss_clip=4.0)["mi_bound"]
    cla = result["methods"]["cla"]["test_metric"]
    assert cla["mean"] == pytest.approx(np.mean(cla["values"])) and len(cla["values"]) == 2
    for name in ("report.md", "report.tex", "report.json", "outcomes.png", "consistency.png", "landscape_1d.png"):
        assert (root / "figures" / name).exists(), name
    tex = (root / "figures" / "report.tex").read_text()
    assert r"\toprule" in tex and "sparse variants" in tex


def test_consistency_tau_is_kendall_tau_of_the_method_means(tiny_study):
    _, result = tiny_study
    means = {m: row for m, row in result["methods"].items()}
    for t in result["consistency"]:
        methods = t["methods"]
        x = [means[m][t["diagnostic"]]["mean"] for m in methods]
        y = [means[m]["gap"]["mean"] for m in methods]
        expected = kendalltau(x, y).statistic
        if np.isnan(expected):
            assert t["tau"] is None
        else:
            assert t["tau"] == pytest.approx(expected)
        # two seeds per method: no interval (see test_intervals_only_from_three_seeds)
        assert t["interval"] is None and t["interval_method"] is None and set(t["n"].values()) == {2}


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 4, 9).astype(float), rng.normal(size=9)
    assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic)
    assert kendall_tau([1.0, 1.0], [2.0, 3.0]) is None  # constant: undefined, not nan


def test_main_job_reduced_form_runs_end_to_end(tmp_path):
    """The README's main-job command on the real MiniLM and movie reviews, with the tiny budget."""
    code = study.main(["--budget", "tiny", "--methods", "lora", "cla", "--lr-grid", "1e-3", "1e-2",
                       "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "figures")])
    assert code == 0
    result = json.loads((tmp_path / "figures" / "report.json").read_text())
    assert sorted(result["methods"]) == ["cla", "lora"]
    assert all(os.path.getsize(p) > 0 for p in result["figures"])
    cla = result["methods"]["cla"]
    sel = cla["lr_selection"]
    assert {1e-3, 1e-2} <= set(sel["grid"]) and len(sel["grid"]) == 2 + len(sel["extensions"])
    assert cla["lr"] in sel["grid"] and (not sel["at_edge"] or sel["bound_reached"])  # interior, or at the bound
    assert cla["lr_selection"]["by"] == "val_metric" and result["settings"]["executor"]["executor"] == "ray"
    meta = adapters.read_meta(tmp_path / "runs" / f"cla-lr{cla['lr']:g}-s0")
    assert meta["base_model"] == "minilm" and meta["task"]["name"] == "movie-reviews"


def test_bad_input(tmp_path, capsys):
    assert study.main(["--methods", "lorax", "--runs", str(tmp_path / "r")]) == 2
    assert "unknown method(s) lorax" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "runs directory not found" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    for argv, message in ((["--margin", "1"], "margin must be in (0, 1), a difference of accuracies, got 1.0"),
                          (["--bootstrap", "0"], "bootstrap must be >= 1, got 0"),
                          (["--loss-clip", "-4"], "loss_clip must be > 0, got -4.0"),
                          (["--formats", "pdf,xls"], "--formats")):
        assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    # the study refuses a bad margin before it writes anything (its config.yaml included)
    assert study.main(["--runs", str(tmp_path / "r2"), "--out", str(tmp_path / "o"), "--margin", "0"]) == 2
    assert "margin must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "r2").exists()


def test_every_setting_is_a_flag_and_a_config_file_is_the_same_flags(tmp_path, monkeypatch):
    import dataclasses
    from adapters import command
    from adapters.settings import as_dict
    from tests.test_bounds_cli import check_flags_are_the_fields
    check_flags_are_the_fields(report.parser(), report.ReportConfig)
    assert command.parse(report.parser(), report.ReportConfig, ["runs"]) == (report.ReportConfig(), {"runs": "runs"})
    config = tmp_path / "report.yaml"
    config.write_text("loss-clip: 2\nbootstrap: 50\nmargin: 0.05\nformats: md,svg\nreadme: R.md\nout: o\n")
    flags = ["runs", "--loss-clip", "2", "--bootstrap", "50", "--margin", "0.05", "--formats", "md,svg", "--readme",
             "R.md", "--out", "o"]
    want = report.ReportConfig(loss_clip=2.0, bootstrap=50, margin=0.05, formats=("md", "svg"), readme="R.md",
                               out="o")
    for argv in (flags, ["runs", "--config", str(config)]):
        assert command.parse(report.parser(), report.ReportConfig, argv) == (want, {"runs": "runs"})

    check_flags_are_the_fields(study.parser(), study.StudyConfig)
    assert command.parse(study.parser(), study.StudyConfig, []) == (study.StudyConfig(), {})
    # the defaults are sweep()'s own: every field sweep() takes defaults to what sweep() applies
    for name, value in study.SWEEP_DEFAULTS.items():
        if name in study.StudyConfig.__dataclass_fields__ and name != "diagnostics":
            assert getattr(study.StudyConfig(), name) == value, name
    assert study.StudyConfig().diagnostics == list(study.SWEEP_DEFAULTS["diagnostics"])
    config = tmp_path / "study.yaml"
    config.write_text("methods: [cla, c3la]\nseeds: [3, 4]\nbudget: tiny\nlr-grid: [0.01]\ndata: d.csv\n"
                      "no-early-stopping: true\ndiagnostics: []\nkeep: final\nmax-steps: 5\nformats: md,png\n"
                      "device: cpu\nexecutor: serial\nno_report: true\nrank: 4\nalpha: 8\n")
    flags = ["--methods", "cla", "c3la", "--seeds", "3", "4", "--budget", "tiny", "--lr-grid", "0.01", "--data",
             "d.csv", "--no-early-stopping", "--diagnostics", "--keep", "final", "--max-steps", "5", "--formats",
             "md,png", "--device", "cpu", "--executor", "serial", "--no-report", "--rank", "4", "--alpha", "8"]
    want = study.StudyConfig(methods=["cla", "c3la"], seeds=[3, 4], budget="tiny", lr_grid=[0.01], data_file="d.csv",
                             early_stopping=False, diagnostics=[], keep="final", max_steps=5, formats=("md", "png"),
                             device="cpu", executor="serial", no_report=True, rank=4, alpha=8.0)
    for argv in (flags, ["--config", str(config)]):
        assert command.parse(study.parser(), study.StudyConfig, argv) == (want, {})
    # main hands every setting but where the report goes to sweep(), as sweep()'s keywords
    seen = {}
    monkeypatch.setattr(study, "sweep", lambda **kw: seen.update(kw) or {})
    assert study.main(["--config", str(config), "--runs", str(tmp_path / "runs")]) == 0
    given = as_dict(dataclasses.replace(want, runs=str(tmp_path / "runs")))
    assert seen == {k: v for k, v in given.items() if k not in ("out", "no_report", "readme", "margin", "formats")}
    assert seen["device"] == "cpu" and seen["early_stopping"] is False and seen["diagnostics"] == []


def test_device_reaches_every_run_diagnostic_and_the_reference(tmp_path, tiny_model, monkeypatch):
    """--device is where a study computes: every training run (adapters.train's device), the reference evaluation
    and every diagnostic; not what it computes: study.json does not record it."""
    import adapters.train
    from adapters import evaluate
    from analysis import hessian, landscape
    from analysis.executor import Plan
    seen = []
    monkeypatch.setattr(adapters.train, "train", lambda **kw: seen.append(("train", kw.get("device"))))
    monkeypatch.setattr(evaluate, "run", lambda *a, **kw: seen.append(("reference", kw.get("device"))))
    monkeypatch.setattr(spectral, "run", lambda *a, **kw: seen.append(("spectral", kw.get("device"))))
    monkeypatch.setattr(landscape, "run", lambda *a, **kw: seen.append(("landscape", kw.get("device"))))
    monkeypatch.setattr(hessian, "run", lambda *a, **kw: seen.append(("hessian", kw.get("device"))))
    for device in ("cpu", None):
        seen.clear()
        runs = tmp_path / f"runs-{device}"
        s = study.Study(runs=runs, methods=["cla"], budget="tiny", model=tiny_model, lr_grid=[1e-2], device=device)
        first = s.begin(Plan({}, kinds=study._kind))
        assert "device" not in json.loads((runs / "study.json").read_text())["train"]
        for _, fn, args in first:
            fn(*args)  # the selection run and the reference
        final = study.Run(s.runs, "cla", 1e-2, 1, s.common)
        for _, fn, args in s.then(study._train_job, final, (str(runs / "cla-lr0.01-s1"), None)):
            fn(*args)  # the final run's diagnostics
        assert sorted(seen) == sorted([("train", device), ("reference", device)] + [
            (which.split("_")[0], device) for which in study.DIAGNOSE]), seen


# -- the report's comparisons on fabricated runs (fast: no training) -----------------------------------

def _layer(name, intruders):
    return {"name": name, "intruders": intruders, "sweep": [intruders] * len(spectral.EPS_GRID)}


def _run(method, seed, gap, *, mi=1.0, vacuous=False, layers=None, hessian=None, converged=True, P=100):
    """A record as report.collect makes it, with only what the report reads."""
    lanczos = {"converged": converged}
    return dict(path=f"runs/{method}-lr0.001-s{seed}", method=method, seed=seed, lr=1e-3, val_loss_falling=None,
                stats={"test_metric": 0.5 + gap, "generalization_gap": gap, "wall_time_s": 1.0},
                bounds={"mi_bound": mi, "vacuous": vacuous, "clipped_gap": gap, "trained_parameters": P},
                spectral={"layers": layers} if layers is not None else None, spectral_settings=None,
                landscape=None, landscape_trainable=None,
                hessian={"eigenvalues": [hessian], "lanczos": lanczos} if hessian is not None else None,
                hessian_trainable=None)


def test_intruders_compare_every_method_on_the_matrices_the_lora_family_adapts():
    qv = [f"enc.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")]
    every = qv + [f"enc.{i}.{t}" for i in range(2) for t in ("attention.self.key", "intermediate.dense")] + ["pooler"]
    records = [_run("lora", 0, 0.1, layers=[_layer(n, 2) for n in qv]),
               _run("fft", 0, 0.2, layers=[_layer(n, 1 if n in qv else 40) for n in every]),
               _run("head", 0, 0.0, layers=[_layer(n, 0) for n in every])]
    names = records_.compared_matrices(records)
    assert names == qv
    for r in records:
        r["intruders"] = records_.restrict_intruders(r, names)
    table = summary.summary(records, names)
    assert table["fft"]["intruders"]["mean"] == 1.0  # not pulled up by its keys, FFN and pooler
    assert table["fft"]["intruders"]["matrices"] == qv == table["lora"]["intruders"]["matrices"]
    assert table["head"]["intruders"] is None  # no adapted matrix: n/a, not 0
    assert sorted(table["lora"]["intruders"]["by_type"]) == ["attention.self.query", "attention.self.value"]
    assert table["lora"]["intruders"]["by_type"]["attention.self.value"]["mean"] == 2.0
    md = tables.markdown(table, [summary.consistency(records, d) for d in records_.DIAGNOSTICS],
                         dict(runs="runs", runs_count=3, loss_clip=4.0, matrices=names, training_seconds=3.0))
    assert "| Head only | 1 | 0.001 | 100 | " in md and "n/a" in md.split("| Head only")[1].split("\n")[0]


def test_intervals_only_from_three_seeds():
    from scipy import stats
    two, three = summary.aggregate([1.0, 2.0]), summary.aggregate([1.0, 2.0, 4.0])
    assert (two["n"], two["ci"], two["std"]) == (2, None, pytest.approx(np.std([1, 2], ddof=1)))
    assert summary.aggregate([3.0])["std"] is None
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean([1, 2, 4]), scale=stats.sem([1, 2, 4]))
    assert three["ci"] == pytest.approx([lo, hi]) and "Student t" in three["ci_method"] and three["n"] == 3

    def runs(seeds):
        return [_run(m, s, g + 0.01 * s, mi=mi) for m, g, mi in (("head", 0.0, 1), ("cla", 0.1, 2), ("lora", 0.3, 3))
                for s in range(seeds)]
    assert summary.consistency(runs(2), "mi_bound")["interval"] is None
    t = summary.consistency(runs(3), "mi_bound", n_boot=200)
    assert t["tau"] == pytest.approx(1.0) and t["n"] == {"head": 3, "cla": 3, "lora": 3}
    assert -1 <= t["interval"][0] <= t["interval"][1] <= 1 and "percentile bootstrap" in t["interval_method"]


def test_non_converged_hessians_vacuous_bounds_and_ties_are_shown():
    records = [_run("cla", 0, 0.1, mi=5.0, vacuous=True, hessian=2.0, converged=False),
               _run("rcla", 0, 0.3, mi=5.0, vacuous=True, hessian=3.0),
               _run("lora", 0, 0.2, mi=9.0, vacuous=True, hessian=4.0)]
    for r in records:
        r["intruders"] = None
    table = summary.summary(records, [])
    assert table["cla"]["hessian"]["converged"] == [False] and table["rcla"]["hessian"]["converged"] == [True]
    taus = [summary.consistency(records, d) for d in records_.DIAGNOSTICS]
    hess = next(t for t in taus if t["diagnostic"] == "hessian")
    mi = next(t for t in taus if t["diagnostic"] == "mi_bound")
    assert hess["not_converged"] == 1 and mi["distinct"] == 2
    md = tables.markdown(table, taus, dict(runs="runs", runs_count=3, loss_clip=4.0, matrices=[],
                                           training_seconds=3.0))
    cla = next(line for line in md.splitlines() if line.startswith("| cLA |"))
    assert "2 †" in cla and "5 ‡" in cla
    assert "MI bound takes 2 distinct values over 3 (it depends on the trained-scalar count P alone)" in md
    mi_row = next(line for line in md.splitlines() if line.startswith("| MI bound"))
    assert "| not informative |" in mi_row and not mi["informative"]  # 2 distinct values: no bare τ
    assert "‡ vacuous" in md and "† some Lanczos runs did not converge" in md
    tex = tables.latex(table)
    assert r"$^\dagger$" in tex and r"$^\ddagger$" in tex


# -- the README's results section ------------------------------------------------------------------

def test_report_writes_the_readme_results_section(tiny_study, tmp_path, capsys):
    root, _ = tiny_study
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nprose before\n\n", "\nprose after\n"
    readme.write_text(before + readme_.README_BEGIN + "\nstale numbers 69 %\n" + readme_.README_END + after)
    assert report.main([str(root / "runs"), "--out", str(tmp_path / "fig"), "--formats", "png", "--bootstrap", "20",
                        "--readme", str(readme)]) == 0
    text = readme.read_text()
    saved = json.loads((tmp_path / "fig" / "report.json").read_text())
    assert text == before + readme_.README_BEGIN + "\n" + saved["readme_section"] + readme_.README_END + after
    assert "stale" not in text and saved["markdown"] in saved["readme_section"]
    for link in [line.split("](")[1][:-1] for line in saved["readme_section"].splitlines() if line.startswith("![")]:
        assert (tmp_path / link).exists(), link  # figure links resolve from the README's directory
    # every Hessian of the tiny study converged within its budget, and the report says so run by run
    assert all(r["hessian_converged"] is True and r["hessian_trainable_converged"] is True for r in saved["runs"])
    readme.write_text("no markers here\n")
    capsys.readouterr()
    assert report.main([str(root / "runs"), "--out", str(tmp_path / "fig2"), "--readme", str(readme)]) == 2
    assert "results:begin" in capsys.readouterr().err
    assert not (tmp_path / "fig2").exists() and readme.read_text() == "no markers here\n"


def test_the_reports_formats_are_its_tables_and_figures(tiny_study, tmp_path, capsys):
    """--formats names the tables (report.md, report.tex) and the figures' formats; report.json is always written;
    the numbers do not depend on the formats."""
    root, result = tiny_study
    out = tmp_path / "fig"
    assert report.main([str(root / "runs"), "--out", str(out), "--formats", "md,svg", "--bootstrap", "20"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert {"report.json", "report.md", "outcomes.svg", "consistency.svg"} <= set(files)
    assert all(f in ("report.json", "report.md") or f.endswith(".svg") for f in files), files
    saved = json.loads((out / "report.json").read_text())
    assert saved["runs"] == result["runs"] and len(saved["figures"]) == len(files) - 2
    printed = capsys.readouterr().out
    assert printed == saved["markdown"] + "\n" + (f"wrote {out}/report.json, {out}/report.md and "
                                                   f"{len(saved['figures'])} figures (svg) in {out}\n")
    assert report.main([str(root / "runs"), "--out", str(tmp_path / "tex"), "--formats", "tex", "--bootstrap",
                        "20"]) == 0
    assert sorted(p.name for p in (tmp_path / "tex").iterdir()) == ["report.json", "report.tex"]


def test_the_readme_results_are_the_reports_own():
    """The repository README states the study's numbers only inside its results section, and that section is
    what `python -m analysis.report runs/ --out figures/ --readme README.md` wrote into figures/report.json."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    assert text.count(readme_.README_BEGIN) == 1 and text.count(readme_.README_END) == 1
    section = text.split(readme_.README_BEGIN)[1].split(readme_.README_END)[0]
    saved = json.loads((root / "figures" / "report.json").read_text())
    assert section == "\n" + saved.get("readme_section", "(figures/report.json has no README section)")


# -- the claims: the bound against every other diagnostic, and how the table reads ------------------------

def _seeded_runs(hessian_of, noise=0.01):
    """Four methods × three seeds whose MI bound orders the mean gaps; the Hessian as `hessian_of(gap, mi)`; seeds
    spread by `noise` (0.3: resampled seeds reorder the methods)."""
    out = []
    for m, gap, mi, P in (("head", 0.0, 1.0, 10), ("cla", 0.1, 2.0, 20), ("asym", 0.2, 3.0, 30),
                          ("lora", 0.3, 4.0, 40)):
        for s in range(3):
            g = gap + noise * (s if m != "cla" else 2 - s) * (1 if s != 1 else -1)
            r = _run(m, s, g, mi=mi, hessian=hessian_of(g, mi), P=P)
            r["intruders"] = None
            out.append(r)
    return out


def test_the_bound_is_compared_with_each_diagnostic_by_a_bootstrap_over_methods_and_seeds():
    from analysis import claims
    records = _seeded_runs(lambda g, mi: 10.0 - mi)  # the Hessian orders the methods backwards
    rows = [c for c in claims.claims(records, n_boot=200) if c["kind"] == "tau"]
    assert [c["second"] for c in rows] == ["hessian"]  # one row per diagnostic the runs have
    row = rows[0]
    assert row["diff"] == pytest.approx(2.0) and row["family"] == "tau"
    assert "methods, then each" in row["interval_method"]
    # a resample that draws a method twice ties it in the bound and the Hessian but not in Ĝ (its seeds drawn
    # apart): both |τ| < 1; one that draws a single method orders nothing (τ = 0)
    assert 0 <= row["ci"][0] < row["ci"][1] == pytest.approx(2.0)
    same = _seeded_runs(lambda g, mi: mi + 0.001 * g, noise=0.3)  # the bound's ordering, other values
    row = next(c for c in claims.claims(same, n_boot=200) if c["kind"] == "tau")
    # the same ordering: no difference, and none decided (a resample drawing a method twice ties it in the bound
    # but not in the other diagnostic, so single resamples differ both ways)
    assert row["diff"] == 0 and row["ci"][0] <= 0 <= row["ci"][1] and row["verdict"] == "undecided"
    three = [r for r in records if r["method"] != "head"]  # 3 methods: 3 distinct values, τ decides nothing
    row = next(c for c in claims.claims(three, n_boot=200) if c["kind"] == "tau")
    assert row["p"] is None and row["verdict"] == "undecided" and "not informative" in row["note"]
    assert "3 methods, 3 seeds each" in next(line for line in tables.claim_lines([row]) if line.startswith("| the MI"))
    tau = summary.consistency(same, "mi_bound", n_boot=200)
    assert tau["interval"][0] < tau["interval"][1]  # while τ itself moves from resample to resample


def test_the_bootstrap_over_methods_is_wider_than_over_seeds_alone():
    """An ordering of methods is a sample of methods: with the methods fixed, a τ from 4 well-separated methods
    never moves; resampling the methods too gives the spread a reader must allow for."""
    records = _seeded_runs(lambda g, mi: mi + (2.5 if mi == 1.0 else 0.0), noise=0.01)  # head out of place
    t = summary.consistency(records, "hessian", n_boot=400)
    assert t["tau"] == pytest.approx(1 / 3)  # head is third by the Hessian, first by Ĝ: 4 of 6 pairs agree
    # over seeds alone the interval would be [1/3, 1/3] (noise 0.01 never reorders the methods)
    assert t["interval"][1] - t["interval"][0] >= 1.0


def test_the_claims_table_names_first_and_second_and_says_what_would_decide():
    from analysis import claims
    acc = {"lora": [0.80, 0.79, 0.81], "cla": [0.70, 0.72, 0.69], "asym": [0.71, 0.74, 0.70]}
    records = [dict(_run(m, s, 0.0), converged=(s != 2), intruders=None) for m in acc for s in range(3)]
    for r in records:
        r["stats"]["test_metric"] = acc[r["method"]][r["seed"]]
    found = claims.claims(records)
    lines = tables.claim_lines(found, dict(alpha=0.05))
    vs_lora = next(line for line in lines if line.startswith("| cla within 3 points of lora"))
    assert "cla − lora = -0.0967" in vs_lora and "| 3 seeds (no per-example outcomes: seeds only) |" in vs_lora
    assert "stopped at the cap still improving: cla, lora" in vs_lora and "non-inferior now for δ > " in vs_lora
    vs_asym = next(line for line in lines if line.startswith("| cla within 3 points of asym"))
    c = next(c for c in found if c["claim"].startswith("cla within 3 points of asym"))
    assert "cla − asym = -0.0133" in vs_asym and f"{c['p_noninferior']:.3f} ({c['p_holm']:.3f})" in vs_asym
    assert any(line.startswith("**Accuracy against a baseline** (2 claims). Competitive") for line in lines)
    assert tables.p_text(0.997) == "0.997" and tables.p_text(0.9996) == "> 0.999" and tables.p_text(2e-4) == "< 0.001"
    assert tables.p_text(0.0498) == "0.0498" and tables.p_text(0.0502) == "0.0502"  # not "0.050" beside its verdict


def test_the_study_records_how_busy_its_slots_were(tiny_study):
    root, result = tiny_study
    ex = json.loads((root / "runs" / "lr_selection.json").read_text())["executor"]
    # every job of the one queue: 3 methods' selection runs, 3 methods x 2 final seeds, each final run's 5
    # diagnostics, the untrained reference
    assert ex["jobs"] == 3 + 6 + 6 * 5 + 1 and ex["slots"] == 1
    assert 0 < ex["busy_s"] <= ex["wall_s"] and ex["utilisation"] == pytest.approx(ex["busy_s"] / ex["wall_s"])
    assert f"its 40 jobs kept its 1 slot busy {ex['utilisation']:.0%} of the time" in result["markdown"]
    # and on which machine: the runs record it (training_stats' machine), the report's first line says it
    machine = json.loads(next((root / "runs").glob("*-s1/training_stats.json")).read_text())["machine"]
    assert f"on {machine['cpu']} ({machine['logical_cpus']} logical CPUs)" in result["markdown"]


def test_a_chain_that_kept_its_first_link_is_said_to_be_its_twins_run():
    records = [dict(_run(m, s, 0.1), intruders=None) for m in ("cla", "c3la") for s in (1, 2, 3)]
    for r in records:
        r["stats"]["best_link"] = 1 if r["seed"] != 3 or r["method"] == "cla" else 2
    settings = dict(runs="runs", runs_count=6, loss_clip=4.0, matrices=[], training_seconds=6.0)
    note = "c3LA kept its first link's weights in every seed"
    assert note not in tables.markdown(summary.summary(records, []), [], settings)  # seed 3 kept link 2
    records[-1]["stats"]["best_link"] = 1
    assert note + " (its later links never lowered the validation loss): its numbers are those of its one-link " \
        "twin cLA" in tables.markdown(summary.summary(records, []), [], settings)
