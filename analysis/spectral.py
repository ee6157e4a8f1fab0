"""Intruder dimensions and singular spectra of fine-tuned checkpoints (docs/THEORY.md section 4).

For an adapted matrix W0 = U0 S0 V0ᵀ and W = W0 + ΔW = U S Vᵀ, the j-th top singular vector
u_j of W (by singular value) has

    c_j = max_i |u_jᵀ u0_i|      (over all singular vectors of W0, thin SVD)

and is an intruder at threshold ε when c_j < ε (Shuttleworth et al., 2024). With |·| the
count does not depend on the signs an SVD routine picks. `--vectors right` uses V, V0.

    python -m analysis.spectral CKPT [CKPT ...] [--top-k 10|all] [--eps 0.5] [--sweep]
        [--vectors left|right] [--layers REGEX] [--out DIR] [--formats md,png,pdf]
        [--dtype float64|float32|float16] [--device cuda] [--verify-base] [--config FILE.yaml]

writes DIR/spectral.json, its table (spectral.md, with md in --formats) and figures (the ε-sweep with --sweep, a
layers × module heatmap, W0-vs-W spectra of one matrix, total intruders per method), and prints the table. The
base model's SVDs come from analysis.svd_cache. From Python: `run(paths, config=None, **settings)` (the settings
of SpectralConfig) returns the dict.

Scale. A LoRA-family checkpoint streams (adapters.weights): W0 is read matrix by matrix from the base's
safetensors shards, never as a model. W differs from W0 by B A of rank ≤ k·r (folded links included), so
for a given k, W's top-k singular triplets come from block Krylov with W0 and B A applied as operators
(bounds.spectral_norm.top_singular), each ũ_j with a certified bound ‖ũ_j − ±u_j‖ ≤ e_j; c_j is
1-Lipschitz in u_j, so the max_cos of the record is within e_j (+ the cache's rounding) of the exact
one, and when every c_j is farther than that from ε and from each ε of the grid the counts are exactly the
full-SVD definition's. Otherwise the matrix is redone in float64, then by the full path. c_j itself is read
off the top K0 base vectors when that certifies it (analysis.spectral._prefix_max_cos). k = all is the
exact full path. fft and head checkpoints are built as a model and take the full path.
"""
import argparse
import dataclasses
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from adapters import command, weights
from adapters.errors import AdapterError, CheckpointError, cli
from adapters.io import Journal, write_json
from adapters.settings import Check, check, make, setting, shaping
from adapters.taskspec import examples_arg
from analysis import style, svd_cache
from analysis.svd_cache import DTYPES, SIDES, svd
from bounds.spectral_norm import OVERSAMPLE, check_device, lowrank_singular_values, top_singular

# ε over (0, 1] in steps of 0.05, as in the Beyond-LoRA figure.
EPS_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))
# A singular vector that W shares with W0 has |cos| = 1 up to rounding (1 ± 1e-15 in float64);
# it is set to exactly 1 so that the ε = 1 end of the sweep counts only vectors that moved.
ONE_TOL = 1e-9


def top_k_arg(text):
    """--top-k: a positive integer, or "all" (every singular vector): taskspec.examples_arg's count or all."""
    k = examples_arg(text)  # None for all
    if k is not None and k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return "all" if k is None else k


