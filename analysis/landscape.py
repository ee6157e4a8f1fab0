"""Loss landscapes around a fine-tuned checkpoint (docs/THEORY.md section 5, Li et al. 2018).

    python -m analysis.landscape CKPT [--dims 1|2] [--directions random|pca|to:CKPT2]
        [--space trainable|effective|all] [--parametrization trained|folded] [--matrices T ...]
        [--grid 21] [--range 1.0] [--split train|test] [--examples 256] [--seed S] [--out DIR]
        [--formats png,pdf] [--device cuda] [--config FILE.yaml]
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
from one copy of θ* (no model copies per point). Long grids: a tqdm bar, each point appended to a resume journal
(DIR/landscape.partial*.jsonl, adapters.io.Journal) so a rerun with the same settings resumes, and points
sharded over torchrun processes (point k on rank k % world) then all-gathered.

Outputs in DIR: landscape.json (coords, loss/accuracy grids [i][j], center_loss, directions with
seeds and normalisation, settings, the space and its parametrisation, sharpness summaries), landscape_contour (2D,
trajectory overlay for PCA directions), landscape_surface (3D), landscape_1d (train and test curves), in the
figure formats of --formats. From Python: `run(ckpt, config=None, **settings)` (the settings of LandscapeConfig).
"""
import dataclasses
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from adapters import command
from adapters.errors import AdapterError, CheckpointError, cli
from adapters.evaluate import batch_loss, eval_mode
from adapters.settings import AT_LEAST_1, POSITIVE, Check, check, make, setting, shaping
from adapters.taskspec import DataChoice, checkpoint_score, examples_arg, task_options
from adapters.tasks import class_scores
from adapters.io import Journal, write_json
from analysis import directions as dirs
from analysis import spaces
from analysis.spaces import space_parameters  # noqa: F401  (the plain-model spaces, re-exported for callers)

SPLITS = ("train", "test")
# The settings analysis.landscape and analysis.hessian share (the space, the examples), one wording.
SPACE_HELP = "trainable: the method's trained scalars; effective: W0+ΔW of the compared matrices; all"
PARAMETRIZATION_HELP = "trained: B with the scale in the forward (as trained); folded: the stored B' = s·B"
MATRICES_HELP = ("--space effective: the compared matrices (names, suffixes, regexes or all-linear; default: the "
                 "adapted ones, or the architecture's default targets)")
EXAMPLES_HELP = "examples to evaluate, or all"


@dataclass(frozen=True)
class LandscapeConfig(DataChoice):
    """The settings of analysis.landscape: each field is a flag (python -m analysis.landscape --help) and a keyword
    of run(); those with results=True are landscape.json's "settings" (and key the partial grid a rerun resumes)."""
    dims: int = setting(2, "1: a curve (train and test); 2: a surface (--split)", choices=(1, 2))
    directions: str = setting("random", "random | pca | to:CKPT2 (the 1-D segment to another checkpoint)")
    space: str = setting("trainable", SPACE_HELP + " (the segment to:CKPT2 always moves every merged weight)",
                         choices=spaces.SPACES)
    parametrization: str = setting("trained", PARAMETRIZATION_HELP, choices=spaces.PARAMETRIZATIONS)
    matrices: Optional[list[str]] = setting(None, MATRICES_HELP, metavar="T")
    grid: int = setting(21, "points per axis, odd so the checkpoint itself is the centre point",
                        check=Check("odd and >= 3, so the checkpoint itself is the centre point",
                                    lambda v: isinstance(v, int) and v >= 3 and v % 2 == 1))
    range: float = setting(1.0, "the grid covers [-range, range] per axis", check=POSITIVE)
    split: str = setting("train", "the examples of the 2-D surface (1-D curves take both)", choices=SPLITS)
    examples: Optional[int] = setting(256, EXAMPLES_HELP, check=AT_LEAST_1, type=examples_arg)
    batch_size: int = setting(32, "examples per forward pass", check=AT_LEAST_1)
    seed: int = setting(0, "direction seeds are seed, seed+1; also the example subset")
    include_1d: bool = setting(False, "perturb biases/norms too (each as one filter)")
    out: Optional[str] = command.out(None, "landscape.json and its figures (default: CKPT)")
    fresh: bool = setting(False, "discard partial results from an earlier run", results=False)
    save_every: int = setting(10, "put the resume journal on disk (fsync) every N points; each point is appended as "
                              "it finishes", check=AT_LEAST_1, results=False)
    device: Optional[str] = command.device("the model runs")
    progress: bool = setting(True, "no progress bar", results=False, flag="--no-progress")
    formats: tuple = command.formats(("png", "pdf"))


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


