"""Evaluation of final weights (THEORY.md section 3): eval mode, full splits, the task's own loss.

Every task type scores a batch per example as (summed loss, units, correct): the split's loss is Σ loss / Σ units
(mean per-example cross-entropy for classifiers, per-token NLL of the completions for a causal LM), and each
example's own loss is its summed loss / its units (what the bounds clip and take maxima of).
"""
from contextlib import contextmanager

import torch

from . import models, tasks
from .checkpoint import read_meta
from .data import load_task
from .errors import AdapterError


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
def example_scores(model, batches, score=tasks.class_scores):
    """Per example, in batch order, (summed loss, units, correct) lists over `batches`, in eval mode."""
    sums, units, correct = [], [], []
    with eval_mode(model):
        for batch in batches:
            for out, values in zip((sums, units, correct), batch_scores(model, batch, score)):
                out += values.double().tolist()
    return sums, units, correct


def evaluate(model, batches, score=tasks.class_scores):
    """summary() of `batches` in eval mode."""
    return summary(*example_scores(model, batches, score))


def examples_arg(text):
    """argparse type for --examples: a positive count, or "all" (None)."""
    import argparse
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def checkpoint_task(path):
    """The task a checkpoint was trained on, re-loaded exactly (same data, same split sizes and fraction)."""
    task = read_meta(path).get("task")
    if not task:
        raise AdapterError(f"checkpoint {path} records no task; evaluate it on your own batches")
    kwargs = {k: task[k] for k in ("n_train", "n_val", "n_test", "val_fraction") if task.get(k) is not None}
    return load_task(task["name"], task.get("data"), **kwargs)


def checkpoint_score(path):
    """The score function of the checkpoint's task type (what its loss is)."""
    return tasks.of_meta(read_meta(path)).score


def checkpoint_batches(path, split="train", examples=None, batch_size=32, seed=0):
    """Batches of the checkpoint's own task and preprocessing: the first `examples` examples of a
    seeded permutation of the split (the whole split, in order, when `examples` is None)."""
    meta = read_meta(path)
    task = checkpoint_task(path)
    rows = getattr(task, split)
    if examples is not None and examples < len(rows):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:examples]
        rows = [rows[i] for i in order.tolist()]
    processor = models.load_processor(meta["base_model"])
    return batches(processor, rows, meta["task"]["max_length"], batch_size, tasks.of_meta(meta))
