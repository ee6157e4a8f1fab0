"""Bounds for checkpoints: one row per checkpoint and the comparison across them (their tables: bounds.tables).

A row holds the MI bound (docs/THEORY.md §1) from the trained-scalar count P of the checkpoint, its
cross-check against the docs/METHODS.md formula, Theorem 1's Φ_ΔW and Φ_W0 from the spectral norms of
W0 and ΔW (§2), the paper's form Φ_W0 + sqrt(...), and the empirical gap from training_stats.json (or
measured on the data --task / --data name).
"""
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from adapters.errors import AdapterError, CheckpointError
from bounds.mi import formula_parameters, is_vacuous, mi_bound, sigma_from_range
from bounds.spectral_norm import check_device, lowrank_spectral_norm, spectral_norm
from bounds.stats import kendall_test
from bounds.theorem1 import theorem1

TRANSFORMER_NOTE = ("Theorem 1 treats the adapted linear maps, in forward order, as one chain with "
                    "everything between them a Lipschitz map of the given constant: an abstraction "
                    "for transformers, exact only for plain MLPs")


# -- σ: where the sub-Gaussian constant comes from (docs/THEORY.md §1) ---------------------------------

# Which per-example loss maxima of training_stats.json each --sigma-from reads. The default reads the training
# split alone: a bound's constant must not be fitted on the test data it is then compared with.
SIGMA_FROM = {"max-train-loss": ("train_loss_max",), "max-loss": ("train_loss_max", "test_loss_max")}


def resolve_sigma(stats, sigma=None, loss_clip=None, sigma_from=None):
    """σ from exactly one of --sigma, --loss-clip B, --sigma-from (default max-train-loss), as a dict:
    sigma, source (a label for every output), heuristic, and loss_max = b of the range [0, b] the bound
    assumes (the clip level, or the largest loss seen; None for a user-given σ)."""
    if sigma is not None:
        if not (sigma > 0 and math.isfinite(sigma)):
            raise AdapterError(f"--sigma must be a finite number > 0, got {sigma}")
        return dict(sigma=sigma, source=f"--sigma {sigma:g} (user-given)", heuristic=False, loss_max=None)
    if loss_clip is not None:
        return dict(sigma=sigma_from_range(loss_clip), heuristic=False, loss_max=float(loss_clip),
                    source=f"--loss-clip {loss_clip:g}: σ = B/2, the bound holds for the clipped loss "
                           f"min(ℓ, {loss_clip:g})")
    how = sigma_from or "max-train-loss"
    if how not in SIGMA_FROM:
        raise AdapterError(f"--sigma-from must be one of {', '.join(SIGMA_FROM)}, got {how!r}")
    keys = SIGMA_FROM[how]
    seen = {k: stats[k] for k in keys if stats and stats.get(k) is not None}
    if len(seen) < len(keys):
        raise AdapterError(f"no {' / '.join(keys)} in training_stats.json for --sigma-from {how}: "
                           "pass --sigma S or --loss-clip B")
    try:
        seen = {k: float(v) for k, v in seen.items()}
    except (TypeError, ValueError):
        raise CheckpointError(f"training_stats.json: loss maxima must be numbers, got {seen}") from None
    key = max(seen, key=seen.get)
    flag = f"--sigma-from {how}" if sigma_from else f"default (--sigma-from {how})"
    where = ("the largest per-example training loss" if how == "max-train-loss"
             else "the largest per-example loss seen, test split included: σ then depends on the test data")
    return dict(sigma=sigma_from_range(seen[key]), heuristic=True, loss_max=seen[key],
                source=f"HEURISTIC {flag}: σ = B/2 with B = {key} = {seen[key]:.4g}, {where}")


# -- the empirical gap of the loss the bound is about ------------------------------------------------

def per_example_losses(path, *, progress=False, device=None, **task_options):
    """{split: (per-example losses, their weights)} of the checkpoint's final weights on its task (its own, or the
    one `task_options` name: adapters.taskspec.TASK_OPTIONS), full train and test splits: this runs the model.

    An example's loss is its task's: cross-entropy for a classifier (weight 1), the mean NLL of its completion
    tokens for a causal LM (weight: their number), so the weighted mean is the split's loss in training_stats.
    """
    from adapters.taskspec import checkpoint_data
    return _evaluated(path, *checkpoint_data(path, **task_options), progress=progress, device=device)


