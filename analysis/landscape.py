"""Loss landscapes around a fine-tuned checkpoint (docs/THEORY.md section 5, Li et al. 2018).

    python -m analysis.landscape CKPT [--dims 1|2] [--directions random|pca|to:CKPT2]
        [--space trainable|effective|all] [--parametrization trained|folded] [--matrices T ...]
        [--grid 21] [--range 1.0] [--split train|test] [--examples 256] [--seed S] [--out DIR]
        [--task T | --data FILE] [--n-train N] [--n-test N]      # a plain PEFT directory: the data to use

f(α, β) = L(θ* + α δ + β η), L the task's own loss over the chosen examples (adapters.tasks: the mean
per-example cross-entropy of a classifier, the per-token NLL of a causal LM's completions) of the checkpoint's
recorded task, or of --task / --data (a plain PEFT directory records none), evaluated in eval mode under
no_grad. The space and its parametrisation are analysis.spaces': the method's trained scalars as it trained them
(default), or `--space effective`, W0 + ΔW of the compared
matrices, where random directions are filter-normalised against the rows of W0, so every method of one
base model is perturbed along the very same directions. The segment `to:CKPT2` interpolates the merged
weights of the two checkpoints, θ(α) = (1 − α) θ_1 + α θ_2 over every tensor: α = 1 is CKPT2 itself even
when its frozen selectors or A differ. Parameters are perturbed in place and restored bit for bit
from one copy of θ* (no model copies per point). Long grids: a tqdm bar, partial results saved
atomically to DIR/landscape.partial*.json so a rerun with the same settings resumes, and points
sharded over torchrun processes (point k on rank k % world) then all-gathered.

Outputs in DIR: landscape.json (coords, loss/accuracy grids [i][j], center_loss, directions with
seeds and normalisation, settings, the space and its parametrisation, sharpness summaries), landscape_contour (2D,
trajectory overlay for PCA directions), landscape_surface (3D), landscape_1d (train and test curves).
"""
import json
import os
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adapters.errors import AdapterError, ArgumentParser, CheckpointError, cli
from adapters.evaluate import batch_loss, eval_mode
from adapters.taskspec import TASK_OPTIONS, add_task_arguments, checkpoint_score, examples_arg, task_options
from adapters.tasks import class_scores
from adapters.io import write_json
from analysis import directions as dirs
from analysis import spaces
from analysis.spaces import space_parameters  # noqa: F401  (the plain-model spaces, re-exported for callers)

DEFAULTS = dict(dims=2, directions="random", space="trainable", parametrization="trained", matrices=None, grid=21,
                range=1.0, split="train", examples=256, batch_size=32, seed=0, include_1d=False, out=None, fresh=False,
                device=None, save_every=10, progress=True, formats=("png", "pdf"), **dict.fromkeys(TASK_OPTIONS))
SPLITS = ("train", "test")


# ---- the loss oracle: (model, dict batches, the parameters to perturb) -------------------------

def evaluate(model, batches, score=class_scores):
    """The task's loss (Σ loss / Σ units) and accuracy over all batches (eval mode, no_grad)."""
    with eval_mode(model):
        return _evaluate(model, batches, score)


@torch.no_grad()
def _evaluate(model, batches, score=class_scores):
    total, correct, count = 0.0, 0.0, 0.0
    for b in batches:
        loss, c, n = batch_loss(model, b, score)
        total += float(loss)
        correct += c
        count += n
    return total / count, correct / count


def to_device(batches, device):
    return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]


