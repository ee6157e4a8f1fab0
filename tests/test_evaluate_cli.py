"""python -m adapters.evaluate (a checkpoint, or the untrained model as the reference), and the per-example losses
training records so that bounds need not run the model again."""
import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import adapters
from adapters import evaluate, example_losses, models, taskspec
from adapters.train import train
from bounds import report as bounds_report
from bounds.__main__ import main as bounds_main

TINY = dict(rank=2, alpha=4, n_train=24, n_val=8, n_test=16, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(dict(prompt=f"say {i}\n", completion=f"word {i % 5} " * (1 + i % 3))) + "\n"
                             for i in range(120)))
    return {"classification": (models.tiny_model_dir(root / "bert", "bert"), None),
            "causal-lm": (models.tiny_model_dir(root / "llama", "llama"), pairs)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bases):
    base, _ = bases["classification"]
    out = tmp_path_factory.mktemp("run") / "ckpt"
    train(model=str(base), method="lora", max_steps=4, lr=0.05, out=str(out), **TINY)
    return out


@pytest.mark.parametrize("kind", ["classification", "causal-lm"])
def test_the_untrained_model_is_trainings_step_zero(kind, bases, tmp_path):
    """The reference row: the base model (a classifier with the head train draws with the same seed) evaluates to
    what a run that does not move its weights records (the old workaround: --lr 1e-12 --max-steps 1)."""
    base, data = bases[kind]
    opts = dict(data_file=str(data) if data else None, n_train=24, n_val=8, n_test=16)
    stats = train(model=str(base), method="lora", max_steps=1, lr=1e-12, seed=3, out=str(tmp_path / "still"),
                  **{**TINY, **opts})
    r = evaluate.run(str(base), seed=3, out=tmp_path / "e.json", progress=False, **opts)
    assert not r["checkpoint"] and r["metric"] == stats["metric"]
    for split in ("train", "val", "test"):
        assert r["splits"][split]["examples"] == stats[f"n_{split}"]
        assert r["splits"][split]["loss"] == pytest.approx(stats[f"{split}_loss"], rel=1e-6)
        assert r["splits"][split]["metric"] == pytest.approx(stats[f"{split}_metric"], rel=1e-6)
    assert json.loads((tmp_path / "e.json").read_text())["splits"] == r["splits"]
    # Another seed draws another classifier head: the seed reaches the model.
    if kind == "classification":
        other = evaluate.run(str(base), seed=4, out=tmp_path / "e4.json", progress=False, **opts)
        assert other["splits"]["test"]["loss"] != pytest.approx(r["splits"]["test"]["loss"], rel=1e-6)


