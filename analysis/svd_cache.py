"""On-disk cache of the base model's SVDs.

Every checkpoint of one base model shares W0, so its SVD (the expensive half of the intruder
analysis) is computed once and reused across checkpoints and runs. An entry is keyed by the
content of the matrix itself (sha256 of its dtype, shape and bytes) and the vectors side, and holds
the singular vectors of that side (as columns) and all singular values, in float64. A key by (base
hash, module name) alone would hand a different W0 of the same shape and norm the SVD of another
matrix; the base hash and the name are kept in the entry's metadata, for people reading the cache.

Entries are written to a temp file and renamed, so a concurrent reader or a killed run never
sees half an entry. On load an entry is also checked against the W0 it is asked for: same shape and
Σ σ_i² = ‖W0‖_F² (the SVD preserves the Frobenius norm); an entry that fails (a corrupt file) is recomputed.
"""
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SIDES = ("left", "right")
FORMAT = "svd-v2"  # bump when the entry layout or the SVD's dtype changes


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


def content_hash(W):
    """sha256 of a matrix's dtype, shape and bytes: equal exactly when the matrices are bit for bit equal."""
    t = W.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def entry_path(W0, side, cache_dir=None):
    """File of the entry for matrix W0's `side` vectors."""
    key = hashlib.sha256(f"{FORMAT}\0{content_hash(W0)}\0{side}".encode()).hexdigest()[:32]
    return Path(cache_dir or default_dir()) / f"{key}.safetensors"


def _valid(entry, W0, side):
    n, m = W0.shape
    vecs, S = entry.get("vectors"), entry.get("singular_values")
    if vecs is None or S is None:
        return False
    if vecs.shape != ((n if side == "left" else m), min(n, m)) or S.shape != (min(n, m),):
        return False
    fro2 = W0.detach().to(torch.float64).square().sum()
    return bool(torch.isclose(S.square().sum(), fro2, rtol=1e-9, atol=1e-12))


def base_svd(W0, base_hash, name, side="left", cache_dir=None):
    """The SVD of W0 (as `svd`), from the cache when a valid entry exists, else computed and stored.

    base_hash and name only label the entry (its metadata); the key is W0's content. Returns (vectors, singular_values, hit) where hit says whether the cache was used.
    """
    path = entry_path(W0, side, cache_dir)
    if path.exists():
        try:
            entry = load_file(path)
        except Exception:  # a corrupt file is a miss, not an error: the entry is rebuilt below
            entry = {}
        if _valid(entry, W0, side):
            return entry["vectors"], entry["singular_values"], True
    vecs, S = svd(W0, side)
    try:
        _store(path, vecs, S, {"format": FORMAT, "base_hash": str(base_hash), "name": name, "side": side})
    except OSError as e:  # the cache only saves time: an unwritable cache must not stop the analysis
        warnings.warn(f"SVD cache not written ({path.parent}): {e}", stacklevel=2)
    return vecs, S, False


def _store(path, vecs, S, metadata):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"vectors": vecs, "singular_values": S}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