class Perturbation:
    """θ ← θ* + α δ (+ β η) in place on `params`, from one saved copy of θ*; `restore` is exact.

    Each point costs one pass over the parameters: for two directions the row term θ* + α δ is
    kept in a buffer while β runs along the row (tasks come row by row), so a point is one
    fused add, θ = row + β η, computed the same way whatever the order (sharding stays bitwise).
    """

    def __init__(self, params, directions):
        self.params = list(params)
        self.center = [p.detach().clone() for p in self.params]
        self.directions = directions  # list (one per axis) of lists of float32 tensors
        self.fp32 = all(p.dtype == torch.float32 for p in self.params)
        self.row, self.row_alpha = None, None

    @torch.no_grad()
    def set(self, coords):
        if not self.fp32:  # low-precision weights: sum in fp32, round once
            for i, (p, c) in enumerate(zip(self.params, self.center)):
                t = c.float()
                for a, d in zip(coords, self.directions):
                    t = t + float(a) * d[i]
                p.copy_(t)
            return
        if len(coords) == 1:  # θ = θ* + α δ
            base, (a, d) = self.center, (coords[0], self.directions[0])
        elif coords[0] == 0:  # θ = θ* + β η
            base, (a, d) = self.center, (coords[1], self.directions[1])
        else:  # θ = (θ* + α δ) + β η, the row term cached
            if self.row_alpha != coords[0]:
                if self.row is None:
                    self.row = [torch.empty_like(c) for c in self.center]
                for r, c, dr in zip(self.row, self.center, self.directions[0]):
                    torch.add(c, dr, alpha=float(coords[0]), out=r)
                self.row_alpha = coords[0]
            base, (a, d) = self.row, (coords[1], self.directions[1])
        for i, (p, b) in enumerate(zip(self.params, base)):
            if a == 0:
                p.copy_(b)
            else:
                torch.add(b, d[i], alpha=float(a), out=p)

    @torch.no_grad()
    def restore(self):
        for p, c in zip(self.params, self.center):
            p.copy_(c)


# ---- the grid: resumable, sharded ------------------------------------------------------------

def _dist_info():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _key(split, index):
    return f"{split}:{','.join(map(str, index))}"


def _load_partials(out_dir, fingerprint, own):
    """(every point already evaluated with exactly these settings, from every partial file in out_dir;
    the points of the file `own` alone)."""
    done, mine = {}, {}
    for f in sorted(Path(out_dir).glob("landscape.partial*.json")):
        try:
            saved = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # written atomically, so unreadable means foreign: ignore it
        if saved.get("fingerprint") != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(saved.get("fingerprint", {}))
                          if fingerprint.get(k) != saved.get("fingerprint", {}).get(k))
            raise AdapterError(f"{f} holds a partial grid made with other settings ({', '.join(diff)}); "
                               "rerun with --fresh to discard it, or use another --out")
        points = {k: tuple(v) for k, v in saved["points"].items()}
        done.update(points)
        if f == own:
            mine = points
    return done, mine


def landscape_grid(model, params, directions, batches_by_split, coords, *, score=class_scores, out_dir=None,
                   fingerprint=None, save_every=10, progress=True, fresh=False):
    """Evaluate f on the grid coords[0] (× coords[1]) for every split in batches_by_split.

    `directions`: one or two directions (lists of float32 tensors matching `params`).

    Returns {split: {"loss": array, "accuracy": array}} with arrays indexed [i][j]. With out_dir,
    partial results go to out_dir/landscape.partial[.rankR].json every `save_every` points and
    are picked up again on the next call with the same fingerprint. Under torch.distributed, rank r
    evaluates the tasks k with k % world == r and the results are all-gathered.
    """
    dist, rank, world = _dist_info()
    shape = tuple(len(c) for c in coords)
    tasks = [(s, idx) for s in batches_by_split for idx in product(*(range(n) for n in shape))]
    partial = None
    if out_dir is not None:
        partial = Path(out_dir) / ("landscape.partial.json" if world == 1 else f"landscape.partial.rank{rank}.json")
        if fresh and rank == 0:
            for f in Path(out_dir).glob("landscape.partial*.json"):
                f.unlink()
        if dist is not None:
            dist.barrier()
    # Every rank reads every partial (to skip what any earlier run evaluated) but writes back only its own file's
    # points and those it evaluates itself; the barrier makes all ranks read before any rank writes, so no rank
    # picks up (and re-saves as its own) a file another rank is in the middle of filling.
    done, kept = {}, {}
    if out_dir is not None and Path(out_dir).exists():
        done, kept = _load_partials(out_dir, fingerprint, partial)
    if dist is not None and out_dir is not None:
        dist.barrier()
    mine = [t for k, t in enumerate(tasks) if k % world == rank and _key(*t) not in done]
    evaluated = {}

    def save():
        if partial is not None:
            points = {**kept, **evaluated}
            write_json(partial, {"fingerprint": fingerprint, "points": {k: list(v) for k, v in points.items()}})

    pert = Perturbation(params, directions)
    last_save, unsaved = time.monotonic(), 0
    try:
        with eval_mode(model), tqdm(total=len(mine), desc=f"landscape (rank {rank}/{world})" if world > 1
                                    else "landscape", disable=not progress or rank != 0) as bar:
            for split, idx in mine:
                pert.set([c[i] for c, i in zip(coords, idx)])
                evaluated[_key(split, idx)] = _evaluate(model, batches_by_split[split], score)  # eval mode set above
                bar.update(1)
                unsaved += 1
                if unsaved >= save_every or time.monotonic() - last_save > 60:
                    save()
                    last_save, unsaved = time.monotonic(), 0
    finally:
        pert.restore()
        if unsaved:
            save()
    gathered = [evaluated]
    if dist is not None:  # every rank read the same files; what is new is what each one evaluated
        gathered = [None] * world
        dist.all_gather_object(gathered, evaluated)
    for part in gathered:
        done.update(part)
    result = {}
    for split in batches_by_split:
        loss, acc = np.empty(shape), np.empty(shape)
        for idx in product(*(range(n) for n in shape)):
            loss[idx], acc[idx] = done[_key(split, idx)]
        result[split] = {"loss": loss, "accuracy": acc}
    return result


