"""Evaluation of final weights (docs/THEORY.md section 3): eval mode, full splits, the task's own loss.

    python -m adapters.evaluate CKPT [--task T | --data FILE] [--n-train N ...] [--splits train val test]
    python -m adapters.evaluate MODEL [--task T | --data FILE]        # the untrained model: the reference

Every task type scores a batch per example as (summed loss, units, correct): the split's loss is Σ loss / Σ units
(mean per-example cross-entropy for classifiers, per-token NLL of the completions for a causal LM), and each
example's own loss is its summed loss / its units (what the bounds clip and take maxima of). The command prints
loss and metric (accuracy, or perplexity for a causal LM) per split and writes them to OUT/evaluate.json (+ the
table as OUT/evaluate.md), OUT being --out, by default the checkpoint directory (for a model: ./evaluate).
"""
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import command, data, models, tasks
from .checkpoint import read_meta
from .errors import AdapterError, cli
from .io import write_json
from .settings import AT_LEAST_1, setting
from .taskspec import (TASK_OPTIONS, DataChoice, checkpoint_data, examples_arg, load_spec, resolve_spec, subset,
                       task_options)


def batches(processor, examples, max_length, batch_size, task_type=tasks.CLASSIFICATION):
    """Dict batches over examples, in order, padded per batch."""
    collate = task_type.collate(processor, max_length)
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


def logits_of(output):
    """Logits of a transformers ModelOutput, a (logits, ...) tuple, or a plain tensor."""
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


def forward_logits(model, batch):
    """Logits of a dict batch on the model's device; labels stay out of the model's own forward (it would compute a
    loss of its own that nobody reads)."""
    return logits_of(model(**{k: v for k, v in batch.items() if k != "labels"}))


def batch_scores(model, batch, score=tasks.class_scores):
    """Per example (summed loss, units, correct) of one dict batch, moved to the model's device: the one place a
    batch is scored (evaluation, training's record, the landscape, the Hessian)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    return score(forward_logits(model, batch), batch["labels"])


def batch_loss(model, batch, score=tasks.class_scores):
    """(summed loss, number correct, units) of one dict batch: the loss a tensor, differentiable when grad is on
    (the Hessian differentiates it), the counts floats."""
    sums, units, correct = batch_scores(model, batch, score)
    return sums.sum(), float(correct.sum()), float(units.sum())


def summary(sums, units, correct):
    """{"loss": Σ loss / Σ units, "accuracy": Σ correct / Σ units, "losses": per-example loss, "units",
    "correct": per-example number correct (0/1 for a classifier, correctly predicted completion tokens for a causal
    LM)} from per-example lists: the per-example lists pair two runs on the same examples."""
    total = sum(units)
    return {"loss": sum(sums) / total, "accuracy": sum(correct) / total,
            "losses": [s / u for s, u in zip(sums, units)], "units": list(units), "correct": list(correct)}


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


def checkpoint_batches(path, split="train", examples=None, batch_size=32, seed=0, **options):
    """Batches of the checkpoint's task (its own, or the one `options` name: taskspec.TASK_OPTIONS) and its base
    model's preprocessing: taskspec.subset() of the split."""
    meta, (spec, the_task) = read_meta(path), checkpoint_data(path, **options)
    processor = models.load_processor(meta["base_model"])
    return batches(processor, subset(getattr(the_task, split), examples, seed), spec["max_length"], batch_size,
                   tasks.of_meta(meta))


# ---- the command: loss and metric per split of a checkpoint or of an untrained model -------------------------

SPLITS = ("train", "val", "test")


def _is_checkpoint(path):
    from .checkpoint import META, PEFT_CONFIG
    return Path(path).is_dir() and any((Path(path) / f).exists() for f in (META, PEFT_CONFIG))


def _untrained(name, options, seed):
    """(model, spec, task) of a transformers model before any fine-tuning, on the task `options` name (default
    adapters.train's): a classifier gets the head adapters.train would draw with `seed`."""
    spec = resolve_spec({}, name, **{"task": data.MOVIE_REVIEWS, **{k: v for k, v in options.items() if v is not None}})
    the_task = load_spec(spec)
    kind = tasks.get_task_type(the_task.type)
    tasks.check_model(kind, name, models.model_family(name))
    model = models.load_model(name, num_labels=len(the_task.labels or ()), seed=seed, auto_class=kind.auto_class)
    return model, dict(spec, name=the_task.name, type=the_task.type, sha256=the_task.sha256), the_task


def default_out(target):
    """The command's output directory when --out is not given: the checkpoint's own, else ./evaluate."""
    return Path(target) if _is_checkpoint(target) else Path("evaluate")


def run(target, *, splits=SPLITS, examples=None, batch_size=32, seed=0, device=None, out=None, progress=True,
        **options):
    """Loss and metric per split of checkpoint `target` (its recorded task, or the one `options` name) or of the
    untrained model `target` (a model name or transformers directory); written to the JSON file `out` (default
    default_out(target)/evaluate.json: CKPT/evaluate.json, else ./evaluate/evaluate.json) and returned.

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
    out = Path(out) if out else default_out(target) / "evaluate.json"
    write_json(out, result)
    result["out"] = str(out)
    return result


def table(result):
    """A markdown table of run()'s result."""
    lines = [f"| split | examples | loss (per {result['loss_unit']}) | {result['metric']} |", "|---|---|---|---|"]
    lines += [f"| {s} | {r['examples']} | {r['loss']:.6g} | {r['metric']:.6g} |" for s, r in result["splits"].items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class EvaluateConfig(DataChoice):
    """The settings of `python -m adapters.evaluate` (the data flags: taskspec.DataChoice)."""
    splits: list[str] = setting(list(SPLITS), "the splits to evaluate", choices=SPLITS)
    examples: Optional[int] = setting(None, "per split: the first N of a seeded permutation, or all (default: all)",
                                      check=AT_LEAST_1, type=examples_arg, metavar="N|all")
    batch_size: int = setting(32, "examples per forward pass", check=AT_LEAST_1)
    seed: int = setting(0, "the example subset; an untrained classifier's head draw (as adapters.train --seed "
                        "draws it)")
    device: Optional[str] = command.device("the model runs")
    out: Optional[str] = command.out(None, "evaluate.json, and evaluate.md with md in --formats (default: the "
                                     "checkpoint directory, or ./evaluate for an untrained model)")
    progress: bool = setting(True, "no progress bars", flag="--no-progress", results=False)
    formats: tuple = command.formats(("md",))


def parser():
    p = command.parser("python -m adapters.evaluate", __doc__, EvaluateConfig)
    p.add_argument("target", metavar="CKPT|MODEL", help="a checkpoint directory (ours or a plain PEFT LoRA), or a "
                   "model (minilm, smollm2-135m, dinov2-small, a transformers directory or cached hub id) "
                   "evaluated untrained (on --task, default movie-reviews, or --data)")
    return p


@cli
def main(argv=None):
    config, args = command.parse(parser(), EvaluateConfig, argv)
    target = args["target"]
    out = command.out_dir(config.out if config.out else default_out(target), "evaluate")
    r = run(target, splits=config.splits, examples=config.examples, batch_size=config.batch_size, seed=config.seed,
            device=config.device, out=out / "evaluate.json", progress=config.progress, **task_options(config))
    kind = "checkpoint" if r["checkpoint"] else "untrained model"
    text = f"{kind} {r['target']} on {r['task']['name']} ({r['task']['type']})\n{table(r)}\n"
    written = [r["out"], *map(str, command.write_tables(out, "evaluate", config.formats, {"md": text}))]
    print(text, end="")
    print(f"wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