def _evaluated(path, spec, the_task, *, progress=False, device=None):
    import torch
    import adapters
    from adapters import models
    from adapters.evaluate import row_scores, summary
    from adapters.tasks import get_task_type
    kind, model = get_task_type(spec["type"]), adapters.load(path)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    processor = models.load_processor(adapters.read_meta(path)["base_model"])
    out = {}
    for split in ("train", "test"):
        rows = getattr(the_task, split)
        r = summary(*zip(*row_scores(model, processor, rows, spec["max_length"], 64, kind, progress=(
            f"{Path(path).name}: {split} losses ({len(rows)} examples)" if progress else None))))
        out[split] = (r["losses"], r["units"])
    return out


def example_losses(path, *, progress=False, device=None, **task_options):
    """(per_example_losses, where they come from): those training recorded when they are of these very weights and
    this split of the same data (adapters.example_losses.recorded_losses), else the model run on both splits."""
    from adapters.taskspec import checkpoint_data
    from adapters.example_losses import recorded_losses
    spec, the_task = checkpoint_data(path, **task_options)
    losses, why = recorded_losses(path, spec)
    if losses is not None:
        return losses, why
    return _evaluated(path, spec, the_task, progress=progress, device=device), \
        f"the final weights evaluated on {spec['name']} ({why})"


def measured_stats(losses):
    """What bounds read from training_stats.json (n_train, n_test, {split}_loss, {split}_loss_max, the gap), from
    per-example losses {split: (losses, weights)}: the split losses are the weighted means, as the task's are."""
    stats = {}
    for split, (v, w) in losses.items():
        stats.update({f"n_{split}": len(v), f"{split}_loss": float(np.average(v, weights=w)),
                      f"{split}_loss_max": float(max(v))})
    stats["generalization_gap"] = stats["test_loss"] - stats["train_loss"]
    return stats


def clipped_gap(path, stats, b, *, measured=None, progress=False, device=None):
    """(Ĝ_b, how it was obtained): Ĝ_b = mean_test min(ℓ, b) − mean_train min(ℓ, b), the gap of the loss
    the bound holds for (means weighted as the task's loss is). Without a clip (user-given σ) it is None: Ĝ
    itself is then the gap in question. `measured`: (per-example losses, their source) already at hand; `device`:
    where the model runs when they are not (default: cuda if available, else cpu)."""
    if b is None:
        return None, "no clip level: σ is user-given, the bound is about Ĝ itself"
    gap = _gap(stats)
    maxima = [(stats or {}).get(k) for k in ("train_loss_max", "test_loss_max")]
    if gap is not None and None not in maxima and max(maxima) <= b:
        return gap, f"= Ĝ: no per-example loss exceeds b = {b:g} (largest {max(maxima):.4g})"
    if measured is None:
        try:
            measured = example_losses(path, progress=progress, device=device)
        except AdapterError as e:  # fabricated or foreign checkpoints: say why there is no value
            return None, f"not computed (per-example losses need the checkpoint's weights and task: {e})"
    losses, source = measured
    mean = {k: float(np.average(np.minimum(np.asarray(v, dtype=float), b), weights=w)) for k, (v, w) in losses.items()}
    return mean["test"] - mean["train"], f"per-example losses, {source}; clipped at b = {b:g}"


# -- trained scalars -------------------------------------------------------------------------------

