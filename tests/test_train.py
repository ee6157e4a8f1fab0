"""adapters.train and checkpoints: PEFT compatibility, resume, DDP, real MiniLM end to end, bad input."""
import json
import math
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
from adapters.train import main, train

LORA_FAMILY = [n for n, m in adapters.METHODS.items() if m.adapter is not None]
TINY = dict(rank=4, alpha=8, max_steps=6, n_train=48, n_val=16, n_test=24, batch_size=8, max_length=32, progress=False)


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


TIMING = {"wall_time_s", "median_step_time_s", "throughput_examples_per_s", "peak_memory_bytes"}


def _assert_same_run(a, b):
    """Two checkpoint directories hold the same run: every file byte for byte (weights, configs, metadata,
    trajectory), training_stats.json up to its timing and memory fields."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        if f.name == "training_stats.json":
            sa, sb = (json.loads((d / f).read_text()) for d in (a, b))
            assert {k: v for k, v in sa.items() if k not in TIMING} == {k: v for k, v in sb.items() if k not in TIMING}
        else:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


class Crash(Exception):
    pass


def _crash_at(step):
    def on_step(s):
        if s == step:
            raise Crash
    return on_step


def _crash_and_resume(tmp_path, model, method, crashes, **settings):
    """Run to the end through a crash after each step in `crashes` (resuming each time); return the out dir."""
    for step in crashes:
        with pytest.raises(Crash):
            _train(tmp_path, model, method, name="resumed", resume=True, on_step=_crash_at(step), **settings)
        assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "state.pt").exists()
    resumed, _ = _train(tmp_path, model, method, name="resumed", resume=True, **settings)
    assert not (tmp_path / "resumed.partial").exists()
    return resumed


def test_resume_writes_exactly_what_an_uninterrupted_run_writes(tmp_path, tiny_dirs):
    # The crash falls inside an eval window (eval_every=3) and between two saved states (save_every=2).
    settings = dict(max_steps=10, chain_length=2, save_every=2, eval_every=3, save_trajectory=5)
    full, _ = _train(tmp_path, tiny_dirs["bert"], "rc3la", name="full", **settings)
    _assert_same_run(full, _crash_and_resume(tmp_path, tiny_dirs["bert"], "rc3la", [5], **settings))


def test_resume_across_chain_links_is_bit_identical(tmp_path, tiny_dirs):
    # Links end after steps 4 and 8: crash right after the first boundary (state saved at 4), then mid-link 2.
    settings = dict(max_steps=12, chain_length=3, save_every=2, eval_every=3, save_trajectory=3, dropout=0.1)
    full, _ = _train(tmp_path, tiny_dirs["bert"], "c3la", name="full", **settings)
    assert adapters.read_meta(full)["link_boundaries"] == [4, 8]
    _assert_same_run(full, _crash_and_resume(tmp_path, tiny_dirs["bert"], "c3la", [4, 7], **settings))


def test_resume_with_other_settings_is_refused_and_keeps_the_state(tmp_path, capsys, tiny_dirs):
    settings = dict(max_steps=6, save_every=2)
    with pytest.raises(Crash):
        _train(tmp_path, tiny_dirs["bert"], "cla", name="run", on_step=_crash_at(3), **settings)
    out = tmp_path / "run"
    args = ["--model", tiny_dirs["bert"], "--method", "cla", "--rank", "4", "--alpha", "8", "--max-steps", "6",
            "--n-train", "48", "--n-val", "16", "--n-test", "24", "--batch-size", "8", "--max-length", "32",
            "--out", str(out), "--resume"]
    code, err = _cli(tmp_path, capsys, *args, "--lr", "0.01")
    assert code == 2 and err.startswith("error: ") and "other settings (lr)" in err and len(err.splitlines()) == 1
    assert (tmp_path / "run.partial" / "state.pt").exists() and not out.exists()
    (tmp_path / "run.partial" / "state.pt").write_text("not a state")
    code, err = _cli(tmp_path, capsys, *args)
    assert code == 2 and "corrupt resumable state" in err and len(err.splitlines()) == 1


def _fresh_losses(path):
    model = adapters.load(path)
    return {split: evaluate.evaluate(model, evaluate.checkpoint_batches(path, split))["loss"]
            for split in ("train", "test")}


@pytest.mark.parametrize("method", ["cla", "lora"])
def test_bf16_mixed_precision_trains_and_records_an_fp32_final_evaluation(tmp_path, tiny_dirs, method):
    path, stats = _train(tmp_path, tiny_dirs["bert"], method, mixed_precision="bf16", lr=1e-2)
    assert stats["mixed_precision"] == "bf16" and stats["eval_precision"] == "fp32"
    assert all(math.isfinite(h["train_loss_running"]) for h in stats["history"])
    tensors = load_file(str(path / "adapter_model.safetensors"))
    B = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert B.abs().sum() > 0  # B starts at 0: the weights changed
    # The recorded losses are those of the final weights in fp32 eval mode: a fresh evaluation of the checkpoint.
    fresh = _fresh_losses(path)
    assert fresh["train"] == pytest.approx(stats["train_loss"], rel=1e-6)
    assert fresh["test"] == pytest.approx(stats["test_loss"], rel=1e-6)
    meta = adapters.read_meta(path)
    assert meta["training"]["mixed_precision"] == "bf16" and meta["training"]["eval_precision"] == "fp32"


def test_mixed_precision_default_is_accelerates_and_each_run_gets_its_own(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    _, stats = _train(tmp_path, tiny_dirs["bert"], "lora", name="env", max_steps=1)
    assert stats["mixed_precision"] == "bf16"
    # accelerate keeps one precision per process: the next run must still get the one it asks for.
    _, stats = _train(tmp_path, tiny_dirs["bert"], "lora", name="no", max_steps=1, mixed_precision="no")
    assert stats["mixed_precision"] == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    _, stats = _train(tmp_path, tiny_dirs["bert"], "lora", name="default", max_steps=1)
    assert stats["mixed_precision"] == "no"


def test_lora_dropout_is_applied_recorded_and_off_in_the_final_evaluation(tmp_path, tiny_dirs):
    plain, _ = _train(tmp_path, tiny_dirs["bert"], "lora", name="plain", lr=1e-2)
    path, stats = _train(tmp_path, tiny_dirs["bert"], "lora", name="dropout", dropout=0.3, lr=1e-2)
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (plain, path))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the same seed, other masks: dropout acted
    meta = adapters.read_meta(path)
    assert meta["dropout"] == 0.3 and meta["training"]["dropout"] == 0.3 and stats["dropout"] == 0.3
    assert json.loads((path / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    assert adapters.load(path).adapter_settings["dropout"] == 0.3
    assert _fresh_losses(path)["test"] == pytest.approx(stats["test_loss"], rel=1e-6)
    batch = {k: v for k, v in evaluate.checkpoint_batches(path, "test", batch_size=24)[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(adapters.load(path)(**batch).logits, _peft_logits(path, batch), rtol=1e-5, atol=1e-6)


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
dist.barrier()
dist.destroy_process_group()  # leave together (see tests/test_accumulation.py's DDP_STEP)
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
            "8", "--max-steps", "6", "--n-train", "48", "--n-val", "16", "--n-test", "24", "--batch-size", "8",
            "--max-length", "32"]
    ddp = _torchrun(args + ["--out", str(tmp_path / "ddp")], root)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, _ = _train(tmp_path, str(nodrop), "rcla", name="one")
    a = load_file(str(one / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    for k in a:
        # Each process pads its half batch to its own longest row: float noise in the gradients, which Adam's
        # normalised step can turn into ~1e-6 of a near-zero entry. B entries are ~1e-2: 1e-5 is 0.1 % of them.
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert adapters.read_meta(one)["selectors"] == adapters.read_meta(tmp_path / "ddp")["selectors"]
    assert adapters.read_stats(tmp_path / "ddp")["world_size"] == 2


def test_minilm_movie_reviews_end_to_end(tmp_path):
    """Real model, real data: the recorded test loss is what a fresh evaluation of the checkpoint gives."""
    out = tmp_path / "minilm-cla"
    stats = train(method="cla", out=out, max_steps=4, n_train=64, n_val=32, n_test=64, batch_size=16, max_length=48,
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
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


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


@pytest.mark.parametrize("args,message", [
    (["--n-train", "0"], "n_train must be >= 1, got 0"),
    (["--n-test", "0"], "n_test must be >= 1, got 0"),
    (["--lr", "-1"], "lr must be > 0, got -1.0"),
    (["--lr", "nan"], "lr must be > 0, got nan"),
    (["--lr-ratio", "0"], "lr_ratio must be > 0"),
    (["--alpha", "0"], "alpha must be > 0"),
    (["--epochs", "0"], "epochs must be > 0, got 0.0"),
    (["--max-steps", "0"], "max_steps must be >= 1, got 0"),
    (["--save-trajectory", "-1"], "save_trajectory must be >= 0, got -1"),
    (["--warmup", "1"], "warmup must be in [0, 1), got 1.0"),
    (["--grad-clip", "-0.5"], "grad_clip must be >= 0"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--eval-every", "0"], "eval_every must be >= 1"),
    (["--save-every", "0"], "save_every must be >= 1"),
    (["--dropout", "1"], "dropout must be in [0, 1)"),
    (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--keep", "last"], "invalid choice: 'last'"),
    (["--method", "fft", "--targets", "query"], "'fft' has no adapter layers"),
    (["--method", "head", "--targets", "query"], "'head' has no adapter layers"),
    (["--method", "cla", "--targets", "nothing_like_this"], "matches no linear layer"),
    (["--out", "FILE"], "exists and is not a directory"),
    (["--out", "FILE/sub"], "is a file"),
])
def test_bad_argument_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, tiny_dirs, args, message):
    (tmp_path / "file").write_text("mine")
    args = [str(tmp_path / "file") + a[4:] if a.startswith("FILE") else a for a in args]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else tmp_path / "out"
    # A resumable state from an earlier run must survive a bad argument.
    partial = out.with_name(out.name + ".partial")
    if partial.parent.is_dir():
        partial.mkdir()
        (partial / "state.pt").write_text("earlier run")
    code, err = _cli(tmp_path, capsys, "--model", tiny_dirs["bert"], "--max-steps", "1", "--n-train", "16",
                     "--n-test", "8", "--batch-size", "8", "--rank", "2", "--alpha", "4", "--out", str(out), *args)
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err
    assert (tmp_path / "file").read_text() == "mine"
    assert not partial.parent.is_dir() or (partial / "state.pt").read_text() == "earlier run"
    assert not (out.exists() and out.is_dir()) and not list(tmp_path.glob(".out*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast exists on GPUs")
def test_fp16_without_a_gpu_is_refused_not_run_in_fp32(tmp_path, capsys, tiny_dirs):
    code, err = _cli(tmp_path, capsys, "--model", tiny_dirs["bert"], "--max-steps", "1", "--mixed-precision", "fp16",
                     "--out", str(tmp_path / "out"))
    assert code == 2 and "mixed precision fp16 is not available on cpu" in err


def test_integer_labels_1_and_2_train_a_two_way_head(tmp_path, capsys, tiny_dirs):
    data_file = tmp_path / "d.csv"
    data_file.write_text("text,label\n" + "".join(f"good film {i},2\nbad film {i},1\n" for i in range(10)))
    out = tmp_path / "out"
    assert main(["--model", tiny_dirs["bert"], "--data", str(data_file), "--max-steps", "1", "--batch-size", "8",
                 "--rank", "2", "--alpha", "4", "--out", str(out)]) == 0
    meta = adapters.read_meta(out)
    assert meta["num_labels"] == 2 and meta["task"]["labels"] == ["1", "2"]


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


# -- what a new user hits (issue 21): chain length, --help, mid-run labels, unreadable data -----------------------
CHAINED = [n for n, m in adapters.METHODS.items() if m.adapter is not None and m.adapter.chained]
SMALL_FLAGS = ["--max-steps", "3", "--n-train", "24", "--n-val", "8", "--n-test", "8", "--batch-size", "8",
               "--rank", "2", "--alpha", "4", "--max-length", "24"]


@pytest.mark.parametrize("name", list(adapters.METHODS))
def test_every_method_resolves_its_own_chain_length(name):
    from adapters.methods import CHAIN_LENGTH, METHODS, one_link_note, resolve_chain_length
    spec = METHODS[name].adapter
    chained = spec is not None and spec.chained
    assert resolve_chain_length(name) == (CHAIN_LENGTH if chained else 1) and CHAIN_LENGTH > 1
    assert resolve_chain_length(name, 2) == 2  # asked for: as asked
    assert (one_link_note(name, 1) is not None) == chained and one_link_note(name, 2) is None
    if chained:  # its twin is the same adapter without the chain
        twin = METHODS[spec.twin].adapter
        assert twin is not None and not twin.chained and spec.twin in one_link_note(name, 1)
        assert (twin.selector, twin.train_a, twin.b_init, twin.lr_ratio) == (
            spec.selector, spec.train_a, spec.b_init, spec.lr_ratio)
        # one link is exactly its twin (the same A, layer by layer) where the registry says so, and only there
        same = all(torch.equal(spec.make_a(m, r, 0, seed), twin.make_a(m, r, 0, seed))
                   for m, r, seed in ((32, 4, 1), (30, 8, 7), (64, 16, 123)))
        assert same == spec.one_link_is_twin, name


@pytest.mark.parametrize("method", CHAINED)
def test_a_chained_method_without_chain_length_trains_its_default_links_and_records_them(tmp_path, capsys, tiny_dirs,
                                                                                         method):
    out = tmp_path / "out"
    assert main(["--model", tiny_dirs["bert"], "--method", method, *SMALL_FLAGS, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    k = adapters.METHODS[method].chain_length
    assert k == 3 and json.loads(captured.out)["chain_length"] == k and "note" not in captured.err
    assert f"{method} r=2 k=3" in captured.err  # the progress bar names the chain
    meta = adapters.read_meta(out)
    assert meta["chain_length"] == k and meta["link_boundaries"] == [1, 2]
    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["chain_length"] == k


def test_one_link_of_a_chained_method_is_allowed_when_asked_for_and_said(tmp_path, capsys, tiny_dirs):
    out = tmp_path / "out"
    assert main(["--model", tiny_dirs["bert"], "--method", "c3la", "--chain-length", "1", *SMALL_FLAGS,
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    note = "c3la with chain_length=1 trains a single link, as its non-chained twin cla does"
    assert f"note: {note}" in captured.err and note in json.loads(captured.out)["note"]
    assert adapters.read_meta(out)["chain_length"] == 1 and adapters.read_meta(out)["link_boundaries"] == []


def test_help_lists_every_method_and_every_default_as_train_applies_it(capsys):
    from adapters.train import TrainConfig, parser
    parser = parser()
    defaults = vars(TrainConfig())
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    actions = [a for a in parser._actions if a.dest not in ("help", "config")]
    assert [a.dest for a in actions] == list(defaults)  # every setting is a flag, and nothing else is
    for action in actions:
        assert action.default == defaults[action.dest], action.dest  # the parser's default is the setting's
        if action.nargs == 0:  # a flag: off by default
            continue
        shown = parser._get_formatter()._expand_help(action)  # the help as printed, before line wrapping
        if action.default is None:  # computed by the code: the help says how
            assert "default" in shown, f"{action.dest}: no default in its help"
        else:
            assert shown.endswith(f"(default: {action.default})"), action.dest
    for name, m in adapters.METHODS.items():
        line = f"{name} {m.description}"
        assert line + (f" (k = {m.chain_length} links by default)" if m.chain_length > 1 else "") in text, name
    assert "(default: the method's, 3 for cola, rac, c3la, rc3la; 1 for the others)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: --device cuda would train")
def test_device_cpu_trains_on_the_cpu_and_cuda_without_a_gpu_is_refused_in_one_line(tmp_path, capsys, tiny_dirs):
    _, stats = _train(tmp_path, tiny_dirs["bert"], "cla", max_steps=1, device="cpu")
    assert stats["device"] == "cpu"
    code, err = _cli(tmp_path, capsys, "--model", tiny_dirs["bert"], "--device", "cuda", "--out", str(tmp_path / "g"))
    assert code == 2 and err == "error: device cuda asked for, but no GPU is available here"
    assert not (tmp_path / "g").exists()


def test_the_progress_bar_says_what_its_mid_run_numbers_are(tmp_path, capsys, tiny_dirs):
    _, stats = _train(tmp_path, tiny_dirs["bert"], "cla", max_steps=2, eval_every=1, eval_examples=10,
                      mixed_precision="bf16", progress=True)
    err = capsys.readouterr().err
    assert "val accuracy (bf16, 10 of 16 examples)=" in err and "train loss (running)=" in err
    assert "val_accuracy=" not in err  # the unlabelled name is gone
    assert stats["mid_run_eval"] == dict(split="val", examples=10, of=16, precision="bf16")
    _, stats = _train(tmp_path, tiny_dirs["bert"], "cla", name="fp32", max_steps=1)
    assert stats["mid_run_eval"]["precision"] == "fp32" and stats["mid_run_eval"]["examples"] == 16


def test_a_corrupt_image_is_refused_when_the_folder_is_read(tmp_path, capsys, tiny_dirs):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        folder = tmp_path / "images" / cls
        folder.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    bad = tmp_path / "images" / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated inside its image data
    out = tmp_path / "out"
    code, err = _cli(tmp_path, capsys, "--model", tiny_dirs["bert"], "--data", str(tmp_path / "images"),
                     "--max-steps", "1", "--out", str(out))
    assert code == 2 and err == f"error: {bad}: not a readable image (image file is truncated)"
    assert not out.exists() and not list(tmp_path.glob(".out*"))