@dataclass(frozen=True)
class SpectralConfig:
    """The settings of analysis.spectral: each field is a flag (python -m analysis.spectral --help) and a keyword of
    run(); those with results=True are spectral.json's "settings"."""
    top_k: Union[int, str] = setting(10, "top-k singular vectors of W, or all (the exact full-SVD path)",
                                     type=top_k_arg, metavar="K|all")
    eps: float = setting(0.5, "intruder threshold ε", check=Check("in (0, 1]", lambda v: 0 < v <= 1))
    vectors: str = setting("left", "left (U) or right (V) singular vectors", choices=SIDES)
    layers: Optional[str] = setting(None, "analyse the matrices whose name matches this regex (default: all)",
                                    metavar="REGEX")
    cache_dtype: str = setting("float64", "storage of the base-SVD cache: float16 is a quarter of float64's size; a "
                               "count can then differ only for a c_j within the stored vectors' rounding (about "
                               "5e-4) of ε", choices=tuple(DTYPES), flag="--dtype")
    sweep: bool = setting(False, "draw the ε-sweep figure (the counts are always in the JSON)", results=False)
    spectrum_layer: Optional[str] = setting(None, "the matrix of the spectrum figure, a regex (default: the first "
                                            "analysed)", results=False, metavar="REGEX")
    cache_dir: Optional[str] = setting(None, "the base-SVD cache (default: $BEYOND_LORA_CACHE or "
                                       "~/.cache/beyond-lora/svd)", results=False, metavar="DIR")
    verify_base: bool = setting(False, "build the base once to check the checkpoint's recorded weights hash "
                                "(streaming does not)", results=False)
    out: Optional[str] = command.out(None, "spectral.json, spectral.md and the figures (the command's default: "
                                     "./spectral; run(): nothing written)")
    formats: tuple = command.formats(("md", "png", "pdf"))
    device: Optional[str] = setting(None, "where the SVDs run, e.g. cuda, cuda:1 (default: cpu)", results=False)
    progress: bool = setting(True, "no progress bars", results=False, flag="--no-progress")


def check_config(config):
    """What the fields' ranges cannot say: top-k (an int or all), the regexes, the device."""
    if not (config.top_k in (None, "all") or (isinstance(config.top_k, int) and not isinstance(config.top_k, bool)
                                              and config.top_k >= 1)):
        raise AdapterError(f"top_k must be a positive integer or 'all', got {config.top_k!r}")
    check_device(config.device)
    for pattern, flag in ((config.layers, "--layers"), (config.spectrum_layer, "--spectrum-layer")):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise AdapterError(f"{flag} {pattern!r} is not a valid regex: {e}") from None
    return config


# ---------------------------------------------------------------- the definition, on tensors
def intruder_cos(base_vectors, vectors, k=None):
    """c_j = max_i |<vectors[:, j], base_vectors[:, i]>| for the first k columns (all if k is None).

    Both arguments hold unit singular vectors as columns, sorted by singular value.
    """
    top = vectors[:, :k] if k is not None else vectors
    c = (top.T @ base_vectors).abs().amax(dim=1)
    return torch.where(c > 1 - ONE_TOL, torch.ones_like(c), c)


def count(c, eps):
    """Number of intruders at threshold ε: #{j : c_j < ε}."""
    return int((c < eps).sum())


def sweep(c, grid=EPS_GRID):
    return [count(c, e) for e in grid]


def analyse_matrix(name, W0, dW, *, k=10, eps=0.5, side="left", base=None):
    """One adapted matrix → its record in spectral.json.

    k: an int or None (= all min(n, m) vectors). base: W0's (vectors, singular values) of `side`
    when already known (the cache); computed here otherwise.
    """
    n, m = W0.shape
    V0, S0 = base if base is not None else svd(W0, side)
    V, S = svd(W0.to(torch.float64) + dW.to(torch.float64), side)
    k = len(S) if k is None else min(k, len(S))
    c = intruder_cos(V0.to(V.device), V, k)
    return _record(name, (n, m), c, eps, S0, S, torch.linalg.svdvals(dW.detach().to(torch.float64)))


# ---------------------------------------------------------------- the low-rank path
def analyse_lowrank(name, W0, B, A, *, k=10, eps=0.5, side="left", base, dtype=torch.float32):
    """analyse_matrix's record for ΔW = B A without a full SVD of W (module docstring, "Scale").

    base: W0's analysis.svd_cache.BaseSVD entry for `side`. dtype: the Krylov's working dtype; a matrix whose
    counts the certificate leaves undecided is redone in float64, then by the full path.
    """
    Wt, Bt, At = (W0, B, A) if side == "left" else (W0.T, A.T, B.T)  # right vectors of W = left ones of Wᵀ
    n, m = Wt.shape
    kk = min(k, n, m)
    if kk + 1 + OVERSAMPLE >= min(n, m):  # the Krylov space would be the whole space: the full path is cheaper
        return _full(name, W0, B, A, k=k, eps=eps, side=side, base=base)
    t = None
    for working in dict.fromkeys((dtype, torch.float64)):  # float64 starts from the float32 run's vectors
        t = top_singular(Wt, Bt, At, kk, dtype=working, start=None if t is None else t["start"])
        err = t["vector_error"] + base.rounding
        c, read = _prefix_max_cos(base, t["U"])
        c = torch.where(c >= 1 - torch.clamp(err, min=ONE_TOL), torch.ones_like(c), c)
        if not _undecided(c, err, eps):
            break
    else:
        rec = _full(name, W0, B, A, k=k, eps=eps, side=side, base=base)
        rec["svd"] = "full (the low-rank certificate left a count undecided)"
        return rec
    sv = lowrank_singular_values(B, A)
    return dict(_record(name, (n, m) if side == "left" else (m, n), c, eps, base.singular_values, t["S"], sv),
                svd=f"block Krylov ({'float64' if working == torch.float64 else 'float32'}, width {t['width']})",
                max_cos_error=err.tolist(), base_vectors_read=read)


