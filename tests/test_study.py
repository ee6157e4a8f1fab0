"""The study: resumable sweep, a report whose numbers are the runs' own, Kendall τ, the main job end to end."""
import json
import os

import numpy as np
import pytest
from scipy.stats import kendalltau

import adapters
from adapters import models
from analysis import report, study


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(models.tiny_model_dir(tmp_path_factory.mktemp("model") / "bert", "bert"))


def test_interrupted_sweep_resumes_without_redoing_runs(tmp_path, tiny_model, monkeypatch):
    import adapters.train
    real_train = adapters.train.train

    def crashing(**kw):
        if kw["method"] == "cla":
            raise KeyboardInterrupt  # the machine went away in the middle of the sweep
        return real_train(**kw)
    runs = tmp_path / "runs"
    kwargs = dict(runs=runs, methods=["lora", "cla"], budget="tiny", model=tiny_model, diagnostics=(),
                  progress=False)
    monkeypatch.setattr(adapters.train, "train", crashing)
    with pytest.raises(KeyboardInterrupt):
        study.sweep(**kwargs)
    done = runs / "lora-s0" / "training_stats.json"
    assert done.exists() and not (runs / "cla-s0").exists()
    before = done.stat().st_mtime_ns

    trained = []
    monkeypatch.setattr(adapters.train, "train", lambda **kw: trained.append(kw["method"]) or real_train(**kw))
    study.sweep(**kwargs)
    assert trained == ["cla"] and done.stat().st_mtime_ns == before
    assert (runs / "cla-s0" / "training_stats.json").exists()
    with pytest.raises(adapters.AdapterError, match="other settings"):
        study.sweep(**{**kwargs, "rank": 8})


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("study")
    study.sweep(runs=root / "runs", methods=["lora", "cla", "c3la"], seeds=[0, 1], budget="tiny", model=tiny_model,
                progress=False)
    return root, report.report(root / "runs", root / "figures", n_boot=200, formats=("png",))


def test_report_numbers_are_the_runs_own(tiny_study):
    root, result = tiny_study
    assert len(result["runs"]) == 6
    for row in result["runs"]:
        run = root / "runs" / f"{row['method']}-s{row['seed']}"
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
            lo, hi = t["interval"]
            assert -1 <= lo <= hi <= 1


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 4, 9).astype(float), rng.normal(size=9)
    assert report.kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic)
    assert report.kendall_tau([1.0, 1.0], [2.0, 3.0]) is None  # constant: undefined, not nan


def test_main_job_reduced_form_runs_end_to_end(tmp_path):
    """The README's main-job command on the real MiniLM and movie reviews, with the tiny budget."""
    code = study.main(["--budget", "tiny", "--methods", "lora", "cla", "--runs", str(tmp_path / "runs"),
                       "--out", str(tmp_path / "figures")])
    assert code == 0
    result = json.loads((tmp_path / "figures" / "report.json").read_text())
    assert sorted(result["methods"]) == ["cla", "lora"]
    assert all(os.path.getsize(p) > 0 for p in result["figures"])
    meta = adapters.read_meta(tmp_path / "runs" / "cla-s0")
    assert meta["base_model"] == "minilm" and meta["task"]["name"] == "movie-reviews"


def test_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        study.main(["--methods", "lorax", "--runs", str(tmp_path / "r")])
    assert e.value.code == 2 and "unknown method(s) lorax" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "nothing")])
    assert e.value.code == 2 and "runs directory not found" in capsys.readouterr().err