def journal_file(out_dir, rank=0, world=1):
    """Rank `rank`'s resume journal (adapters.io.Journal) of grid points in out_dir."""
    return Path(out_dir) / ("landscape.partial.jsonl" if world == 1 else f"landscape.partial.rank{rank}.jsonl")


def _done_points(out_dir, fingerprint):
    """Every point already evaluated with exactly these settings, from every rank's journal in out_dir."""
    done = {}
    for f in sorted(Path(out_dir).glob("landscape.partial*.jsonl")):
        done.update({k: tuple(v) for k, v in Journal(f, fingerprint).done().items()})
    return done


def landscape_grid(model, params, directions, batches_by_split, coords, *, score=class_scores, out_dir=None,
                   fingerprint=None, save_every=10, progress=True, fresh=False):
    """Evaluate f on the grid coords[0] (× coords[1]) for every split in batches_by_split.

    `directions`: one or two directions (lists of float32 tensors matching `params`).

    Returns {split: {"loss": array, "accuracy": array}} with arrays indexed [i][j]. With out_dir, each point is
    appended to the resume journal out_dir/landscape.partial[.rankR].jsonl as it finishes (on disk every
    `save_every` points; adapters.io.Journal) and picked up again on the next call with the same fingerprint.
    Under torch.distributed, rank r evaluates the tasks k with k % world == r and the results are all-gathered.
    """
    dist, rank, world = _dist_info()
    shape = tuple(len(c) for c in coords)
    tasks = [(s, idx) for s in batches_by_split for idx in product(*(range(n) for n in shape))]
    journal = Journal(journal_file(out_dir, rank, world), fingerprint) if out_dir is not None else None
    if out_dir is not None:
        if fresh and rank == 0:
            for f in Path(out_dir).glob("landscape.partial*"):
                f.unlink()
        if dist is not None:
            dist.barrier()
    # Every rank reads every journal (to skip what any earlier run evaluated) and appends only the points it
    # evaluates itself to its own; the barrier makes all ranks read before any rank writes.
    done = _done_points(out_dir, fingerprint) if out_dir is not None and Path(out_dir).exists() else {}
    if dist is not None and out_dir is not None:
        dist.barrier()
    mine = [t for k, t in enumerate(tasks) if k % world == rank and _key(*t) not in done]
    evaluated = {}

    pert = Perturbation(params, directions)
    try:
        with eval_mode(model), tqdm(total=len(mine), desc=f"landscape (rank {rank}/{world})" if world > 1
                                    else "landscape", disable=not progress or rank != 0) as bar:
            for split, idx in mine:
                pert.set([c[i] for c, i in zip(coords, idx)])
                key = _key(split, idx)
                evaluated[key] = _evaluate(model, batches_by_split[split], score)  # eval mode set above
                if journal is not None:
                    journal.add(key, list(evaluated[key]), sync_every=save_every)
                bar.update(1)
    finally:
        pert.restore()
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

def check_config(config):
    """What the fields' ranges cannot say: the directions, and which go with which dims and space."""
    d = config.directions
    if not (d in ("random", "pca") or (isinstance(d, str) and d.startswith("to:") and len(d) > 3)):
        raise AdapterError(f"--directions must be random, pca or to:CKPT2, got {d!r}")
    if d.startswith("to:") and config.dims != 1:
        raise AdapterError("--directions to:CKPT2 is the 1-D segment between two checkpoints; use --dims 1")
    if d == "pca" and config.space == "effective":
        raise AdapterError("--directions pca needs --space trainable or all: the trajectory snapshots hold the "
                           "trained tensors, not W0 + ΔW")
    return config


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


@contextmanager
def _process_group():
    """Under torchrun (WORLD_SIZE > 1) without a process group yet: a gloo group for the run, destroyed after."""
    import torch.distributed as tdist
    own = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tdist.is_initialized()
    if own:
        tdist.init_process_group("gloo")
    try:
        yield
    finally:
        if own:
            tdist.destroy_process_group()