def _full(name, W0, B, A, *, k, eps, side, base):
    rec = analyse_matrix(name, W0, B.to(torch.float64) @ A.to(torch.float64), k=k, eps=eps, side=side,
                         base=(base.rows().T.to(W0.device), base.singular_values))
    return dict(rec, svd="full (torch.linalg.svd, float64)", max_cos_error=None,
                base_vectors_read=len(base.singular_values))


def _prefix_max_cos(base, U):
    """c_j = max_i |u_jᵀ u0_i| read off as few base vectors as certify it, and how many were read.

    Over the top K0 base vectors, c_top = max |p_i| with p = U0_K0ᵀ u_j; the part of u_j outside their span has
    norm ρ = √(1 − ‖p‖²), so every remaining |u_jᵀ u0_i| ≤ ρ, and c_j = c_top once ρ ≤ c_top. Else K0 grows
    (×4) up to all of them. Vectors W shares with W0 are certified early; intruders need most of the base.
    """
    total, k = len(base.singular_values), U.shape[1]
    k0 = min(total, max(4 * k, 32))
    while True:
        P = base.rows(k0) @ U
        c = P.abs().amax(dim=0)
        rho = torch.sqrt(torch.clamp(1 - P.square().sum(dim=0), min=0))
        if k0 == total or bool((rho <= c).all()):
            return c, k0
        k0 = min(total, 4 * k0)


def _undecided(c, err, eps):
    """Whether some count (at ε or on the grid) could differ for a c_j within its error bar of the threshold."""
    thresholds = torch.tensor(sorted(set(EPS_GRID) | {eps}), dtype=c.dtype)
    near = (c[:, None] - thresholds[None, :]).abs() <= err[:, None]
    return bool((near & (c[:, None] < 1)).any())


def _record(name, shape, c, eps, S0, S, sv_dW):
    norm2, fro = float(sv_dW[0]), float(sv_dW.norm())
    return {
        "name": name, "shape": list(shape), "k": len(c),
        "intruders": count(c, eps),
        "sweep": sweep(c),
        "max_cos": c.tolist(),
        "singular_values_W0": S0.tolist(), "singular_values_W": S.tolist(),
        "delta_norm_2": norm2, "delta_norm_fro": fro,
        # ‖ΔW‖_F² / ‖ΔW‖₂²; undefined (null) for a zero update
        "delta_stable_rank": fro ** 2 / norm2 ** 2 if norm2 > 0 else None,
    }


# ---------------------------------------------------------------- checkpoints
def _checkpoint_inputs(path):
    """(method, base hash, [(name, W0, ΔW)]) of a checkpoint built as a model (fft, head, bases that do not
    stream); CheckpointError if unreadable."""
    import adapters  # the adapters API (docs/CHECKPOINT.md); imported late, its package may be in flux

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    meta = adapters.read_meta(path)
    mats = adapters.matrices(path)  # loads the base, which checks it against the recorded hash
    if meta.get("base_model_hash"):
        return meta["method"], meta["base_model_hash"], mats
    # A plain PEFT LoRA directory records no base hash: key the cache by the W0s themselves.
    h = hashlib.sha256()
    for name, W0, _ in mats:
        h.update(f"{name}:{svd_cache.content_hash(W0)}".encode())
    return meta["method"], "w0-sha256:" + h.hexdigest(), mats