def test_a_checkpoint_evaluates_to_its_training_stats(trained, tmp_path, capsys):
    stats = adapters.read_stats(trained)
    assert evaluate.main([str(trained), "--no-progress"]) == 0  # --out: the checkpoint directory
    out = capsys.readouterr().out
    saved = json.loads((trained / "evaluate.json").read_text())
    assert out.splitlines()[-1] == f"wrote {trained}/evaluate.json, {trained}/evaluate.md"
    assert out.removesuffix(out.splitlines()[-1] + "\n") == (trained / "evaluate.md").read_text()
    for split in ("train", "val", "test"):
        assert saved["splits"][split]["loss"] == pytest.approx(stats[f"{split}_loss"], rel=1e-6)
        assert saved["splits"][split]["accuracy"] == pytest.approx(stats[f"{split}_metric"], rel=1e-9)
        assert f"| {split} | {stats[f'n_{split}']} |" in out
    assert saved["task"]["sha256"] == adapters.read_meta(trained)["task"]["sha256"]
    # --n-test replaces the recorded size; --examples takes a seeded subset.
    assert evaluate.main([str(trained), "--n-test", "4", "--splits", "test", "--out", str(tmp_path / "n4"),
                          "--no-progress"]) == 0
    assert "| test | 4 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--splits", "dev"], "invalid choice"),
    (["--data", "/nonexistent.csv"], "data file not found"),
    (["--examples", "0"], "examples must be >= 1, got 0"),
    (["--examples", "some"], "expected a positive integer or 'all'"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--n-test", "0"], "n_test must be >= 1, got 0"),
    (["--max-length", "-3"], "max_length must be >= 1, got -3"),
    (["--val-fraction", "1"], "val_fraction must be in [0, 1), got 1.0"),
    (["--n-train", "100000"], "out of range"),
    (["--formats", "md,docx"], "--formats: unknown format 'docx'"),
])
def test_bad_input_exits_2_with_one_line(trained, tmp_path, capsys, argv, message):
    assert evaluate.main([str(trained), *argv, "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()  # nothing written under --out
    assert evaluate.main([str(tmp_path / "no-such-model"), "--out", str(tmp_path / "e")]) == 2
    assert "model not found" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_evaluate_writes_into_its_out_directory(trained, bases, tmp_path, capsys, monkeypatch):
    """--out DIR holds evaluate.json (run()'s result) and, with md in --formats, evaluate.md (the printed table);
    an untrained model's default is ./evaluate; an --out that is a file (the old --out FILE.json) is refused."""
    out = tmp_path / "e"
    assert evaluate.main([str(trained), "--splits", "test", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "evaluate.json").read_text())
    want = evaluate.run(str(trained), splits=["test"], out=tmp_path / "by-hand.json", progress=False)
    assert saved == {k: v for k, v in want.items() if k != "out"} and list(saved["splits"]) == ["test"]
    assert sorted(p.name for p in out.iterdir()) == ["evaluate.json", "evaluate.md"]
    assert printed == (out / "evaluate.md").read_text() + f"wrote {out}/evaluate.json, {out}/evaluate.md\n"
    assert evaluate.main([str(trained), "--splits", "test", "--out", str(tmp_path / "j"), "--formats", "tex,png",
                          "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "j").iterdir()] == ["evaluate.json"]
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path}/j/evaluate.json"
    monkeypatch.chdir(tmp_path)
    assert evaluate.main([str(bases["classification"][0]), "--splits", "test", "--n-test", "8", "--no-progress"]) == 0
    assert json.loads((tmp_path / "evaluate" / "evaluate.json").read_text())["checkpoint"] is False
    assert capsys.readouterr().out.splitlines()[-1] == "wrote evaluate/evaluate.json, evaluate/evaluate.md"
    (tmp_path / "old.json").write_text("{}")
    assert evaluate.main([str(trained), "--out", str(tmp_path / "old.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and "evaluate.json" in err


def test_every_setting_is_a_flag_and_a_config_file_is_the_same_flags(tmp_path):
    from adapters import command
    from tests.test_bounds_cli import check_flags_are_the_fields
    check_flags_are_the_fields(evaluate.parser(), evaluate.EvaluateConfig)
    assert command.parse(evaluate.parser(), evaluate.EvaluateConfig, ["ckpt"]) == \
        (evaluate.EvaluateConfig(), {"target": "ckpt"})
    flags = ["ckpt", "--splits", "val", "test", "--examples", "5", "--batch-size", "4", "--seed", "3", "--device",
             "cpu", "--out", "o", "--no-progress", "--formats", "md,png", "--n-test", "8", "--data", "d.csv",
             "--val-fraction", "0.2"]
    config = tmp_path / "evaluate.yaml"
    config.write_text("splits: [val, test]\nexamples: 5\nbatch-size: 4\nseed: 3\ndevice: cpu\nout: o\n"
                      "no-progress: true\nformats: md,png\nn_test: 8\ndata: d.csv\nval-fraction: 0.2\n")
    want = evaluate.EvaluateConfig(splits=["val", "test"], examples=5, batch_size=4, seed=3, device="cpu", out="o",
                                   progress=False, formats=("md", "png"), n_test=8, data_file="d.csv",
                                   val_fraction=0.2)
    parse = lambda argv: command.parse(evaluate.parser(), evaluate.EvaluateConfig, argv)  # noqa: E731
    assert parse(flags) == parse(["ckpt", "--config", str(config)]) == (want, {"target": "ckpt"})
    assert parse(["ckpt", "--examples", "all"])[0].examples is None


# ---- per-example losses: recorded by training, reused by bounds when they are of the same weights and split ----

def test_training_records_the_final_per_example_losses(trained):
    spec, _ = taskspec.checkpoint_data(trained)
    recorded, why = example_losses.recorded_losses(trained, spec)
    assert recorded is not None and "these weights and this split" in why
    fresh = bounds_report.per_example_losses(trained)
    for split in ("train", "test"):
        np.testing.assert_allclose(recorded[split][0], fresh[split][0], rtol=1e-6)
        assert recorded[split][1] == fresh[split][1]
    stats = adapters.read_stats(trained)
    assert max(recorded["test"][0]) == pytest.approx(stats["test_loss_max"], rel=1e-12)


def _clipped_row(capsys, ckpt, b, *argv):
    from tests.test_bounds_cli import run_json
    return run_json(capsys, str(ckpt), "--loss-clip", str(b), "--no-theorem1", *argv)[0]


def test_bounds_reuse_recorded_losses_and_only_those_of_the_same_weights_and_split(trained, tmp_path, capsys,
                                                                                     monkeypatch):
    import shutil
    runs = []
    real = bounds_report._evaluated
    monkeypatch.setattr(bounds_report, "_evaluated", lambda *a, **k: runs.append(a[0]) or real(*a, **k))
    fresh = bounds_report.per_example_losses(trained)
    runs.clear()
    b = float(np.median(fresh["test"][0]))  # clipping bites: the clipped gap needs the per-example losses
    want = np.mean(np.minimum(fresh["test"][0], b)) - np.mean(np.minimum(fresh["train"][0], b))
    row = _clipped_row(capsys, trained, b)
    assert runs == [] and "recorded by training" in row["clipped_gap_source"]  # the model did not run
    assert row["clipped_gap"] == pytest.approx(want, rel=1e-6)
    # Other weights (B changed in the file): the record is not theirs, the model runs.
    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    weights = load_file(str(moved / "adapter_model.safetensors"))
    save_file({k: v * 1.5 if ".lora_B." in k else v for k, v in weights.items()},
              str(moved / "adapter_model.safetensors"))
    row = _clipped_row(capsys, moved, b)
    assert runs == [str(moved)] and "other weights" in row["clipped_gap_source"]
    moved_losses = bounds_report.per_example_losses(moved)
    assert row["clipped_gap"] == pytest.approx(np.mean(np.minimum(moved_losses["test"][0], b))
                                               - np.mean(np.minimum(moved_losses["train"][0], b)), rel=1e-6)
    # Another split of the same data (--n-test): measured on it, not read from the record.
    runs.clear()
    row = _clipped_row(capsys, trained, b, "--n-test", "8")
    assert runs == [str(trained)] and row["n_test"] == 8 and "another split" in row["gap_source"]
    # And progress is shown while the model runs (the same bars as the other commands).
    capsys.readouterr()
    assert bounds_main([str(moved), "--loss-clip", str(b), "--no-theorem1", "--out", str(tmp_path / "b")]) == 0
    assert "train losses" in capsys.readouterr().err


def test_a_record_of_another_checkpoint_is_not_taken(trained, tmp_path, bases):
    """Two runs of the same data: the weights digest, not the file name, says whose losses they are."""
    other = tmp_path / "other"
    train(model=str(bases["classification"][0]), method="lora", max_steps=4, lr=0.05, seed=1, out=str(other), **TINY)
    (other / example_losses.EXAMPLE_LOSSES).write_bytes((trained / example_losses.EXAMPLE_LOSSES).read_bytes())
    recorded, why = example_losses.recorded_losses(other, taskspec.checkpoint_data(other)[0])
    assert recorded is None and "other weights" in why