def run(ckpt, config=None, **settings):
    """Compute the landscape of checkpoint `ckpt`; write DIR/landscape.json and figures; return the dict.

    config: a LandscapeConfig (default: its defaults), `settings` replacing its fields: dims, directions ("random" |
    "pca" | "to:CKPT2"), space, parametrization, matrices (compared matrices of the effective space), grid, range,
    split, examples (None = all), batch_size, seed, include_1d, out (default: ckpt), fresh, device, save_every,
    progress, formats, and the data (task, data_file, n_train, ...: default the checkpoint's).
    The steps: the space (the parameters moved), the directions, the examples, the grid (landscape_grid, resumable
    and sharded over processes), the result and its figures.
    """
    c = check_config(check(make(LandscapeConfig, config, **settings)))
    import adapters
    from adapters import evaluate as ev
    ckpt = str(ckpt)
    meta = adapters.read_meta(ckpt)
    out = Path(c.out or ckpt)
    if c.directions == "pca" and not trajectory_files(ckpt):
        load_trajectory(ckpt, [])  # raises the clear error before any model is loaded
    with _process_group():
        _, rank, world = _dist_info()
        device = torch.device(c.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                           if torch.cuda.is_available() else "cpu"))
        model = adapters.load(ckpt).eval()
        if c.directions.startswith("to:"):
            named, D = _segment(ckpt, c.directions[3:], model)
            space = {"space": "all", "matrices": None, "parametrization": {
                "name": "merged", "scale": None, "definition": "every weight with the updates merged (W0 + ΔW), "
                "interpolated tensor by tensor between the two checkpoints; tensors equal in both are left out"}}
            # what the segment moves, whatever was asked
            c = dataclasses.replace(c, space="all", parametrization="merged")
            D, info, trajectory = [[t.to(device) for t in D]], [
                {"kind": "segment", "to": c.directions[3:], "normalisation": "none (α = 1 is CKPT2)"}], None
        else:
            named, space = spaces.prepare(model, meta, c.space, c.parametrization, c.matrices)
        model.to(device)
        weights = [p for _, p in named]
        if not c.directions.startswith("to:"):
            D, info, trajectory = _directions(c, ckpt, model, named, space, device)
        for d, i in zip(D, info):
            i["norm"] = float(dirs.flatten(d).norm())
        splits = list(SPLITS) if c.dims == 1 else [c.split]
        splits = [c.split] + [x for x in splits if x != c.split]
        # the checkpoint's own task unless --task / --data name one
        batches = {sp: to_device(ev.checkpoint_batches(ckpt, sp, c.examples, c.batch_size, c.seed,
                                                       **task_options(c)), device) for sp in splits}
        coords = [grid_coords(c.grid, c.range)] * c.dims
        recorded = shaping(c)  # the settings that shape the numbers (LandscapeConfig's results=True fields)
        fingerprint = {**recorded, "ckpt": str(Path(ckpt).resolve()),
                       "direction_norms": [round(i["norm"], 6) for i in info]}
        grids = landscape_grid(model, weights, D, batches, coords, score=checkpoint_score(ckpt), out_dir=out,
                               fingerprint=fingerprint, save_every=c.save_every, progress=c.progress, fresh=c.fresh)
        result = _result(c, ckpt, meta, space, weights, D, info, trajectory, batches, coords, grids, world)
        if rank == 0:
            formats = command.figure_formats(c.formats)
            figs = plot_1d(result, out, formats) if c.dims == 1 else plot_2d(result, out, formats)
            result["figures"] = [str(p) for p in figs]
            write_json(out / "landscape.json", result)
            for f in out.glob("landscape.partial*"):  # the journals (and any of an older format)
                f.unlink()
        return result