def _select(names, layers, path):
    if layers is None:
        return names
    chosen = [n for n in names if re.search(layers, n)]
    if not chosen:
        example = names[0] if names else "none"
        raise AdapterError(f"--layers {layers!r} matches none of the {len(names)} adapted matrices "
                           f"of {path} (e.g. {example!r})")
    return chosen


def _journal(directory, path, settings):
    """The resume journal (adapters.io.Journal) of one checkpoint's finished matrices under directory/.partial/, or
    None without a directory: one file per checkpoint (path, its files' sizes and mtimes) and settings, so a
    journal is only ever read back by the run it is of."""
    if directory is None:
        return None
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".json"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    fingerprint = dict(checkpoint=str(Path(path).resolve()), files=stamp, settings=settings)
    key = hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:24]
    return Journal(Path(directory) / ".partial" / f"{key}.jsonl", fingerprint)


def analyse_checkpoint(path, *, k=10, eps=0.5, side="left", layers=None, cache_dir=None,
                       progress=True, inputs=None, cache_dtype="float64", device=None, resume_dir=None,
                       verify_base=False):
    """Every adapted matrix of one checkpoint (filtered by the `layers` regex) → its record.

    A low-rank checkpoint streams (adapters.weights): W0 matrix by matrix from the base's safetensors, never the
    model; fft and head checkpoints (and bases that do not stream) are built as a model. inputs: (method, base
    hash, matrices) to use instead of reading `path` (tests, callers that already hold the matrices).
    resume_dir: where finished matrices are kept so a rerun resumes (None: no resume). A streamed checkpoint's
    result also has `seconds`: {matrix: wall time of reading W0, its base SVD (or cache read) and the analysis}.
    """
    if inputs is None:
        try:
            stream = weights.open_stream(path)
        except weights.NotStreamable:
            inputs = _checkpoint_inputs(path)
        else:
            if verify_base and stream.meta.get("base_model_hash"):
                weights.verify_base(path)
            return _analyse_stream(path, stream, k, eps, side, layers, cache_dir, progress, cache_dtype, device,
                                   resume_dir)
    method, base_hash, mats = inputs
    chosen = set(_select([t[0] for t in mats], layers, path))
    mats = [t for t in mats if t[0] in chosen]
    if not mats:
        raise CheckpointError(f"{path}: no adapted matrices")
    records, hits = [], 0
    for name, W0, dW in tqdm(mats, desc=f"spectral {Path(path).name}", unit="matrix",
                             disable=not progress):
        entry = svd_cache.open_base(W0, base_hash, name, side, cache_dir, cache_dtype, device=device)
        hits += entry.hit
        rec = analyse_matrix(name, W0, dW, k=k, eps=eps, side=side, base=(entry.rows().T, entry.singular_values))
        records.append(dict(rec, svd="full (torch.linalg.svd, float64)", max_cos_error=None,
                            base_vectors_read=len(entry.singular_values)))
    return {"path": str(path), "method": method, "base_model_hash": base_hash, "reader": "model",
            **summarise(records), "base_svd_cache_hits": hits, "layers": records}


def _analyse_stream(path, stream, k, eps, side, layers, cache_dir, progress, cache_dtype, device, resume_dir):
    names = _select(stream.names, layers, path)
    journal = _journal(resume_dir, path, [k, eps, side, cache_dtype, names])
    done = journal.done() if journal else {}
    records, hits, keys, times = [], 0, [], {}
    for name in tqdm(names, desc=f"spectral {Path(path).name}", unit="matrix", disable=not progress):
        if name in done:
            rec, key, hit, seconds = (done[name][f] for f in ("record", "w0", "hit", "seconds"))
        else:
            start = time.perf_counter()
            W0, B, A = stream.matrix(name)
            key = svd_cache.content_hash(W0)
            entry = svd_cache.open_base(W0, stream.meta.get("base_model_hash") or "", name, side, cache_dir,
                                        cache_dtype, device=device, key=key)
            hit = entry.hit
            if device is not None:
                W0, B, A = W0.to(device), B.to(device), A.to(device)
            rec = (analyse_lowrank(name, W0, B, A, k=k, eps=eps, side=side, base=entry) if k is not None
                   else _full(name, W0, B, A, k=k, eps=eps, side=side, base=entry))
            seconds = time.perf_counter() - start  # reading W0, its base SVD (or the cache), the analysis
            if journal:
                journal.add(name, {"record": rec, "w0": key, "hit": hit, "seconds": seconds})
        records.append(rec)
        times[name] = seconds
        keys.append((name, key))
        hits += hit
    base_hash = stream.meta.get("base_model_hash")
    if not base_hash:  # a plain PEFT LoRA directory records no base hash: the W0s' content stands for it
        base_hash = "w0-sha256:" + hashlib.sha256("".join(f"{n}:{h}" for n, h in keys).encode()).hexdigest()
    result = {"path": str(path), "method": stream.meta["method"], "base_model_hash": base_hash, "reader": "stream",
              **summarise(records), "base_svd_cache_hits": hits, "seconds": times, "layers": records}
    if journal:
        journal.finish()
    return result