def _peft_parameters(path):
    """For a plain PEFT LoRA directory: count the trained tensors (lora_A, lora_B, modules_to_save)."""
    from safetensors import SafetensorError, safe_open
    file = Path(path) / "adapter_model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if ".lora_" in k}
    except FileNotFoundError:
        raise CheckpointError(f"weights not found: {file}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {file}: {e}") from None
    layers = []
    for key, (r, m) in ((k, s) for k, s in shapes.items() if k.endswith(".lora_A.weight")):
        n = shapes.get(key.replace(".lora_A.", ".lora_B."), (None,))[0]
        if n is None:
            raise CheckpointError(f"corrupt adapter {path}: {key} has no lora_B")
        layers.append(dict(name=key[:-len(".lora_A.weight")], m=m, n=n, trained=r * (m + n)))
    if not layers:
        raise CheckpointError(f"corrupt adapter {path}: no LoRA weights in {file.name}")
    head = sum(math.prod(s) for k, s in shapes.items() if ".lora_" not in k)
    adapter = sum(layer["trained"] for layer in layers)
    bits = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16}.get(dtypes.pop() if len(dtypes) == 1 else None, 32)
    return dict(layers=layers, adapter=adapter, head=head, other=0, total=adapter + head), bits


def parameter_counts(path, meta):
    """(counts as in adapters.trained_parameters, bits, formula adapter count, formula_match)."""
    if meta.get("peft"):
        counts, bits = _peft_parameters(path)
    else:
        counts, bits = meta.get("parameters"), meta.get("bits")
        if not isinstance(counts, dict) or not {"layers", "adapter", "head", "total"} <= set(counts):
            raise CheckpointError(f"{path}: adapters_meta.json has no valid 'parameters' entry")
    try:
        layers = [(int(layer["m"]), int(layer["n"])) for layer in counts["layers"]]
        totals = {k: int(counts.get(k, 0)) for k in ("adapter", "head", "other", "total")}
        counts = dict(layers=counts["layers"], **totals)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: adapters_meta.json 'parameters' needs integer counts "
                              "and m, n per layer") from None
    method, rank, k = meta.get("method"), meta.get("rank"), meta.get("chain_length", 1)
    if method not in ("fft", "head") and not (isinstance(rank, int) and isinstance(k, int)):
        raise CheckpointError(f"{path}: adapters_meta.json needs integer rank and chain_length for {method!r}")
    formula = formula_parameters(method, rank, k, layers)
    # fft: the formula counts the weight matrices only; biases and norms sit in "other".
    match = None if method == "fft" else formula == counts["adapter"]
    return counts, bits, formula, match


# -- Theorem 1 inputs: a_l = ‖W0^l‖₂, b_l = ‖ΔW^l‖₂ ------------------------------------------------

def layer_norms(path, *, device=None, cache_dir=None):
    """[(name, a_l, b_l)] in forward order; b_l by the r×r trick where the update is low rank.

    A low-rank checkpoint streams (adapters.weights: W0 matrix by matrix from the base's safetensors, never the
    model); a_l = ‖W0‖₂ by certified block Krylov (bounds.spectral_norm), kept per W0's content (norm_cache_dir)
    so an interrupted run resumes per matrix and every checkpoint of one base reuses them. fft and head
    checkpoints are built as a model (their ΔW is dense).
    """
    import adapters
    from adapters import weights
    check_device(device, "--device")
    try:
        stream = weights.open_stream(path)
    except weights.NotStreamable:
        factors = adapters.lowrank_factors(path)
        return [(name, base_norm(W0, device=device, cache_dir=cache_dir),
                 lowrank_spectral_norm(*factors[name]) if name in factors else spectral_norm(dW, device=device))
                for name, W0, dW in tqdm(adapters.matrices(path), desc="spectral norms", leave=False, disable=None)]
    out = []
    for name in tqdm(stream.names, desc=f"spectral norms {Path(path).name}", unit="matrix", leave=False,
                     disable=None):
        W0, B, A = stream.matrix(name)
        out.append((name, base_norm(W0, device=device, cache_dir=cache_dir), lowrank_spectral_norm(B, A)))
    return out


