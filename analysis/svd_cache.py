"""On-disk cache of the base model's SVDs.

Every checkpoint of one base model shares W0, so its SVD (the expensive half of the intruder
analysis) is computed once and reused across checkpoints and runs. An entry is keyed by the
content of the matrix itself (sha256 of its dtype, shape and bytes), the vectors side and the dtype
the vectors are stored in, and holds the singular vectors of that side (as rows, so that the top K0
of them are a contiguous prefix that a memory-mapped read touches alone) and all singular values in
float64. A key by (base hash, module name) alone would hand a different W0 of the same shape and norm
the SVD of another matrix; the base hash and the name are kept in the entry's metadata, for people
reading the cache.

Storage dtype (`--dtype`): float64 (default, exact as computed), float32 or float16 (a quarter of the
float64 size). A stored vector û0_i differs from u0_i by at most `rounding` = max_i ‖û0_i − u0_i‖₂
(measured when the entry is written, kept in its metadata), and c_j = max_i |u_jᵀ u0_i| is 1-Lipschitz
in each u0_i, so a count read off a rounded entry can differ from the exact one only for a c_j within
`rounding` of ε (about 5e-4 for float16, 6e-8 for float32); analysis.spectral reports how many did.

Entries are written to a temp file and renamed, so a concurrent reader or a killed run never
sees half an entry. On load an entry is also checked against the W0 it is asked for: same shape and
Σ σ_i² = ‖W0‖_F² (the SVD preserves the Frobenius norm); an entry that fails (a corrupt file) is recomputed.
"""
import hashlib
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.io import atomic_file
from adapters.weights import content_hash  # noqa: F401  (the key; re-exported for callers of this module)

SIDES = ("left", "right")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}
FORMAT = "svd-v3"  # bump when the entry layout or the SVD's dtype changes


def default_dir():
    """$BEYOND_LORA_CACHE, else ~/.cache/beyond-lora/svd."""
    env = os.environ.get("BEYOND_LORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "beyond-lora" / "svd"


def svd(W, side="left"):
    """Thin SVD of W (n×m) in float64 → (vectors of `side` as columns, singular values, descending).

    left: U (n×min(n,m)); right: V (m×min(n,m)).
    """
    if side not in SIDES:
        raise ValueError(f"vectors side must be 'left' or 'right', got {side!r}")
    U, S, Vh = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
    return (U if side == "left" else Vh.T).contiguous(), S


def _dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"SVD cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def entry_path(W0, side, cache_dir=None, dtype="float64", *, key=None):
    """File of the entry for matrix W0's `side` vectors stored in `dtype` (key: W0's content_hash, if known)."""
    key = hashlib.sha256(f"{FORMAT}\0{key or content_hash(W0)}\0{side}\0{_dtype(dtype)}".encode()).hexdigest()
    return Path(cache_dir or default_dir()) / f"{key[:32]}.safetensors"


class BaseSVD:
    """One cache entry, memory-mapped: `singular_values` (float64, all), `rounding` (see the module docstring),
    `rows(K0)` the top K0 singular vectors as rows (float64; K0 = None: all), `hit` whether it was cached."""

    def __init__(self, path, hit, memory=None):
        self.path, self.hit, self._memory = path, hit, memory  # memory: the entry, when it could not be stored
        if memory is not None:
            self.singular_values, self.rounding = memory[1], memory[2]
            return
        with safe_open(str(path), framework="pt") as f:
            self.singular_values = f.get_tensor("singular_values")
            self.rounding = float((f.metadata() or {}).get("rounding", "0"))

    def rows(self, k0=None):
        if self._memory is not None:
            return self._memory[0][:k0].to(torch.float64)
        with safe_open(str(self.path), framework="pt") as f:
            sl = f.get_slice("vectors_t")
            return (sl[:k0] if k0 is not None else sl[:]).to(torch.float64)


def _valid(path, W0, side, fro2=None):
    n, m = W0.shape
    try:
        with safe_open(str(path), framework="pt") as f:
            S = f.get_tensor("singular_values")
            shape = tuple(f.get_slice("vectors_t").get_shape())
    except Exception:  # a corrupt file is a miss, not an error: the entry is rebuilt
        return False
    if shape != (min(n, m), (n if side == "left" else m)) or S.shape != (min(n, m),):
        return False
    fro2 = W0.detach().to(torch.float64).square().sum() if fro2 is None else fro2
    return bool(torch.isclose(S.square().sum(), torch.as_tensor(fro2, dtype=torch.float64), rtol=1e-9, atol=1e-12))


def open_base(W0, base_hash, name, side="left", cache_dir=None, dtype="float64", *, device=None, key=None):
    """The cache entry of W0's SVD (a BaseSVD), computed (on `device`) and stored on a miss."""
    path = entry_path(W0, side, cache_dir, dtype, key=key)
    if path.exists() and _valid(path, W0, side):
        return BaseSVD(path, True)
    vecs, S = svd(W0 if device is None else W0.to(device), side)
    stored = vecs.T.to(DTYPES[dtype]).contiguous()
    rounding = float((stored.to(torch.float64) - vecs.T).norm(dim=1).max()) if vecs.numel() else 0.0
    meta = {"format": FORMAT, "base_hash": str(base_hash), "name": name, "side": side, "dtype": dtype,
            "rounding": repr(rounding)}
    try:
        _store(path, stored.cpu(), S.cpu(), meta)
    except OSError as e:  # the cache only saves time: an unwritable cache must not stop the analysis
        warnings.warn(f"SVD cache not written ({path.parent}): {e}", stacklevel=2)
        return BaseSVD(None, False, (stored.cpu(), S.cpu(), rounding))
    return BaseSVD(path, False)


def base_svd(W0, base_hash, name, side="left", cache_dir=None, dtype="float64"):
    """The SVD of W0 (as `svd`: vectors as columns, float64), from the cache when a valid entry exists, else
    computed and stored. base_hash and name only label the entry (its metadata); the key is W0's content.
    Returns (vectors, singular_values, hit) where hit says whether the cache was used."""
    entry = open_base(W0, base_hash, name, side, cache_dir, dtype)
    return entry.rows().T, entry.singular_values, entry.hit


def _store(path, vecs_t, S, metadata):
    with atomic_file(path) as tmp:
        save_file({"vectors_t": vecs_t, "singular_values": S}, str(tmp), metadata=metadata)