def grid_coords(grid, extent):
    """grid points symmetric about 0 with the centre exactly 0: extent · (2i/(grid−1) − 1)."""
    return [extent * (2 * i / (grid - 1) - 1) for i in range(grid)]


# ---- sharpness summaries from the grid ------------------------------------------------------

def sharpness(coords, loss):
    """Curvature along each direction at the centre (central second difference on the grid) and the loss rise at
    every grid radius ρ_k = k·h, from grid points only (nothing interpolated): the mean of f over the grid points
    at radius ρ_k (1D: ±ρ_k; 2D: the square ring max(|α|, |β|) = ρ_k) and the max over those within ρ_k, which
    holds the ring, so max_rise ≥ mean_rise. (A radius between grid points has no grid points of its own: a
    mean there would be interpolated while the max could only look at points nearer the centre.)"""
    loss = np.asarray(loss)
    c = (len(coords[0]) - 1) // 2
    center = float(loss[(c,) * loss.ndim])
    curv = []
    for axis, x in enumerate(coords):
        h = x[c + 1] - x[c]
        line = loss[tuple(slice(None) if a == axis else c for a in range(loss.ndim))]
        curv.append(float((line[c + 1] - 2 * line[c] + line[c - 1]) / h ** 2))
    # The grid index distance of every point from the centre, in the max norm: radius ρ_k holds the points at k.
    steps = np.max(np.abs(np.stack(np.meshgrid(*(np.arange(len(x)) - c for x in coords), indexing="ij"))), axis=0)
    rises = []
    for k in range(1, c + 1):
        ring, within = loss[steps == k], loss[steps <= k]
        rises.append({"radius": float(coords[0][c + k]), "mean_rise": float(ring.mean() - center),
                      "max_rise": float(within.max() - center), "points": int(ring.size)})
    ring = "±ρ" if loss.ndim == 1 else "the square ring max(|α|, |β|) = ρ"
    return {"curvature_at_center": curv, "loss_rise": rises,
            "definition": "curvature: (f(h)−2f(0)+f(−h))/h² along each axis, h = grid step; at every grid radius "
                          f"ρ = k·h: mean_rise = mean of f over the grid points at {ring} − f(0); max_rise = max of f "
                          "over the grid points within ρ − f(0); grid points only, nothing interpolated"}


# ---- figures -------------------------------------------------------------------------------

def _title(meta, space):
    from analysis import style
    method = meta.get("method", "") if meta else ""
    return f"{style.label(method)} ({space} parameters)" if method else f"{space} parameters"


