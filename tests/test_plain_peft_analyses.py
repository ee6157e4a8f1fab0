"""A plain PEFT LoRA directory (no task, no statistics) with the user's data: --task / --data give it a landscape, a
Hessian spectrum, Ĝ and an evaluation, each equal to the same computation done by hand on the loaded model."""
import csv
import json

import numpy as np
import pytest
import torch

import adapters
from adapters import evaluate, models, taskspec


def _peft_dir(path, base, task_type, targets, auto_class=None):
    """A stock PEFT LoRA adapter on `base` with random (non-zero) B, saved as peft saves it: no task recorded."""
    import peft
    model = peft.get_peft_model(models.load_model(base, 2, seed=0, auto_class=auto_class),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    """(PEFT SEQ_CLS adapter of a tiny BERT, a text,label CSV) as a MiniLM user would have them."""
    root = tmp_path_factory.mktemp("cls")
    base = models.tiny_model_dir(root / "bert", "bert")
    data = root / "reviews.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([f"review {i} was {'good' if i % 3 else 'bad'} {'!' * (i % 4)}", int(i % 3 > 0)] for i in range(40))
    return _peft_dir(root / "peft", base, "SEQ_CLS", ["query", "value"]), data


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(PEFT CAUSAL_LM adapter of a tiny Llama, a prompt,completion JSONL) as a SmolLM2 user would have them."""
    root = tmp_path_factory.mktemp("lm")
    base = models.tiny_model_dir(root / "llama", "llama")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(dict(prompt=f"question {i}?\n", completion=f"answer {i % 7} " * (1 + i % 3)))
                            + "\n" for i in range(40)))
    return _peft_dir(root / "peft", base, "CAUSAL_LM", ["q_proj", "v_proj"], "AutoModelForCausalLM"), data


def _by_hand(path, data, split, examples=None, attn_implementation=None):
    """(model, batches, score) of the PEFT directory on the data, built here from adapters.data and adapters.tasks:
    the user's rows split as adapters.train splits them, MAX_LENGTH tokens."""
    from adapters import data as adata, tasks
    meta = adapters.read_meta(path)
    kind = tasks.of_meta(meta)
    rows = getattr(adata.load_task(data=str(data)), split)
    rows = taskspec.subset(rows, examples, 0)
    b = evaluate.batches(models.load_processor(meta["base_model"]), rows, taskspec.MAX_LENGTH, 32, kind)
    return adapters.load(path, attn_implementation=attn_implementation), b, kind.score


@pytest.mark.parametrize("which", ["cls", "lm"])
def test_landscape_of_a_plain_peft_directory_on_the_users_data(which, request, tmp_path, capsys):
    from analysis import landscape
    path, data = request.getfixturevalue(which)
    assert landscape.main([str(path), "--dims", "1", "--grid", "3", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "--task" in err and "--data" in err and err.count("\n") == 1
    r = landscape.run(path, data_file=str(data), dims=1, grid=3, examples=12, out=tmp_path / "l", progress=False,
                      formats=("png",))
    for split in ("train", "test"):
        model, batches, score = _by_hand(path, data, split, 12)
        assert r["curves"][split]["loss"][1] == pytest.approx(evaluate.evaluate(model, batches, score)["loss"],
                                                              rel=1e-5)
    assert r["settings"]["data_file"] == str(data)


@pytest.mark.parametrize("which", ["cls", "lm"])
def test_hessian_of_a_plain_peft_directory_on_the_users_data(which, request, tmp_path, capsys):
    from analysis import hessian, lanczos, spaces
    path, data = request.getfixturevalue(which)
    assert hessian.main([str(path), "--data", str(data), "--top-k", "1", "--examples", "8", "--tol", "1e-5",
                         "--out", str(tmp_path / "h"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "h" / "hessian.json").read_text())
    model, batches, score = _by_hand(path, data, "train", 8, attn_implementation="eager")
    assert saved["loss"] == pytest.approx(evaluate.evaluate(model, batches, score)["loss"], rel=1e-6)
    spaces.as_trained(model, adapters.read_meta(path))  # B with PEFT's scale α/r in the forward, as PEFT trains it
    named = [p for _, p in model.named_parameters() if p.requires_grad]
    assert saved["parameters"] == sum(p.numel() for p in named)
    op = hessian.HessianOperator(model, named, batches, score=score)
    top = lanczos.top_eigenvalues(op, op.n, 1, tol=1e-5, seed=0)
    np.testing.assert_allclose(saved["eigenvalues"], top["eigenvalues"], rtol=1e-5)


@pytest.mark.parametrize("which", ["cls", "lm"])
def test_bounds_of_a_plain_peft_directory_measure_the_gap_on_the_users_data(which, request, tmp_path, capsys):
    from bounds.__main__ import main
    path, data = request.getfixturevalue(which)
    out = tmp_path / "bounds"
    # Without statistics it asks for what it needs by flag, all at once, not for a field of a file it lacks.
    assert main([str(path), "--no-theorem1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--n-examples" in err and "--sigma" in err and "--loss-clip" in err and "--data" in err
    assert "in training_stats.json" not in err
    assert main([str(path), "--no-theorem1", "--n-examples", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--sigma S or --loss-clip B" in err and "--n-examples" not in err
    losses = {}
    for split in ("train", "test"):
        model, batches, score = _by_hand(path, data, split)
        losses[split] = evaluate.evaluate(model, batches, score)
    b = float(np.median(losses["test"]["losses"]))  # clipping bites
    assert not out.exists()
    assert main([str(path), "--data", str(data), "--loss-clip", str(b), "--no-theorem1", "--out", str(out),
                 "--no-progress"]) == 0
    [row] = json.loads((out / "bounds.json").read_text())
    assert row["n_train"] == len(losses["train"]["losses"]) and row["n_test"] == len(losses["test"]["losses"])
    assert row["empirical_gap"] == pytest.approx(losses["test"]["loss"] - losses["train"]["loss"], rel=1e-5)
    clip = {s: np.average(np.minimum(r["losses"], b), weights=r["units"]) for s, r in losses.items()}
    assert row["clipped_gap"] == pytest.approx(clip["test"] - clip["train"], rel=1e-5, abs=1e-9)
    assert "measured" in row["gap_source"]
    # The default σ heuristic has its largest training loss now.
    assert main([str(path), "--data", str(data), "--no-theorem1", "--out", str(out), "--no-progress"]) == 0
    [row] = json.loads((out / "bounds.json").read_text())
    assert row["loss_range"][1] == pytest.approx(max(losses["train"]["losses"]), rel=1e-6)


def test_bounds_refuse_data_of_another_task_type(cls, lm, tmp_path, capsys):
    from bounds.__main__ import main
    assert main([str(lm[0]), "--data", str(cls[1]), "--sigma", "1", "--no-theorem1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "classification task" in err and "causal-lm model" in err and not (tmp_path / "b").exists()


def test_evaluate_a_plain_peft_directory(lm, tmp_path, capsys):
    path, data = lm
    assert evaluate.main([str(path), "--data", str(data), "--splits", "test", "--out", str(tmp_path / "e"),
                          "--no-progress"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "e" / "evaluate.json").read_text())
    model, batches, score = _by_hand(path, data, "test")
    want = evaluate.evaluate(model, batches, score)["loss"]
    assert saved["splits"]["test"]["loss"] == pytest.approx(want, rel=1e-6)
    assert saved["splits"]["test"]["perplexity"] == pytest.approx(np.exp(want), rel=1e-6)
    assert list(saved["splits"]) == ["test"] and "| test |" in out and "perplexity" in out
