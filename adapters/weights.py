"""A checkpoint's adapted matrices, one at a time, without building the model (docs/CHECKPOINT.md).

`open_stream(path)` reads W0 of each adapted matrix straight from the base model's safetensors files
(`model.safetensors`, or the shards a `model.safetensors.index.json` lists), memory-mapped: a matrix is
read when asked for, as stored (bf16, fp16, fp32) and returned in float32, so what stays in memory is a
few matrices whatever the model's size. ΔW = B A comes from the adapter (ours or a plain PEFT LoRA
directory) as `checkpoint.lowrank_factors` reads it. The float32 W0 is the matrix `checkpoint.matrices`
gives (the same bytes: models load in float32, and bf16/fp16 → fp32 is exact).

Only low-rank checkpoints stream: fft and head ones (whole trained weights) and bases that are not
safetensors, or whose tensor names transformers renames on load, raise NotStreamable, and callers use
`checkpoint.matrices`. Streaming does not check the base's recorded weights hash (that needs the whole
model built): `verify_base` does, on request.
"""
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import models, tasks
from .checkpoint import _peft_config, load_base, lowrank_factors, read_meta
from .errors import AdapterError, CheckpointError
from .layers import as_out_in
from .methods import get_method

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


def content_hash(W):
    """sha256 of a matrix's dtype, shape and bytes: equal exactly when the matrices are bit for bit equal (the key
    of the caches that keep per-matrix results: analysis.svd_cache, bounds' spectral norms)."""
    t = W.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class NotStreamable(CheckpointError):
    """This checkpoint's matrices cannot be read one by one (the message says why); use checkpoint.matrices."""


def base_directory(name_or_path):
    """The local directory of a base model: a registered name or directory (models.resolve_model), else a hub id
    already in the Hugging Face cache (there is no network)."""
    resolved = models.resolve_model(name_or_path)
    if Path(resolved).is_dir():
        return Path(resolved)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(resolved, local_files_only=True))
    except Exception as e:  # offline miss: the same message load_model gives
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"model not found: {name_or_path} ({first})") from None


class BaseWeights:
    """The tensors of a base model directory by name, each read from its (memory-mapped) safetensors shard."""

    def __init__(self, directory):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                files = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"corrupt shard index {index}: {e}") from None
            self.files = {key: self.directory / f for key, f in files.items()}
        elif (self.directory / SINGLE).is_file():
            with self._open(self.directory / SINGLE) as f:
                self.files = dict.fromkeys(f.keys(), self.directory / SINGLE)
        else:
            raise NotStreamable(f"{self.directory}: no {SINGLE} or {INDEX} (weights in another format)")
        self.keys = set(self.files)

    @staticmethod
    def _open(file):
        try:
            return safe_open(str(file), framework="pt")
        except FileNotFoundError:
            raise CheckpointError(f"weights not found: {file}") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt weights file {file}: {e}") from None

    def key(self, module):
        """The stored name of `module`'s weight: as named, without leading components (a task model's
        `bert.`, `model.` prefix over a bare body), or the one stored name that ends with it."""
        parts = module.split(".")
        for i in range(len(parts)):
            key = ".".join(parts[i:]) + ".weight"
            if key in self.keys:
                return key
        ends = [k for k in self.keys if k.endswith(f".{module}.weight")]
        if len(ends) == 1:
            return ends[0]
        raise NotStreamable(f"{self.directory}: no stored weight for module {module}")

    def matrix(self, module, transpose=False):
        """W0 of `module` as n×m float32 (transpose: stored in×out, as GPT-2's Conv1D)."""
        key = self.key(module)
        with self._open(self.files[key]) as f:
            w = f.get_tensor(key)
        return as_out_in(w, transpose).to(torch.float32).contiguous()

    def shape(self, module, transpose=False):
        key = self.key(module)
        with self._open(self.files[key]) as f:
            shape = tuple(f.get_slice(key).get_shape())
        return as_out_in(shape, transpose)


class Stream:
    """One checkpoint's adapted matrices in forward order: `names`, `shape(name)` (n, m), `matrix(name)` →
    (W0 n×m float32, B n×R, A R×m) with ΔW = B A, and `meta` (adapters.read_meta)."""

    def __init__(self, path):
        self.path, self.meta = Path(path), read_meta(path)
        if get_method(self.meta["method"]).adapter is None:
            raise NotStreamable(f"{path}: a {self.meta['method']} checkpoint has no low-rank update")
        self.factors = lowrank_factors(path)
        if not self.meta.get("base_model"):
            raise CheckpointError(f"{path}: the checkpoint names no base_model")
        self.base_dir = base_directory(self.meta["base_model"])
        self.base = BaseWeights(self.base_dir)
        self.transpose = bool(_peft_config(path).get("fan_in_fan_out"))
        self.names = _forward_order(list(self.factors), self.meta, self.base_dir)
        for name in self.names:  # every matrix must be found before any work starts
            self.base.key(name)

    def shape(self, name):
        return self.base.shape(name, self.transpose)

    def matrix(self, name):
        W0 = self.base.matrix(name, self.transpose)
        B, A = self.factors[name]
        if (B.shape[0], A.shape[1]) != tuple(W0.shape):
            raise CheckpointError(f"checkpoint {self.path} does not fit base {self.meta['base_model']}: {name} "
                                  f"has ΔW {B.shape[0]}×{A.shape[1]} but W0 {W0.shape[0]}×{W0.shape[1]}")
        return W0, B, A


def open_stream(path):
    """A Stream over the checkpoint at `path`; NotStreamable when it must be read as a model instead."""
    return Stream(path)


def verify_base(path):
    """Build the base once and check it against the checkpoint's recorded weights hash (CheckpointError if not)."""
    load_base(path)


def _natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _forward_order(names, meta, base_dir):
    """Our checkpoints list their layers in forward order; for a plain PEFT directory the order comes from the
    model's module tree, built on the meta device (no weights), else numbers in names are sorted as numbers."""
    recorded = [layer.get("name") for layer in (meta.get("parameters") or {}).get("layers", [])]
    if set(names) <= set(recorded):
        return [n for n in recorded if n in set(names)]
    try:
        import transformers
        kind = tasks.of_meta(meta)
        config = transformers.AutoConfig.from_pretrained(str(base_dir))
        with torch.device("meta"):
            model = getattr(transformers, kind.auto_class).from_config(config)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        if set(names) <= set(order):
            return sorted(names, key=order.get)
    except Exception:  # an unknown architecture: the name order below is the fallback
        pass
    return sorted(names, key=_natural)
