"""adapters.train and checkpoints: PEFT compatibility, resume, DDP, real MiniLM end to end, bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters import evaluate, models
from adapters.train import main, snapshot, train

LORA_FAMILY = [n for n, m in adapters.METHODS.items() if m.adapter is not None]
TINY = dict(rank=4, alpha=8, max_steps=6, n_train=48, n_test=24, batch_size=8, max_length=32, progress=False)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: str(models.tiny_model_dir(root / f, f)) for f in ("bert", "gpt2", "llama")}


def _train(tmp_path, model, method, name=None, **kw):
    out = tmp_path / (name or method)
    settings = {**TINY, **kw}
    if adapters.get_method(method).adapter and adapters.get_method(method).adapter.chained:
        settings.setdefault("chain_length", 3)
    stats = train(model=model, method=method, out=out, **settings)
    return out, stats


def _peft_logits(path, batch):
    import peft
    meta = adapters.read_meta(path)
    base = models.load_model(meta["base_model"], meta["num_labels"], seed=123)  # a different head: PEFT must load it
    peft_model = peft.PeftModel.from_pretrained(base, str(path)).eval()
    with torch.no_grad():
        return peft_model(**batch).logits


@pytest.mark.parametrize("method", LORA_FAMILY)
def test_stock_peft_loads_every_lora_family_checkpoint_with_identical_logits(tmp_path, tiny_dirs, method):
    path, _ = _train(tmp_path, tiny_dirs["bert"], method)
    batch = evaluate.checkpoint_batches(path, "test", batch_size=24)[0]
    with torch.no_grad():
        ours = adapters.load(path)(**{k: v for k, v in batch.items() if k != "labels"}).logits
    theirs = _peft_logits(path, {k: v for k, v in batch.items() if k != "labels"})
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    config = json.loads((path / "adapter_config.json").read_text())
    k = adapters.read_meta(path)["chain_length"]
    assert config["r"] == config["lora_alpha"] == 4 * k


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_other_families_train_save_and_load(tmp_path, tiny_dirs, family):
    path, stats = _train(tmp_path, tiny_dirs[family], "c3la")
    batch = {k: v for k, v in evaluate.checkpoint_batches(path, "test", batch_size=24)[0].items() if k != "labels"}
    with torch.no_grad():
        ours = adapters.load(path)(**batch).logits
    torch.testing.assert_close(ours, _peft_logits(path, batch), rtol=1e-5, atol=1e-6)
    fresh = evaluate.evaluate(adapters.load(path), evaluate.checkpoint_batches(path, "test"))
    assert fresh["loss"] == pytest.approx(stats["test_loss"], rel=1e-6)


def test_loaded_model_trains_exactly_the_trained_scalars_and_matches_the_trajectory_end(tmp_path, tiny_dirs):
    path, _ = _train(tmp_path, tiny_dirs["bert"], "cola", save_trajectory=3)
    model = adapters.load(path)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    snaps = sorted((path / "trajectory").glob("step_*.safetensors"))
    assert [s.name for s in snaps] == ["step_00000002.safetensors", "step_00000004.safetensors",
                                      "step_00000006.safetensors"]
    last = load_file(str(snaps[-1]))
    assert set(last) == set(trainable)
    for name, tensor in last.items():
        torch.testing.assert_close(tensor, trainable[name], rtol=0, atol=1e-7)
    # the first snapshot has links 2 and 3 still at B = 0 (their columns of the merged B)
    first = load_file(str(snaps[0]))
    B = first["bert.encoder.layer.0.attention.self.query.B"]
    assert B[:, :4].abs().sum() > 0 and B[:, 4:].abs().sum() == 0
    meta = adapters.read_meta(path)
    assert meta["link_boundaries"] == [2, 4]
    assert meta["parameters"]["adapter"] == sum(3 * 4 * (l["m"] + l["n"]) for l in meta["parameters"]["layers"])


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_dirs):
    settings = dict(max_steps=10, chain_length=2, save_every=2)
    full, _ = _train(tmp_path, tiny_dirs["bert"], "rc3la", name="full", **settings)

    class Crash(Exception):
        pass

    def crash(step):
        if step == 5:
            raise Crash
    with pytest.raises(Crash):
        _train(tmp_path, tiny_dirs["bert"], "rc3la", name="resumed", on_step=crash, **settings)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "state.pt").exists()
    resumed, _ = _train(tmp_path, tiny_dirs["bert"], "rc3la", name="resumed", resume=True, **settings)
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.partial").exists()


def test_same_seed_same_checkpoint_on_cpu(tmp_path, tiny_dirs):
    a, _ = _train(tmp_path, tiny_dirs["bert"], "rcla", name="a")
    b, _ = _train(tmp_path, tiny_dirs["bert"], "rcla", name="b")
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


DDP_CHECK = """
import json, sys, torch, torch.distributed as dist, adapters
from tests.conftest import tiny
dist.init_process_group("gloo")
model = tiny("bert")
torch.manual_seed(100 + dist.get_rank())  # the global RNG differs per rank: selectors must not use it
sel = adapters.selectors(adapters.apply(model, "rcla", rank=4, alpha=8, seed=7))
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(sel, f)
"""


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", _free_port()] + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_cpu_processes_agree_with_one(tmp_path, tiny_dirs):
    root = Path(__file__).parents[1]
    # Dropout masks depend on how the batch is split over processes: compare without dropout.
    nodrop = tmp_path / "nodrop"
    shutil.copytree(tiny_dirs["bert"], nodrop)
    config = json.loads((nodrop / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (nodrop / "config.json").write_text(json.dumps(config))
    (tmp_path / "check.py").write_text(DDP_CHECK)
    check = _torchrun([str(tmp_path / "check.py"), str(tmp_path)], root)
    assert check.returncode == 0, check.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 4  # every rank drew the same selectors
    args = ["-m", "adapters.train", "--model", str(nodrop), "--method", "rcla", "--rank", "4", "--alpha",
            "8", "--max-steps", "6", "--n-train", "48", "--n-test", "24", "--batch-size", "8", "--max-length", "32"]
    ddp = _torchrun(args + ["--out", str(tmp_path / "ddp")], root)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, _ = _train(tmp_path, str(nodrop), "rcla", name="one")
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert adapters.read_meta(one)["selectors"] == adapters.read_meta(tmp_path / "ddp")["selectors"]
    assert adapters.read_stats(tmp_path / "ddp")["world_size"] == 2


def test_minilm_movie_reviews_end_to_end(tmp_path):
    """Real model, real data: the recorded test loss is what a fresh evaluation of the checkpoint gives."""
    out = tmp_path / "minilm-cla"
    stats = train(method="cla", out=out, max_steps=4, n_train=64, n_test=64, batch_size=16, max_length=48,
                  progress=False)
    assert stats["n_train"] == 64 and stats["n_test"] == 64
    model = adapters.load(out)
    for split in ("train", "test"):
        fresh = evaluate.evaluate(model, evaluate.checkpoint_batches(out, split))
        assert fresh["loss"] == pytest.approx(stats[f"{split}_loss"], rel=1e-6)
        assert fresh["accuracy"] == pytest.approx(stats[f"{split}_metric"])
    assert stats["generalization_gap"] == pytest.approx(stats["test_loss"] - stats["train_loss"])
    meta = adapters.read_meta(out)
    assert meta["base_model"] == "minilm" and len(meta["targets"]) == 12
    assert meta["parameters"]["adapter"] == 12 * 16 * 384
    for key in ("train_loss_max", "test_loss_quantiles", "history", "wall_time_s", "median_step_time_s",
                "peak_memory_bytes", "throughput_examples_per_s", "versions"):
        assert stats[key] is not None, key


def test_load_refuses_a_base_whose_hash_does_not_match(tmp_path, tiny_dirs):
    path, _ = _train(tmp_path, tiny_dirs["bert"], "cla")
    meta = json.loads((path / "adapters_meta.json").read_text())
    meta["base_model_hash"] = "0" * 64
    (path / "adapters_meta.json").write_text(json.dumps(meta))
    with pytest.raises(adapters.CheckpointError, match="does not match the checkpoint's recorded weights hash"):
        adapters.load(path)


def test_fft_and_head_checkpoints_round_trip(tmp_path, tiny_dirs):
    for method in ("fft", "head"):
        path, stats = _train(tmp_path, tiny_dirs["bert"], method, lr=1e-3)
        model = adapters.load(path)
        fresh = evaluate.evaluate(model, evaluate.checkpoint_batches(path, "test"))
        assert fresh["loss"] == pytest.approx(stats["test_loss"], rel=1e-6)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == adapters.read_meta(path)["parameters"]["total"]
    deltas = adapters.matrices(tmp_path / "fft")
    assert len(deltas) == 13 and all(d.abs().sum() > 0 for _, _, d in deltas)


# -- bad input: one line, exit 2, nothing written --------------------------------------------------

def _cli(tmp_path, capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.mark.parametrize("args,message", [
    (["--method", "lorax"], "unknown method 'lorax'"),
    (["--model", "./no/such/model"], "model not found"),
    (["--data", "DATA_NO_LABEL"], "label"),
    (["--data", "DATA_EMPTY"], "empty"),
    (["--data", "DATA_MISSING"], "data file not found"),
])
def test_bad_training_input(tmp_path, capsys, tiny_dirs, args, message):
    (tmp_path / "nolabel.csv").write_text("text,sentiment\ngood,1\nbad,0\n" * 5)
    (tmp_path / "empty.csv").write_text("text,label\n")
    files = {"DATA_NO_LABEL": "nolabel.csv", "DATA_EMPTY": "empty.csv", "DATA_MISSING": "missing.csv"}
    args = [str(tmp_path / files[a]) if a in files else a for a in args]
    out = tmp_path / "out"
    code, err = _cli(tmp_path, capsys, "--model", tiny_dirs["bert"], *args, "--max-steps", "1", "--out", str(out))
    assert code == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_directory_is_refused(tmp_path, capsys, tiny_dirs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli(tmp_path, capsys, "--model", tiny_dirs["bert"], "--max-steps", "1", "--out", str(out))
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_corrupt_checkpoint_is_refused(tmp_path, tiny_dirs):
    path, _ = _train(tmp_path, tiny_dirs["bert"], "cla")
    (path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(adapters.CheckpointError, match="corrupt weights file"):
        adapters.load(path)
    (path / "adapters_meta.json").write_text("{")
    with pytest.raises(adapters.CheckpointError, match="corrupt checkpoint metadata"):
        adapters.load(path)
    with pytest.raises(adapters.CheckpointError, match="not a checkpoint"):
        adapters.load(tmp_path)


def test_plain_peft_lora_directory_loads_with_peft_logits(tmp_path, tiny_dirs):
    """A LoRA trained elsewhere (stock PEFT, SEQ_CLS task type) loads as our model with PEFT's outputs."""
    import peft
    base = models.load_model(tiny_dirs["bert"], 2, seed=0)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    peft_model = peft.get_peft_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    batch = {"input_ids": torch.randint(1, 1000, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        ours = adapters.load(tmp_path / "peft")
        torch.testing.assert_close(ours(**batch).logits, peft_model.eval()(**batch).logits, rtol=1e-5, atol=1e-6)
    assert adapters.read_meta(tmp_path / "peft")["method"] == "lora"
    assert {n for n, p in ours.named_parameters() if p.requires_grad} >= {"classifier.weight", "classifier.bias"}
