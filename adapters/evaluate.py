"""Evaluation of final weights (THEORY.md section 3): eval mode, full splits, the task's own loss.

    python -m adapters.evaluate CKPT [--task T | --data FILE] [--n-train N ...] [--splits train val test]
    python -m adapters.evaluate MODEL [--task T | --data FILE]        # the untrained model: the reference

Every task type scores a batch per example as (summed loss, units, correct): the split's loss is Σ loss / Σ units
(mean per-example cross-entropy for classifiers, per-token NLL of the completions for a causal LM), and each
example's own loss is its summed loss / its units (what the bounds clip and take maxima of). The command prints
loss and metric (accuracy, or perplexity for a causal LM) per split and writes them to CKPT/evaluation.json (for
a model, ./evaluation.json; --out elsewhere).
"""
import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import data, models, tasks
from .checkpoint import read_meta
from .errors import AdapterError, ArgumentParser, cli
from .io import write_json


def batches(processor, examples, max_length, batch_size, task_type=tasks.CLASSIFICATION):
    """Dict batches over examples, in order, padded per batch."""
    collate = task_type.collate(processor, max_length)
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


def logits_of(output):
    """Logits of a transformers ModelOutput, a (logits, ...) tuple, or a plain tensor."""
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


def batch_scores(model, batch, score=tasks.class_scores):
    """Per example (summed loss, units, correct) of one dict batch; labels stay out of the model's own forward
    (it would compute a loss of its own that nobody reads)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return score(logits_of(model(**inputs)), batch["labels"].to(device))


def summary(sums, units, correct):
    """{"loss": Σ loss / Σ units, "accuracy": Σ correct / Σ units, "losses": per-example loss, "units"} from
    per-example lists."""
    total = sum(units)
    return {"loss": sum(sums) / total, "accuracy": sum(correct) / total,
            "losses": [s / u for s, u in zip(sums, units)], "units": list(units)}


@contextmanager
def eval_mode(model):
    """Eval mode (dropout off) inside, the model's own mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@torch.no_grad()
def example_scores(model, batches, score=tasks.class_scores, progress=None):
    """Per example, in batch order, (summed loss, units, correct) lists over `batches`, in eval mode; `progress`: a
    tqdm bar's description (None: no bar)."""
    sums, units, correct = [], [], []
    with eval_mode(model):
        for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            for out, values in zip((sums, units, correct), batch_scores(model, batch, score)):
                out += values.double().tolist()
    return sums, units, correct


def row_scores(model, processor, rows, max_length, batch_size, kind, progress=None):
    """Per example, in row order, (summed loss, units, correct) of `rows`, batched in order of length (little
    padding: an example's loss does not depend on its batch-mates) and put back in row order."""
    order = sorted(range(len(rows)), key=kind.lengths(processor, rows, max_length).__getitem__)
    sorted_batches = batches(processor, [rows[i] for i in order], max_length, batch_size, kind)
    scores = [None] * len(rows)
    for i, score in zip(order, zip(*example_scores(model, sorted_batches, kind.score, progress))):
        scores[i] = score
    return scores


def evaluate(model, batches, score=tasks.class_scores, progress=None):
    """summary() of `batches` in eval mode (`progress`: as example_scores')."""
    return summary(*example_scores(model, batches, score, progress))


def examples_arg(text):
    """argparse type for --examples: a positive count, or "all" (None)."""
    import argparse
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


# ---- which data: the checkpoint's recorded task, or the user's (--task / --data) ----------------------------

MAX_LENGTH = 64  # tokens per example: adapters.train's default, and where a checkpoint records none
# The flags (and train()'s argument names) that say which examples a command reads and how they are cut.
TASK_OPTIONS = ("task", "data_file", "n_train", "n_val", "n_test", "val_fraction", "max_length")