def _directions(c, ckpt, model, named, space, device):
    """(the directions, what each is, the trajectory projected on them or None): `random` Gaussian directions,
    filter-normalised, from seeds seed, seed+1; `pca` the top components of the saved trajectory."""
    weights = [p for _, p in named]
    if c.directions == "random":
        seeds = [c.seed + k for k in range(c.dims)]
        # Effective space: filters normalised against W0's rows, so every method of one base model is perturbed
        # along the same directions; elsewhere against θ*'s own rows (Li et al.).
        reference = spaces.base_reference(ckpt, space["matrices"]) if c.space == "effective" else weights
        D = [[t.to(device) for t in dirs.random_direction(reference, sd, c.include_1d)] for sd in seeds]
        info = [{"kind": "random", "seed": sd, "distribution": "gaussian N(0,1)", "normalisation": "filter",
                 "filter_reference": "W0" if c.space == "effective" else "θ*", "include_1d": c.include_1d}
                for sd in seeds]
        return D, info, None
    scale = space["parametrization"]["scale"] if space["parametrization"]["name"] == "trained" else None
    from adapters.inject import adapted_layers
    # the trained parametrisation's s per layer (spaces.as_trained: one s, or {layer: s})
    unfold = {f"{n}.B": scale[n] if isinstance(scale, dict) else scale
              for n in adapted_layers(model)} if scale else {}
    steps, snaps = load_trajectory(ckpt, named, unfold)
    center = dirs.flatten([w.detach().cpu() for w in weights])
    flat, pinfo = dirs.pca_directions(snaps, center, c.dims)
    D = [[t.to(device) for t in dirs.unflatten(f, [w.detach() for w in weights])] for f in flat]
    info = [{"kind": "pca", "component": k + 1, "snapshots": len(snaps),
             "explained_variance_ratio": pinfo["explained_variance_ratio"][k],
             "extent": pinfo["extent"][k], "normalisation": pinfo["normalisation"]}
            for k in range(c.dims)]
    xy, resid = dirs.project(snaps, center, flat)
    return D, info, {"steps": steps, "coords": xy.tolist(), "relative_residual": resid}


def _result(c, ckpt, meta, space, weights, D, info, trajectory, batches, coords, grids, world):
    """landscape.json's content: the grids of the chosen split, the centre, the directions, the sharpness."""
    main_grid = grids[c.split]
    mid = (c.grid - 1) // 2
    result = {
        "checkpoint": ckpt, "method": meta.get("method"), "title": _title(meta, c.space),
        "settings": shaping(c), **space, "space_parameters": sum(w.numel() for w in weights),
        "space_tensors": len(weights),
        "examples": {sp: sum(len(b["labels"]) for b in bs) for sp, bs in batches.items()},
        "coords": coords, "loss": main_grid["loss"].tolist(), "accuracy": main_grid["accuracy"].tolist(),
        "center_loss": float(main_grid["loss"][(mid,) * c.dims]),
        "center_accuracy": float(main_grid["accuracy"][(mid,) * c.dims]),
        "directions": info, "sharpness": sharpness(coords, main_grid["loss"]),
        "world_size": world,
    }
    if len(D) == 2:
        f0, f1 = dirs.flatten(D[0]), dirs.flatten(D[1])
        result["directions_cosine"] = float(f0 @ f1 / (f0.norm() * f1.norm()).clamp_min(1e-30))
    if c.dims == 1:
        result["curves"] = {sp: {k: v.tolist() for k, v in g.items()} for sp, g in grids.items()}
    if trajectory:
        result["trajectory"] = trajectory
    return result


def parser():
    p = command.parser("python -m analysis.landscape", __doc__, LandscapeConfig)
    p.add_argument("ckpt", metavar="CKPT")
    return p


@cli
def main(argv=None):
    config, args = command.parse(parser(), LandscapeConfig, argv)
    r = run(args["ckpt"], config)
    if r.get("world_size", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        sh = r["sharpness"]
        print(f"center loss {r['center_loss']:.6g} (accuracy {r['center_accuracy']:.4f}) on "
              f"{r['examples'][config.split]} {config.split} examples, {r['space_parameters']} parameters "
              f"({r['space']} space, {r['parametrization']['name']})")
        print("| radius | mean rise | max rise |\n|---|---|---|")
        for x in sh["loss_rise"]:
            print(f"| {x['radius']:.3g} | {x['mean_rise']:.4g} | {x['max_rise']:.4g} |")
        print("curvature at centre per direction:", ", ".join(f"{c:.4g}" for c in sh["curvature_at_center"]))
        print(f"wrote {Path(config.out or args['ckpt']) / 'landscape.json'} and {len(r['figures'])} figure files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
