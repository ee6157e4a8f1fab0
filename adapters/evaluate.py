"""Evaluation of final weights (THEORY.md section 3): eval mode, full splits, mean per-example loss."""
import torch
import torch.nn.functional as F

from . import data, models
from .checkpoint import read_meta
from .errors import AdapterError


def batches(tokenizer, examples, max_length, batch_size):
    """Tokenised dict batches over (text, label) pairs, in order, padded per batch."""
    collate = data.collate(tokenizer, max_length)
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


def logits_of(output):
    """Logits of a transformers ModelOutput, a (logits, ...) tuple, or a plain tensor."""
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def evaluate(model, batches):
    """{"loss": mean per-example cross-entropy, "accuracy", "losses": per-example list} in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, correct = [], 0
    for batch in batches:
        labels = batch["labels"].to(device)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = logits_of(model(**inputs)).float()
        losses += F.cross_entropy(logits, labels, reduction="none").tolist()
        correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    n = len(losses)
    return {"loss": sum(losses) / n, "accuracy": correct / n, "losses": losses}


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
    """The task a checkpoint was trained on, re-loaded exactly (same file, same split sizes)."""
    task = read_meta(path).get("task")
    if not task:
        raise AdapterError(f"checkpoint {path} records no task; evaluate it on your own batches")
    return data.load_task(task["name"], task.get("data"), n_train=task.get("n_train"), n_test=task.get("n_test"))


def checkpoint_batches(path, split="train", examples=None, batch_size=32, seed=0):
    """Batches of the checkpoint's own task and tokenisation: the first `examples` examples of a
    seeded permutation of the split (the whole split, in order, when `examples` is None)."""
    meta = read_meta(path)
    task = checkpoint_task(path)
    rows = getattr(task, split)
    if examples is not None and examples < len(rows):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:examples]
        rows = [rows[i] for i in order.tolist()]
    tokenizer = models.load_tokenizer(meta["base_model"])
    return batches(tokenizer, rows, meta["task"]["max_length"], batch_size)