def matrix_type(name):
    """'bert.encoder.layer.3.attention.self.query' → 'attention.self.query': the matrix without its layer."""
    return _layer_module(name)[1]


def summarise(records):
    """Totals over matrix records: counts at ε, the paper's ε-curve (average count per matrix at each ε of
    the grid), and the same per matrix type (query, value, ...). The one place these averages are taken:
    analyse_checkpoint over its matrices, the report over the matrices it compares across methods."""
    def over(rs):
        total = sum(r["intruders"] for r in rs)
        return {"num_matrices": len(rs), "total_intruders": total, "mean_intruders": total / len(rs),
                "sweep_total": [sum(r["sweep"][i] for r in rs) for i in range(len(EPS_GRID))],
                "sweep_mean": [sum(r["sweep"][i] for r in rs) / len(rs) for i in range(len(EPS_GRID))]}
    types = {}
    for r in records:
        types.setdefault(matrix_type(r["name"]), []).append(r)
    return {**over(records), "by_type": {t: over(rs) for t, rs in types.items()}}


def _recorded(config, spectrum_matrix):
    """spectral.json's "settings": the settings that shape the numbers (SpectralConfig's results=True fields),
    then what they imply (the ε grid, the SVD path, the definition) and the matrix of the spectrum figure."""
    return {**shaping(config),
            "eps_grid": list(EPS_GRID),
            "svd": ("torch.linalg.svd, float64, thin" if config.top_k == "all" else
                    "block Krylov on W0 + B A (float32, float64 where needed), each c_j certified to max_cos_error; "
                    "a full float64 SVD where a count stays undecided"),
            "one_tolerance": ONE_TOL,
            "definition": "c_j = max_i |<v_j(W), v_i(W0)>| for the top-k singular vectors of "
                          "W = W0 + dW; intruder when c_j < eps",
            "spectrum_matrix": spectrum_matrix}


def run(paths, config=None, **settings):
    """Analyse checkpoints; return the spectral.json dict, and write it + its table + figures to `out` if given.

    config: a SpectralConfig (default: its defaults), `settings` replacing its fields (top_k: an int or "all"/None;
    sweep: also draw the ε-sweep figure, the sweep counts are always in the JSON). Nothing is written unless every
    checkpoint was analysed; with `out`, finished matrices are kept under out/.partial/ until then, so a rerun of
    an interrupted run resumes per matrix. cache_dtype: the base-SVD cache's storage (svd_cache.DTYPES). device:
    where the SVDs run ("cuda").
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise AdapterError("no checkpoints given")
    c = make(SpectralConfig, config, **settings)
    if c.top_k is None:
        c = dataclasses.replace(c, top_k="all")
    c = check_config(check(c))
    k = None if c.top_k == "all" else c.top_k
    checkpoints = [analyse_checkpoint(p, k=k, eps=c.eps, side=c.vectors, layers=c.layers, cache_dir=c.cache_dir,
                                      progress=c.progress, cache_dtype=c.cache_dtype, device=c.device,
                                      resume_dir=c.out, verify_base=c.verify_base) for p in paths]
    result = {"settings": _recorded(c, _spectrum_matrix(checkpoints, c.spectrum_layer)), "checkpoints": checkpoints}
    if c.out is not None:
        # tables and figures first, the JSON last: a spectral.json present means the run completed
        tables = command.write_tables(c.out, "spectral", c.formats, {"md": markdown(result)})
        if tables:
            result["tables"] = [str(p) for p in tables]
        result["figures"] = [str(p) for p in plot_all(result, c.out, command.figure_formats(c.formats), c.sweep)]
        write_json(Path(c.out) / "spectral.json", result)
    return result


# ---------------------------------------------------------------- figures
def _top_k(s):
    """The recorded top-k of spectral.json's settings ("k" in files written before it was named top_k)."""
    return s["top_k"] if "top_k" in s else s["k"]


