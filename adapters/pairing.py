"""What makes two runs with the same seed a paired comparison, as digests (training_stats.json's `pairing`).

Every method trained with one seed sees the same data split, starts from the same task head and draws its training
batches in the same order (adapters.train takes each of them from the seed alone, never from the method). A paired
test of two runs (per-example outcomes: adapters.example_losses.example_outcomes) can check that they share:

    split_sha256       the task's data (its sha256) and how it is split and cut: the split sizes, val_fraction,
                       max_length
    head_init_sha256   the new task head's tensors as models.load_model draws them, before any method is applied
                       (None for a task that keeps the model's own head: a causal LM)
    data_order_sha256  the example indices of epoch 0's batches, in the order training takes them
"""
import hashlib
import json

import torch

from .models import in_modules


def _sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def split_digest(sha256, n_train, n_val, n_test, val_fraction, max_length):
    """sha256 over the data's sha256 and the split: the sizes of train, val and test, val_fraction, max_length."""
    return _sha256(json.dumps(dict(sha256=sha256, n_train=n_train, n_val=n_val, n_test=n_test,
                                   val_fraction=val_fraction, max_length=max_length), sort_keys=True))


def head_digest(model, head):
    """sha256 over name, dtype, shape and bytes of every state_dict tensor of the modules `head` (sorted by name);
    None without a head."""
    if not head:
        return None
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if in_modules(name, head):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())  # the bytes, whatever the dtype
    return h.hexdigest()


def order_digest(batches):
    """sha256 of the example indices of `batches` (lists of indices), batch by batch, in order."""
    return _sha256(json.dumps([[int(i) for i in batch] for batch in batches]))