def add_task_arguments(parser, defaults=None):
    """--task, --data, --n-train, --n-val, --n-test, --val-fraction, --max-length: one definition for every command
    that reads a task (dests: adapters.train's argument names). `defaults`: {task, val_fraction, max_length} for a
    command that trains (its formatter shows them); None for one on a checkpoint, where each flag left out keeps
    what the checkpoint records (a plain PEFT directory records no task: --task or --data names one, and --data's
    rows are then split as adapters.train splits them)."""
    d = defaults or {}
    of = "" if defaults else " (default: the checkpoint's)"
    g = parser.add_argument_group("data" if defaults else "data (default: the checkpoint's own task)")
    g.add_argument("--task", default=d.get("task"), help="built-in task: movie-reviews (classification), movie-dialog "
                   "(causal LM), fashion-mnist (images)" + of)
    g.add_argument("--data", dest="data_file", help="your data: CSV/TSV/JSONL with text,label or prompt,completion "
                   "columns (optional split), or an ImageFolder directory"
                   + (" (default: none, the built-in --task)" if defaults else ""))
    for split, what in (("train", "training"), ("val", "validation"), ("test", "test")):
        g.add_argument(f"--n-{split}", type=int, help=f"use the first N {what} examples of the fixed split"
                       + (" (default: all)" if defaults else of))
    g.add_argument("--val-fraction", type=float, default=d.get("val_fraction"),
                   help="share of the training split held out for validation when the data has none (0: none)"
                        + ("" if defaults else f"{of[:-1]}, else {data.VAL_FRACTION})"))
    g.add_argument("--max-length", type=int, default=d.get("max_length"), help="tokens per example, after truncation"
                   + ("" if defaults else f"{of[:-1]}, else {MAX_LENGTH})"))
    return g


def task_options(args):
    """The TASK_OPTIONS of parsed arguments, as keywords for task_spec / checkpoint_batches."""
    return {k: getattr(args, k) for k in TASK_OPTIONS}


def task_spec(path, **options):
    """What a command evaluates checkpoint `path` on, as adapters_meta.json's "task" records it (name, data,
    n_train, n_val, n_test, val_fraction, max_length): its recorded task, or the one `options` (TASK_OPTIONS) name
    with --task / --data, each size given replacing the recorded one."""
    return _spec(read_meta(path).get("task") or {}, f"checkpoint {path}", **options)


def _spec(recorded, what, task=None, data_file=None, n_train=None, n_val=None, n_test=None, val_fraction=None,
          max_length=None):
    sizes = {k: v for k, v in dict(n_train=n_train, n_val=n_val, n_test=n_test, val_fraction=val_fraction,
                                   max_length=max_length).items() if v is not None}
    for k, least in (("n_train", 1), ("n_val", 0), ("n_test", 1), ("max_length", 1)):
        if k in sizes and (isinstance(sizes[k], bool) or not isinstance(sizes[k], int) or sizes[k] < least):
            raise AdapterError(f"--{k.replace('_', '-')} must be an integer ≥ {least}, got {sizes[k]!r}")
    if task is not None or data_file is not None:
        if data_file is not None and not Path(data_file).exists():
            raise AdapterError(f"data file not found: {data_file}")
        spec = dict(name=task or data.MOVIE_REVIEWS, data=str(Path(data_file).resolve()) if data_file else None,
                    n_train=None, n_val=None, n_test=None, val_fraction=data.VAL_FRACTION,
                    max_length=recorded.get("max_length", MAX_LENGTH))
    elif recorded:
        spec = dict(recorded)
    else:
        raise AdapterError(f"{what} records no task (a plain PEFT directory): give --task NAME or --data FILE, the "
                           "data to evaluate it on")
    return {**spec, **sizes}


def load_spec(spec):
    """The Task of a task_spec, loaded exactly (same data, same split sizes and fraction)."""
    kwargs = {k: spec[k] for k in ("n_train", "n_val", "n_test", "val_fraction") if spec.get(k) is not None}
    return data.load_task(spec["name"], spec.get("data"), **kwargs)


def checkpoint_data(path, **options):
    """(task_spec with the loaded task's type and sha256, the Task) a checkpoint is evaluated on, refused when its
    examples are not what the model takes (another task type, another number of classes than its head)."""
    meta, spec = read_meta(path), task_spec(path, **options)
    the_task, kind = load_spec(spec), tasks.of_meta(meta)
    if the_task.type != kind.name:
        raise AdapterError(f"{the_task.source} is a {the_task.type} task; checkpoint {path} is a {kind.name} model")
    if kind.new_head and meta.get("num_labels") and len(the_task.labels) != meta["num_labels"]:
        raise AdapterError(f"{the_task.source} has {len(the_task.labels)} classes; the head of checkpoint {path} has "
                           f"{meta['num_labels']}")
    return dict(spec, name=the_task.name, type=the_task.type, sha256=the_task.sha256), the_task


def checkpoint_task(path, **options):
    """The Task of checkpoint_data."""
    return checkpoint_data(path, **options)[1]