def plot_2d(result, out_dir, formats):
    import matplotlib.pyplot as plt
    from analysis import style
    style.use()
    a, b = np.asarray(result["coords"][0]), np.asarray(result["coords"][1])
    Z = np.asarray(result["loss"]).T  # loss[i][j] = f(a_i, b_j); contour wants Z[y][x]
    fig, ax = plt.subplots()
    cs = ax.contour(a, b, Z, levels=20, cmap="viridis", linewidths=0.8)
    ax.clabel(cs, inline=True, fontsize=6, fmt="%.3g")
    traj = result.get("trajectory")
    if traj:
        xy = np.asarray(traj["coords"])
        ax.plot(xy[:, 0], xy[:, 1], "-o", color="tab:red", ms=2.5, lw=1, label="trajectory")
        ax.legend(loc="upper right")
    ax.plot([0], [0], "k*", ms=8)
    names = [d["kind"] for d in result["directions"]]
    ax.set_xlabel(f"α ({names[0]})")
    ax.set_ylabel(f"β ({names[1]})")
    ax.set_title(f"loss, {result['settings']['split']}: {result['title']}")
    ax.set_aspect("equal", adjustable="box")
    paths = style.save(fig, out_dir, "landscape_contour", formats)
    fig = plt.figure(figsize=(4.8, 4.0))
    ax = fig.add_subplot(projection="3d")
    A, B = np.meshgrid(a, b, indexing="xy")
    ax.plot_surface(A, B, Z, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss")
    ax.set_title(result["title"])
    return paths + style.save(fig, out_dir, "landscape_surface", formats)


def plot_1d(result, out_dir, formats):
    import matplotlib.pyplot as plt
    from analysis import style
    style.use()
    x = result["coords"][0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for split, ls in (("train", "-"), ("test", "--")):
        ax1.plot(x, result["curves"][split]["loss"], ls, label=split)
        ax2.plot(x, result["curves"][split]["accuracy"], ls, label=split)
    kind = result["directions"][0]["kind"]
    for ax, what in ((ax1, "loss"), (ax2, "accuracy")):
        ax.axvline(0, color="0.5", lw=0.6)
        ax.set_xlabel(f"α ({kind})" + (": 0 = CKPT, 1 = CKPT2" if kind == "segment" else ""))
        ax.set_ylabel(what)
        ax.legend()
    fig.suptitle(result["title"], fontsize=9)
    return style.save(fig, out_dir, "landscape_1d", formats)


# ---- checkpoints ---------------------------------------------------------------------------

def _settings(settings):
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise AdapterError(f"unknown landscape setting(s): {', '.join(sorted(unknown))}")
    s = {**DEFAULTS, **settings}
    if s["dims"] not in (1, 2):
        raise AdapterError(f"--dims must be 1 or 2, got {s['dims']!r}")
    if not isinstance(s["grid"], int) or s["grid"] < 2:
        raise AdapterError(f"--grid must be an integer ≥ 2, got {s['grid']!r}")
    if s["grid"] % 2 == 0:
        raise AdapterError(f"--grid must be odd so the checkpoint itself is the centre point, got {s['grid']}")
    if not s["range"] > 0:
        raise AdapterError(f"--range must be > 0, got {s['range']!r}")
    if s["split"] not in SPLITS:
        raise AdapterError(f"--split must be train or test, got {s['split']!r}")
    if s["examples"] is not None and (not isinstance(s["examples"], int) or s["examples"] < 1):
        raise AdapterError(f"--examples must be a positive integer or all, got {s['examples']!r}")
    if s["batch_size"] < 1:
        raise AdapterError(f"--batch-size must be ≥ 1, got {s['batch_size']}")
    d = s["directions"]
    if not (d in ("random", "pca") or (isinstance(d, str) and d.startswith("to:") and len(d) > 3)):
        raise AdapterError(f"--directions must be random, pca or to:CKPT2, got {d!r}")
    if d.startswith("to:") and s["dims"] != 1:
        raise AdapterError("--directions to:CKPT2 is the 1-D segment between two checkpoints; use --dims 1")
    if s["space"] not in spaces.SPACES or s["parametrization"] not in spaces.PARAMETRIZATIONS:
        raise AdapterError(f"--space must be one of {', '.join(spaces.SPACES)} and --parametrization one of "
                           f"{', '.join(spaces.PARAMETRIZATIONS)}, got {s['space']!r}, {s['parametrization']!r}")
    if d == "pca" and s["space"] == "effective":
        raise AdapterError("--directions pca needs --space trainable or all: the trajectory snapshots hold the "
                           "trained tensors, not W0 + ΔW")
    return s


def trajectory_files(ckpt):
    files = list(Path(ckpt, "trajectory").glob("step_*.safetensors"))
    return sorted(files, key=lambda f: int(f.stem.split("_")[1]))


def load_trajectory(ckpt, named, unfold=None):
    """Flat snapshots θ_e over the perturbed space, in step order; frozen parameters (not in the
    snapshots, never trained) keep their checkpoint values. Snapshots store B' = s·B as the checkpoint
    does; `unfold` = {parameter name: s} divides those by s, for the parametrisation as trained."""
    unfold = unfold or {}
    from safetensors.torch import load_file
    files = trajectory_files(ckpt)
    if not files:
        raise AdapterError(f"--directions pca needs trajectory snapshots ({ckpt}/trajectory/step_*.safetensors); "
                           "train with --save-trajectory N or use --directions random")
    steps, flats = [], []
    for f in files:
        snap = load_file(str(f))
        parts = []
        for name, p in named:
            if name in snap:
                if snap[name].shape != p.shape:
                    raise CheckpointError(f"{f}: {name} has shape {tuple(snap[name].shape)}, "
                                          f"the model has {tuple(p.shape)}")
                parts.append(snap[name].reshape(-1).float() / unfold.get(name, 1.0))
            elif p.requires_grad:
                raise CheckpointError(f"{f} lacks the trained parameter {name}")
            else:
                parts.append(p.detach().reshape(-1).float().cpu())
        steps.append(int(f.stem.split("_")[1]))
        flats.append(torch.cat(parts))
    return steps, flats


def _segment(ckpt, target, model):
    """(named parameters, direction θ_2 − θ_1) for the segment to checkpoint `target`, over merged weights.

    Interpolating only the trained tensors would keep CKPT's frozen selectors (or A) all along, so α = 1
    would not be CKPT2 for two rcla/asym runs. Both models are merged (each adapted layer becomes W0 + ΔW,
    analysis.spaces.merge), which gives them one layout whatever the methods, and every tensor that differs
    is interpolated; the rest is identical at every α and is left out.
    """
    import adapters
    meta1, meta2 = adapters.read_meta(ckpt), adapters.read_meta(target)
    h1, h2 = meta1.get("base_model_hash"), meta2.get("base_model_hash")
    if meta1.get("base_model") != meta2.get("base_model") or (h1 and h2 and h1 != h2):
        raise CheckpointError(f"to:{target} was fine-tuned from another base model "
                              f"({meta2.get('base_model')} {str(h2)[:12]} vs {meta1.get('base_model')} {str(h1)[:12]})")
    other = adapters.load(target)
    spaces.merge(model)
    spaces.merge(other)
    theirs, mine = dict(other.named_parameters()), dict(model.named_parameters())
    if set(theirs) != set(mine):
        extra = sorted(set(theirs) ^ set(mine))
        raise CheckpointError(f"to:{target} has another parameter layout than {ckpt} (e.g. {extra[0]})")
    named, d = [], []
    for name, p in mine.items():
        q = theirs[name]
        if q.shape != p.shape:
            raise CheckpointError(f"to:{target}: {name} has shape {tuple(q.shape)}, {ckpt} has {tuple(p.shape)}")
        diff = q.detach().float() - p.detach().float()
        if torch.count_nonzero(diff):
            named.append((name, p))
            d.append(diff)
    return named, d


def run(ckpt, **settings):
    """Compute the landscape of checkpoint `ckpt`; write DIR/landscape.json and figures; return the dict.

    Settings (defaults in DEFAULTS): dims, directions ("random" | "pca" | "to:CKPT2"), space,
    parametrization, matrices (compared matrices of the effective space), grid, range, split, examples (None = all),
    batch_size, seed, include_1d, out (default: ckpt), fresh, device, save_every, progress, formats.
    """
    s = _settings(settings)
    import adapters
    from adapters import evaluate as ev
    ckpt = str(ckpt)
    meta = adapters.read_meta(ckpt)
    out = Path(s["out"] or ckpt)
    if s["directions"] == "pca" and not trajectory_files(ckpt):
        load_trajectory(ckpt, [])  # raises the clear error before any model is loaded
    import torch.distributed as tdist
    own_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tdist.is_initialized():
        tdist.init_process_group("gloo")
        own_group = True
    try:
        _, rank, world = _dist_info()
        device = torch.device(s["device"] or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                              if torch.cuda.is_available() else "cpu"))
        model = adapters.load(ckpt).eval()
        kind = s["directions"]
        if kind.startswith("to:"):
            named, D = _segment(ckpt, kind[3:], model)
            space = {"space": "all", "matrices": None, "parametrization": {
                "name": "merged", "scale": None, "definition": "every weight with the updates merged (W0 + ΔW), "
                "interpolated tensor by tensor between the two checkpoints; tensors equal in both are left out"}}
            s = {**s, "space": "all", "parametrization": "merged"}  # what the segment moves, whatever was asked
        else:
            named, space = spaces.prepare(model, meta, s["space"], s["parametrization"], s["matrices"])
        model.to(device)
        weights = [p for _, p in named]

        trajectory = None
        if kind == "random":
            seeds = [s["seed"] + k for k in range(s["dims"])]
            # Effective space: filters normalised against W0's rows, so every method of one base model is
            # perturbed along the same directions; elsewhere against θ*'s own rows (Li et al.).
            reference = spaces.base_reference(ckpt, space["matrices"]) if s["space"] == "effective" else weights
            D = [[t.to(device) for t in dirs.random_direction(reference, sd, s["include_1d"])] for sd in seeds]
            info = [{"kind": "random", "seed": sd, "distribution": "gaussian N(0,1)", "normalisation": "filter",
                     "filter_reference": "W0" if s["space"] == "effective" else "θ*", "include_1d": s["include_1d"]}
                    for sd in seeds]
        elif kind == "pca":
            scale = space["parametrization"]["scale"] if space["parametrization"]["name"] == "trained" else None
            from adapters.inject import adapted_layers
            # the trained parametrisation's s per layer (spaces.as_trained: one s, or {layer: s})
            unfold = {f"{n}.B": scale[n] if isinstance(scale, dict) else scale
                      for n in adapted_layers(model)} if scale else {}
            steps, snaps = load_trajectory(ckpt, named, unfold)
            center = dirs.flatten([w.detach().cpu() for w in weights])
            flat, pinfo = dirs.pca_directions(snaps, center, s["dims"])
            D = [[t.to(device) for t in dirs.unflatten(f, [w.detach() for w in weights])] for f in flat]
            info = [{"kind": "pca", "component": k + 1, "snapshots": len(snaps),
                     "explained_variance_ratio": pinfo["explained_variance_ratio"][k],
                     "extent": pinfo["extent"][k], "normalisation": pinfo["normalisation"]}
                    for k in range(s["dims"])]
            xy, resid = dirs.project(snaps, center, flat)
            trajectory = {"steps": steps, "coords": xy.tolist(), "relative_residual": resid}
        else:
            D = [[t.to(device) for t in D]]
            info = [{"kind": "segment", "to": kind[3:], "normalisation": "none (α = 1 is CKPT2)"}]
        for d, i in zip(D, info):
            i["norm"] = float(dirs.flatten(d).norm())
        if len(D) == 2:
            f0, f1 = dirs.flatten(D[0]), dirs.flatten(D[1])
            cos = float(f0 @ f1 / (f0.norm() * f1.norm()).clamp_min(1e-30))
        splits = list(SPLITS) if s["dims"] == 1 else [s["split"]]
        splits = [s["split"]] + [x for x in splits if x != s["split"]]
        data = {k: s[k] for k in TASK_OPTIONS}  # the checkpoint's own task unless --task / --data name one
        batches = {sp: to_device(ev.checkpoint_batches(ckpt, sp, s["examples"], s["batch_size"], s["seed"], **data),
                                 device) for sp in splits}
        coords = [grid_coords(s["grid"], s["range"])] * s["dims"]
        recorded = {k: v for k, v in s.items() if k not in ("out", "progress", "device", "formats", "fresh",
                                                            "save_every")}
        fingerprint = {**recorded, "ckpt": str(Path(ckpt).resolve()),
                       "direction_norms": [round(i["norm"], 6) for i in info]}
        grids = landscape_grid(model, weights, D, batches, coords, score=checkpoint_score(ckpt), out_dir=out,
                               fingerprint=fingerprint,
                               save_every=s["save_every"], progress=s["progress"], fresh=s["fresh"])
        main_grid = grids[s["split"]]
        c = (s["grid"] - 1) // 2
        result = {
            "checkpoint": ckpt, "method": meta.get("method"), "title": _title(meta, s["space"]),
            "settings": recorded, **space, "space_parameters": sum(w.numel() for w in weights),
            "space_tensors": len(weights),
            "examples": {sp: sum(len(b["labels"]) for b in batches[sp]) for sp in splits},
            "coords": coords, "loss": main_grid["loss"].tolist(), "accuracy": main_grid["accuracy"].tolist(),
            "center_loss": float(main_grid["loss"][(c,) * s["dims"]]),
            "center_accuracy": float(main_grid["accuracy"][(c,) * s["dims"]]),
            "directions": info, "sharpness": sharpness(coords, main_grid["loss"]),
            "world_size": world,
        }
        if len(D) == 2:
            result["directions_cosine"] = cos
        if s["dims"] == 1:
            result["curves"] = {sp: {k: v.tolist() for k, v in g.items()} for sp, g in grids.items()}
        if trajectory:
            result["trajectory"] = trajectory
        if rank == 0:
            figs = plot_1d(result, out, s["formats"]) if s["dims"] == 1 else plot_2d(result, out, s["formats"])
            result["figures"] = [str(p) for p in figs]
            write_json(out / "landscape.json", result)
            for f in out.glob("landscape.partial*.json"):
                f.unlink()
        return result
    finally:
        if own_group:
            tdist.destroy_process_group()


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m analysis.landscape", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--dims", type=int, default=2, choices=(1, 2))
    p.add_argument("--directions", default="random", help="random | pca | to:CKPT2 (1-D segment)")
    p.add_argument("--space", default="trainable", choices=spaces.SPACES,
                   help="trainable: the method's trained scalars; effective: W0+ΔW of the compared matrices; all "
                        "(the segment to:CKPT2 always moves every merged weight)")
    p.add_argument("--parametrization", default="trained", choices=spaces.PARAMETRIZATIONS,
                   help="trained: B with the scale in the forward (as trained); folded: the stored B' = s·B")
    p.add_argument("--matrices", nargs="+", default=None, metavar="T",
                   help="--space effective: the compared matrices (names, suffixes, regexes or all-linear; "
                        "default: the adapted ones, or the architecture's default targets)")
    p.add_argument("--grid", type=int, default=21, help="points per axis (odd, so the centre is on the grid)")
    p.add_argument("--range", type=float, default=1.0, help="the grid covers [-range, range] per axis")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--examples", type=examples_arg, default=256, help="examples to evaluate (or all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="direction seeds are seed, seed+1; also the example subset")
    p.add_argument("--include-1d", action="store_true", help="perturb biases/norms too (each as one filter)")
    p.add_argument("--out", default=None, help="output directory (default: CKPT)")
    p.add_argument("--fresh", action="store_true", help="discard partial results from an earlier run")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    add_task_arguments(p)
    a = p.parse_args(argv)
    r = run(a.ckpt, **task_options(a), dims=a.dims, directions=a.directions, space=a.space,
            parametrization=a.parametrization, matrices=a.matrices, grid=a.grid, range=a.range,
            split=a.split, examples=a.examples, batch_size=a.batch_size, seed=a.seed, include_1d=a.include_1d,
            out=a.out, fresh=a.fresh, device=a.device, progress=not a.no_progress)
    if r.get("world_size", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        sh = r["sharpness"]
        print(f"center loss {r['center_loss']:.6g} (accuracy {r['center_accuracy']:.4f}) on "
              f"{r['examples'][a.split]} {a.split} examples, {r['space_parameters']} parameters "
              f"({r['space']} space, {r['parametrization']['name']})")
        print("| radius | mean rise | max rise |\n|---|---|---|")
        for x in sh["loss_rise"]:
            print(f"| {x['radius']:.3g} | {x['mean_rise']:.4g} | {x['max_rise']:.4g} |")
        print("curvature at centre per direction:", ", ".join(f"{c:.4g}" for c in sh["curvature_at_center"]))
        print(f"wrote {Path(a.out or a.ckpt) / 'landscape.json'}")
    return 0


if __name__ == "__main__":
    main()