def norm_cache_dir():
    """$BEYOND_LORA_CACHE/norms, else ~/.cache/beyond-lora/norms."""
    import os
    env = os.environ.get("BEYOND_LORA_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "beyond-lora") / "norms"


def base_norm(W0, *, device=None, cache_dir=None):
    """‖W0‖₂ (spectral_norm), read from / written to a small per-matrix cache keyed by W0's bytes."""
    import json
    from adapters.io import write_json
    from adapters.weights import content_hash
    file = Path(cache_dir or norm_cache_dir()) / f"spectral-norm-v2-{content_hash(W0)[:32]}.json"
    try:
        return float(json.loads(file.read_text())["spectral_norm"])
    except (OSError, ValueError, KeyError, TypeError):  # a miss (or a corrupt entry): computed below
        pass
    value = spectral_norm(W0, device=device)
    try:
        write_json(file, {"spectral_norm": value, "shape": list(W0.shape), "dtype": str(W0.dtype)})
    except OSError:  # the cache only saves time
        pass
    return value


def theorem1_terms(path, *, act_lipschitz, input_bound, loss_lipschitz, act_zero_norm, convention, device=None):
    try:
        norms = layer_norms(path, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (Theorem 1 needs the weights; --no-theorem1 skips it)") from None
    settings = dict(convention=convention, act_lipschitz=act_lipschitz, act_zero_norm=act_zero_norm,
                    input_bound=input_bound, loss_lipschitz=loss_lipschitz, note=TRANSFORMER_NOTE)
    if not norms:
        return dict(settings, layers=0, skipped="no adapted matrices")
    a = [x[1] for x in norms]
    b = [x[2] for x in norms]
    t = theorem1(a, b, act_lipschitz, act_zero_norm, input_bound, loss_lipschitz, convention)
    return dict(settings, **t, norms=[dict(name=n, base=x, delta=y) for n, x, y in norms])


# -- one checkpoint ---------------------------------------------------------------------------------

def checkpoint_row(path, *, sigma=None, loss_clip=None, sigma_from=None, n_examples=None, bits=None,
                   theorem1_options=None, task_options=None, progress=False, device=None):
    """Everything the report shows for one checkpoint, as a JSON-ready dict.

    `task_options` (adapters.taskspec.TASK_OPTIONS, any given): the statistics (|N|, losses, maxima, Ĝ) are
    measured on the data they name instead of read from training_stats.json. `device`: where the model runs when
    per-example losses must be computed (default: cuda if available, else cpu); Theorem 1's norms run where
    `theorem1_options["device"]` says."""
    import adapters
    path = str(path)
    meta = adapters.read_meta(path)
    stats_file = Path(path) / "training_stats.json"
    stats = adapters.read_stats(path) if stats_file.exists() else None
    if stats is not None and not isinstance(stats, dict):
        raise CheckpointError(f"corrupt training statistics {stats_file}: not a JSON object")
    measured, gap_source = None, "training_stats.json" if stats is not None else None
    if any(v is not None for v in (task_options or {}).values()):
        measured = example_losses(path, progress=progress, device=device, **task_options)
        stats, gap_source = measured_stats(measured[0]), f"measured from per-example losses: {measured[1]}"
    elif stats is None:  # a plain PEFT directory: ask for everything it lacks at once, by flag
        needs = ([] if n_examples is not None else ["--n-examples N (|N|, the training examples)"]) + \
                ([] if sigma is not None or loss_clip is not None else ["--sigma S or --loss-clip B"])
        if needs:
            raise CheckpointError(f"{path} has no training statistics ({stats_file.name}): pass {' and '.join(needs)}, "
                                  "or --task / --data to measure them on the training data")
    if n_examples is None:
        if stats is None:
            raise CheckpointError(f"{path}: no training_stats.json; pass --n-examples N")
        n_examples = stats.get("n_train")
        if not isinstance(n_examples, int):
            raise CheckpointError(f"{path}: training_stats.json has no integer n_train; pass --n-examples N")
    if n_examples <= 0:
        raise AdapterError(f"number of training examples must be > 0, got {n_examples}")
    counts, meta_bits, formula, match = parameter_counts(path, meta)
    q = bits if bits is not None else meta_bits
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not (q > 0 and math.isfinite(q)):
        raise AdapterError(f"{path}: bits per trained scalar must be > 0, got {q!r}")
    sig = resolve_sigma(stats, sigma, loss_clip, sigma_from)
    s, b = sig["sigma"], sig["loss_max"]
    P = int(counts["total"])
    extra = P - int(counts["adapter"])  # head + anything else trained: part of P in both counts
    row = dict(
        path=path, method=meta.get("method"), rank=meta.get("rank"), chain_length=meta.get("chain_length", 1),
        n_train=int(n_examples), n_test=(stats or {}).get("n_test"), bits=q, sigma=s,
        sigma_source=sig["source"], sigma_heuristic=sig["heuristic"], loss_range=None if b is None else [0.0, b],
        trained_parameters=P, adapter_parameters=int(counts["adapter"]), head_parameters=int(counts["head"]),
        other_parameters=int(counts.get("other", 0)), formula_adapter_parameters=formula,
        formula_match=match, mi_bound=mi_bound(P, n_examples, s, q),
        mi_bound_formula=mi_bound((formula if meta.get("method") != "fft" else 0) + extra, n_examples, s, q),
        empirical_gap=_gap(stats), train_loss=(stats or {}).get("train_loss"),
        test_loss=(stats or {}).get("test_loss"), theorem1=None, paper_bound=None, log10_paper_bound=None,
        paper_bound_vacuous=None)
    row["vacuous"] = is_vacuous(row["mi_bound"], b)
    row["gap_source"] = gap_source
    row["clipped_gap"], row["clipped_gap_source"] = clipped_gap(path, stats, b, measured=measured, progress=progress,
                                                                device=device)
    if theorem1_options is not None:
        t = theorem1_terms(path, **theorem1_options)
        row["theorem1"] = t
        if t.get("layers"):
            # Paper's form: G ≤ G(ΔW) + Φ_W0 with G(ΔW) ≤ the square-root (MI) term.
            log10 = _log10_sum(t["log10_phi_base"], math.log10(row["mi_bound"]) if row["mi_bound"] > 0 else -math.inf)
            row["log10_paper_bound"] = log10
            row["paper_bound"] = 10.0 ** log10 if log10 < 308 else math.inf
            row["paper_bound_vacuous"] = is_vacuous(row["paper_bound"], b)
    return row


def _gap(stats):
    """Ĝ = L_test − L_train (signed) from training_stats.json, None when it is not there."""
    if not stats:
        return None
    if stats.get("generalization_gap") is not None:
        return float(stats["generalization_gap"])
    if stats.get("test_loss") is not None and stats.get("train_loss") is not None:
        return float(stats["test_loss"]) - float(stats["train_loss"])
    return None


def _log10_sum(x, y):
    """log10(10^x + 10^y) without overflow."""
    hi, lo = max(x, y), min(x, y)
    return hi if lo == -math.inf else hi + math.log10(1.0 + 10.0 ** (lo - hi))


# -- several checkpoints -----------------------------------------------------------------------------

def kendall(rows, key):
    """Kendall τ between the ordering by `key` and by the empirical gap, over rows that have both
    (bounds.stats.kendall_test: τ, scipy's p-value of τ = 0, n, distinct values, informative)."""
    pairs = [(r[key], r["empirical_gap"]) for r in rows
             if r.get(key) is not None and r["empirical_gap"] is not None]
    return kendall_test(*zip(*pairs)) if pairs else kendall_test([], [])


def ties_note(name, distinct, n):
    """Where τ is shown: a diagnostic with fewer distinct values than items ties pairs, which τ-b counts as
    neither concordant nor discordant. The MI bound depends on P alone (|N|, σ, q shared), so methods with
    equal trained-scalar counts always tie."""
    if distinct >= n:
        return ""
    why = " (it depends on the trained-scalar count P alone)" if name == "MI bound" else ""
    return f"{name} takes {distinct} distinct values over {n}{why}; tied pairs count for neither ordering (τ-b)"


def compare(rows):
    """Rank agreement of each bound with the empirical gap (None for a single checkpoint)."""
    if len(rows) < 2:
        return None
    return {"mi_bound": kendall(rows, "mi_bound"), "paper_bound": kendall(rows, "log10_paper_bound")}