def checkpoint_score(path):
    """The score function of the checkpoint's task type (what its loss is)."""
    return tasks.of_meta(read_meta(path)).score


def subset(rows, examples=None, seed=0):
    """The first `examples` rows of a seeded permutation (all rows, in order, when `examples` is None)."""
    if examples is None or examples >= len(rows):
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:examples]
    return [rows[i] for i in order.tolist()]


def checkpoint_batches(path, split="train", examples=None, batch_size=32, seed=0, **options):
    """Batches of the checkpoint's task (its own, or the one `options` name: TASK_OPTIONS) and its base model's
    preprocessing: subset() of the split."""
    meta, (spec, the_task) = read_meta(path), checkpoint_data(path, **options)
    processor = models.load_processor(meta["base_model"])
    return batches(processor, subset(getattr(the_task, split), examples, seed), spec["max_length"], batch_size,
                   tasks.of_meta(meta))


# ---- per-example losses recorded with the weights (so that bounds need not run the model again) -------------

EXAMPLE_LOSSES = "example_losses.safetensors"
# What recorded losses must share with a later evaluation to stand for it: the data's content and how it is split
# and cut. The weights are compared by weights_digest.
SAME_SPLIT = ("type", "sha256", "n_train", "n_val", "n_test", "val_fraction", "max_length")