def _labels(checkpoints):
    """Legend label per checkpoint: the method's paper name, plus the directory when repeated."""
    methods = [c["method"] for c in checkpoints]
    return [style.label(m) + (f" ({Path(c['path']).name})" if methods.count(m) > 1 else "")
            for m, c in zip(methods, checkpoints)]


def plot_sweep(result, out, formats):
    import matplotlib.pyplot as plt
    s = result["settings"]
    fig, ax = plt.subplots()
    for c, lab in zip(result["checkpoints"], _labels(result["checkpoints"])):
        ax.plot(s["eps_grid"], c["sweep_mean"], label=lab, color=style.color(c["method"]),
                linestyle=style.linestyle(c["method"]), marker="o", markersize=2.5)
    ax.set_xlabel("threshold ε")
    ax.set_ylabel("intruders per adapted matrix")
    ax.set_title(("all" if _top_k(s) == "all" else f"top-{_top_k(s)}") + f" {s['vectors']} singular vectors of W")
    ax.set_xlim(0, 1.02)
    ax.legend(frameon=False)
    return style.save(fig, out, "intruders_sweep", formats)


def _layer_module(name):
    """'bert.encoder.layer.3.attention.self.query' → ('3', 'attention.self.query')."""
    m = re.match(r"^(?:.*?\.)?(\d+)\.(.+)$", name)
    return (m.group(1), m.group(2)) if m else ("–", name)


def plot_heatmap(result, out, formats):
    import matplotlib.pyplot as plt
    cks = result["checkpoints"]
    fig, axes = plt.subplots(1, len(cks), figsize=(3.2 * len(cks) + 0.8, 3.6), squeeze=False)
    vmax = max(max(r["intruders"] for r in c["layers"]) for c in cks) or 1
    for ax, c, lab in zip(axes[0], cks, _labels(cks)):
        cells = {_layer_module(r["name"]): r["intruders"] for r in c["layers"]}
        rows = sorted({r for r, _ in cells}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
        cols = list(dict.fromkeys(col for _, col in cells))  # forward order
        grid = np.full((len(rows), len(cols)), np.nan)
        for (r, col), v in cells.items():
            grid[rows.index(r), cols.index(col)] = v
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylabel("layer")
        ax.set_title(lab)
        ax.grid(False)
        if grid.size <= 144:  # numbers stay legible up to about 12 × 12 cells
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, int(v), ha="center", va="center", fontsize=6,
                            color="white" if v < vmax / 2 else "black")
    fig.colorbar(im, ax=axes[0].tolist(), label=f"intruders (ε = {result['settings']['eps']})")
    return style.save(fig, out, "intruders_heatmap", formats)


def _spectrum_matrix(checkpoints, spectrum_layer=None):
    """Name of the matrix the spectrum figure shows: the first analysed one matching the regex."""
    names = [r["name"] for r in checkpoints[0]["layers"]]
    if spectrum_layer is not None:
        names = [n for n in names if re.search(spectrum_layer, n)]
        if not names:
            raise AdapterError(f"--spectrum-layer {spectrum_layer!r} matches no analysed matrix "
                               f"of {checkpoints[0]['path']}")
    return names[0]


