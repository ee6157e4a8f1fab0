"""Per-example outcomes recorded with the weights they are of, so that bounds need not run the model again and two
runs can be compared example by example (paired statistics).

adapters.train writes EXAMPLE_LOSSES into the checkpoint (each final split's per-example losses, units and number
correct) with the digest of the weights and of the data split; `recorded_losses` hands the losses back only when
both still match, `example_outcomes` one split's losses, units and number correct when the weights still match.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import weights_digest
from .errors import AdapterError


EXAMPLE_LOSSES = "example_losses.safetensors"
OUTCOMES = ("losses", "units", "correct")  # per split: {split}.losses, {split}.units, {split}.correct (float64)
# What recorded losses must share with a later evaluation to stand for it: the data's content and how it is split
# and cut. The weights are compared by weights_digest.
SAME_SPLIT = ("type", "sha256", "n_train", "n_val", "n_test", "val_fraction", "max_length")


def _split_key(spec):
    return json.dumps({k: spec.get(k) for k in SAME_SPLIT}, sort_keys=True)


def write_example_losses(file, results, spec, weights_sha256):
    """Record the per-example losses, units and number correct of summary() `results` ({split: result}) of the final
    weights on task `spec` (with its type and sha256) at `file`, inside the checkpoint directory being written, with
    `weights_sha256`, the weights_digest of that directory's weights."""
    tensors = {f"{split}.{key}": torch.tensor(r[key], dtype=torch.float64)
               for split, r in results.items() if r for key in OUTCOMES}
    # One metadata entry: safetensors writes several in no fixed order, and a resumed run must write the same bytes.
    save_file(tensors, str(file), metadata={"record": json.dumps(
        {"split": _split_key(spec), "weights_sha256": weights_sha256}, sort_keys=True)})


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


def example_outcomes(path, split="test"):
    """{"losses", "units", "correct"}: numpy float64 arrays, in split order, of checkpoint `path`'s final weights on
    `split`, as training recorded them (accuracy = Σ correct / Σ units; a causal LM's correct counts tokens).

    AdapterError when the record is missing, unreadable, lacks the split, or is of other weights than the
    checkpoint's now (weights_digest). Unlike recorded_losses the data is not checked: the record says which split
    it is of (its `split` metadata), and pairing two runs is the caller's to check (training_stats' pairing).
    """
    file = Path(path) / EXAMPLE_LOSSES
    if not file.is_file():
        raise AdapterError(f"no per-example outcomes {file}: train the checkpoint with this version of adapters.train")
    try:
        with safe_open(str(file), framework="pt") as f:
            record, stored = json.loads((f.metadata() or {})["record"]), {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"unreadable per-example outcomes {file} ({type(e).__name__}: {e})") from None
    splits = sorted({k.split(".")[0] for k in stored})
    if split not in splits:
        raise AdapterError(f"{file} has no {split!r} split (it has: {', '.join(splits) or 'none'})")
    if f"{split}.correct" not in stored:  # written before the number correct was recorded
        raise AdapterError(f"{file} records no {split}.correct (an older run): retrain the checkpoint to pair it")
    if not isinstance(record, dict) or record.get("weights_sha256") != weights_digest(path):
        raise AdapterError(f"{file} is of other weights than the checkpoint's now (weights digest differs): "
                           "retrain, or evaluate the checkpoint afresh")
    return {key: stored[f"{split}.{key}"].to(torch.float64).numpy() for key in OUTCOMES}