def weights_digest(directory):
    """sha256 over the files of a checkpoint that fix its fine-tuned function on a verified base: the weights
    (adapter_model.safetensors or trained.safetensors) and the adapter's scaling (adapter_config.json)."""
    from .checkpoint import PEFT_CONFIG, PEFT_WEIGHTS, TRAINED
    h = hashlib.sha256()
    for name in (PEFT_CONFIG, PEFT_WEIGHTS, TRAINED):
        file = Path(directory) / name
        if file.is_file():
            h.update(name.encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _split_key(spec):
    return json.dumps({k: spec.get(k) for k in SAME_SPLIT}, sort_keys=True)


def write_example_losses(file, results, spec):
    """Record the per-example losses and units of summary() `results` ({split: result}) of the final weights on
    task `spec` (with its type and sha256) at `file`, inside the checkpoint directory being written. Its weights
    must already be there (checkpoint.save writes its `files` after them): their digest is recorded too."""
    tensors = {f"{split}.{key}": torch.tensor(r[key], dtype=torch.float64)
               for split, r in results.items() if r for key in ("losses", "units")}
    # One metadata entry: safetensors writes several in no fixed order, and a resumed run must write the same bytes.
    save_file(tensors, str(file), metadata={"record": json.dumps(
        {"split": _split_key(spec), "weights_sha256": weights_digest(Path(file).parent)}, sort_keys=True)})


def recorded_losses(path, spec, splits=("train", "test")):
    """({split: (losses, units)} recorded by training for exactly these weights and this split of the data, or
    None; why not, in words). `spec`: the task_spec evaluated, with the loaded task's type and sha256."""
    file = Path(path) / EXAMPLE_LOSSES
    if not file.is_file():
        return None, f"no {EXAMPLE_LOSSES}"
    try:
        with safe_open(str(file), framework="pt") as f:
            saved, stored = json.loads((f.metadata() or {})["record"]), {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable {EXAMPLE_LOSSES} ({type(e).__name__}: {e})"
    saved = saved if isinstance(saved, dict) else {}
    if saved.get("split") != _split_key(spec):
        return None, f"{EXAMPLE_LOSSES} is of another split or data"
    if saved.get("weights_sha256") != weights_digest(path):
        return None, f"{EXAMPLE_LOSSES} is of other weights"
    if not all(f"{s}.{k}" in stored for s in splits for k in ("losses", "units")):
        return None, f"{EXAMPLE_LOSSES} lacks a split"
    return {s: (stored[f"{s}.losses"].tolist(), stored[f"{s}.units"].tolist()) for s in splits}, \
        f"recorded by training in {EXAMPLE_LOSSES}, for these weights and this split"


# ---- the command: loss and metric per split of a checkpoint or of an untrained model -------------------------

SPLITS = ("train", "val", "test")


def _is_checkpoint(path):
    from .checkpoint import META, PEFT_CONFIG
    return Path(path).is_dir() and any((Path(path) / f).exists() for f in (META, PEFT_CONFIG))


def _untrained(name, options, seed):
    """(model, spec, task) of a transformers model before any fine-tuning, on the task `options` name (default
    adapters.train's): a classifier gets the head adapters.train would draw with `seed`."""
    spec = _spec({}, name, **{"task": data.MOVIE_REVIEWS, **{k: v for k, v in options.items() if v is not None}})
    the_task = load_spec(spec)
    kind = tasks.get_task_type(the_task.type)
    tasks.check_model(kind, name, models.model_family(name))
    model = models.load_model(name, num_labels=len(the_task.labels or ()), seed=seed, auto_class=kind.auto_class)
    return model, dict(spec, name=the_task.name, type=the_task.type, sha256=the_task.sha256), the_task


def run(target, *, splits=SPLITS, examples=None, batch_size=32, seed=0, device=None, out=None, progress=True,
        **options):
    """Loss and metric per split of checkpoint `target` (its recorded task, or the one `options` name) or of the
    untrained model `target` (a model name or transformers directory); written to `out` (default
    CKPT/evaluation.json, else ./evaluation.json) and returned.

    Each split: its first `examples` examples of a seeded permutation (all by default), in eval mode, fp32.
    """
    unknown = set(options) - set(TASK_OPTIONS)
    if unknown:
        raise AdapterError(f"unknown evaluation option(s): {', '.join(sorted(unknown))}")
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise AdapterError(f"splits must be among {', '.join(SPLITS)}, got {', '.join(map(str, splits)) or 'none'}")
    if (examples is not None and examples < 1) or batch_size < 1:
        raise AdapterError(f"examples and batch size must be ≥ 1, got {examples}, {batch_size}")
    target = str(target)
    if _is_checkpoint(target):
        from .checkpoint import load
        spec, the_task = checkpoint_data(target, **options)
        model, base = load(target), read_meta(target)["base_model"]
    else:
        model, spec, the_task = _untrained(target, options, seed)
        base = target
    kind = tasks.get_task_type(spec["type"])
    processor = models.load_processor(base)
    model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    result = dict(target=target, checkpoint=_is_checkpoint(target), base_model=base, seed=seed,
                  task=spec, metric=kind.metric,
                  metric_higher_is_better=kind.higher_is_better, loss_unit=kind.loss_unit, splits={})
    for split in splits:
        rows = subset(getattr(the_task, split), examples, seed)
        if not rows:
            continue  # no validation split in this data
        ev = summary(*zip(*row_scores(model, processor, rows, spec["max_length"], batch_size, kind,
                                      progress=f"{split} ({len(rows)} examples)" if progress else None)))
        result["splits"][split] = {"examples": len(rows), "units": sum(ev["units"]), "loss": ev["loss"],
                                   "metric": kind.metric_of(ev), kind.metric: kind.metric_of(ev)}
    out = Path(out) if out else (Path(target) / "evaluation.json" if result["checkpoint"] else Path("evaluation.json"))
    write_json(out, result)
    result["out"] = str(out)
    return result


def table(result):
    """A markdown table of run()'s result."""
    lines = [f"| split | examples | loss (per {result['loss_unit']}) | {result['metric']} |", "|---|---|---|---|"]
    lines += [f"| {s} | {r['examples']} | {r['loss']:.6g} | {r['metric']:.6g} |" for s, r in result["splits"].items()]
    return "\n".join(lines)


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m adapters.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("target", metavar="CKPT|MODEL", help="a checkpoint directory (ours or a plain PEFT LoRA), or a "
                   "model (minilm, smollm2-135m, dinov2-small, a transformers directory or cached hub id) "
                   "evaluated untrained (on --task, default movie-reviews, or --data)")
    add_task_arguments(p)
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="default: all three")
    p.add_argument("--examples", type=examples_arg, default=None, help="per split: the first N of a seeded "
                                                                       "permutation (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the example subset; an untrained classifier's head draw "
                                                       "(as adapters.train --seed draws it)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", help="JSON file (default: CKPT/evaluation.json, or ./evaluation.json for a model)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    r = run(a.target, splits=a.splits, examples=a.examples, batch_size=a.batch_size, seed=a.seed, device=a.device,
            out=a.out, progress=not a.no_progress, **task_options(a))
    kind = "checkpoint" if r["checkpoint"] else "untrained model"
    print(f"{kind} {r['target']} on {r['task']['name']} ({r['task']['type']})")
    print(table(r))
    print(f"wrote {r['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