def plot_spectrum(result, out, formats):
    import matplotlib.pyplot as plt
    cks = result["checkpoints"]
    name = result["settings"]["spectrum_matrix"]
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(8.4, 3.2), layout="constrained")
    S0 = None
    for c, lab in zip(cks, _labels(cks)):
        rec = next((r for r in c["layers"] if r["name"] == name), None)
        if rec is None:
            continue
        S0, S = np.array(rec["singular_values_W0"]), np.array(rec["singular_values_W"])
        i = np.arange(1, len(S) + 1)  # the low-rank path knows W's top k singular values only
        kw = dict(color=style.color(c["method"]), linestyle=style.linestyle(c["method"]), label=lab)
        ax.plot(i, S, **kw)
        ax_d.plot(i, S - S0[:len(S)], **kw)
    ax.plot(np.arange(1, len(S0) + 1), S0, color="black", linewidth=0.9, label="W0")
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i")
    ax.set_title(name, fontsize=7)
    ax.legend(frameon=False)
    ax_d.axhline(0, color="black", linewidth=0.6)
    ax_d.set_xscale("log")
    ax_d.set_xlabel("index i")
    ax_d.set_ylabel("σ_i(W) − σ_i(W0)")
    return style.save(fig, out, "spectrum", formats)


def plot_totals(result, out, formats):
    import matplotlib.pyplot as plt
    by_method = {}
    for c in result["checkpoints"]:
        by_method.setdefault(c["method"], []).append(c["total_intruders"])
    methods = style.method_order(by_method)
    fig, ax = plt.subplots()
    for x, m in enumerate(methods):
        v = by_method[m]
        ax.bar(x, np.mean(v), color=style.color(m), width=0.7)
        if len(v) > 1:  # several checkpoints (seeds) of one method: the bar is their mean
            ax.plot([x] * len(v), v, "k.", markersize=4)
    ax.set_xticks(range(len(methods)), [style.label(m) for m in methods], rotation=30, ha="right")
    s = result["settings"]
    ax.set_ylabel(f"total intruders (top-{_top_k(s)}, ε = {s['eps']})")
    ax.grid(axis="x", visible=False)
    return style.save(fig, out, "intruders_total", formats)


def plot_all(result, out, formats=("png", "pdf"), sweep_figure=False):
    style.use()
    paths = []
    if sweep_figure:
        paths += plot_sweep(result, out, formats)
    paths += plot_heatmap(result, out, formats)
    paths += plot_spectrum(result, out, formats)
    paths += plot_totals(result, out, formats)
    return paths


# ---------------------------------------------------------------- CLI
def table(result):
    """Human-readable summary, one row per checkpoint."""
    s = result["settings"]
    head = f"{'method':<12} {'matrices':>8} {'intruders':>9} {'per matrix':>10} {'max ‖ΔW‖₂':>10}  path"
    lines = [f"top-{_top_k(s)} {s['vectors']} singular vectors, ε = {s['eps']}", head, "-" * len(head)]
    for c in result["checkpoints"]:
        n2 = max(r["delta_norm_2"] for r in c["layers"])
        lines.append(f"{style.label(c['method']):<12} {c['num_matrices']:>8} {c['total_intruders']:>9} "
                     f"{c['mean_intruders']:>10.3f} {n2:>10.4g}  {c['path']}")
    return "\n".join(lines)


def markdown(result):
    """The table of `table` in Markdown (spectral.md)."""
    s = result["settings"]
    lines = [f"Intruders among the top-{_top_k(s)} {s['vectors']} singular vectors of each adapted matrix, "
             f"ε = {s['eps']}.", "", "| method | matrices | intruders | per matrix | max ‖ΔW‖₂ | checkpoint |",
             "|---|---:|---:|---:|---:|---|"]
    for c in result["checkpoints"]:
        n2 = max(r["delta_norm_2"] for r in c["layers"])
        lines.append(f"| {style.label(c['method'])} | {c['num_matrices']} | {c['total_intruders']} | "
                     f"{c['mean_intruders']:.3f} | {n2:.4g} | {c['path']} |")
    return "\n".join(lines) + "\n"


def parser():
    p = command.parser("python -m analysis.spectral", __doc__, SpectralConfig)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    return p


@cli
def main(argv=None):
    config, args = command.parse(parser(), SpectralConfig, argv, renamed={"--k": "--top-k"})
    if config.out is None:
        config = dataclasses.replace(config, out="spectral")
    result = run(args["checkpoints"], config)
    print(table(result))
    print(f"wrote {Path(config.out) / 'spectral.json'} ({len(result.get('tables', []))} table and "
          f"{len(result['figures'])} figure files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
