"""The study: every method at its own learning rate, over seeds, every diagnostic, then the report.

    python -m analysis.study                      # the default study (MiniLM, movie reviews) -> figures/
    python -m analysis.study --model PATH --data my.csv --runs runs/mine --out figures/mine
    python -m analysis.study --address auto      # the same study on an existing Ray cluster

The protocol: (1) every method trains at each learning rate of its grid with the selection seed (`--select-seed`,
default 0); (2) its lr is the one with the best validation score (`--select-by`: the task metric, ties broken by the
lower validation loss; test is never looked at), and a choice at an edge of the grid extends it by one grid step on
that side (trained, then chosen again) until the choice is interior or the bound (MAX_EXTENSIONS, LR_BOUNDS) is
reached; (3) the final runs train at that lr with the other seeds (`--seeds`, default 1 2 3): only they are tested,
reported and compared, since the selection seed's score chose the lr. The same seed gives every method the same
split, head initialisation and data order, so methods are compared paired by seed (analysis.claims). Every run stops
early on its validation loss under a cap of epochs (the budget's), a chain link by link, and its best evaluation's
weights are the ones tested and diagnosed (adapters.stopping). Every argument and data problem is found before Ray
starts. Runs and diagnostics are Ray tasks (a local Ray instance by default, `--address` for a cluster, `--executor
serial` in-process) in one queue, each started as soon as what it needs has finished (a method's extensions, seeds
and diagnostics wait for its own runs only, never for another method's), and each idempotent, so an interrupted
study redoes nothing that finished. The progress bar's total is every planned job from the start (an extension adds
its own) and its ETA comes from the measured times of finished jobs of each kind.

The default methods are the paper's central comparison (METHOD_SETS["central"]: the sparse methods, their
parameter-matched baselines and LoRA); `--methods paper` runs the paper's 11.

Every run is a normal checkpoint in RUNS/<method>-lr<lr>-s<seed>/; RUNS/lr_selection.json records each method's grid,
validation scores, chosen lr and final runs. The final runs' diagnostics go beside the checkpoint's files in
RUNS/<method>-lr<lr>-s<seed>/diagnostics/: intruders (spectral), then the landscape and the Hessian twice,
in the space common to every method (W0 + ΔW of the compared matrices: `landscape`, `hessian`) and in the
method's own trainable space as it trained it (`landscape_trainable`, `hessian_trainable`). A run already
complete is skipped, and so is a diagnostic complete with the settings asked for, so an interrupted study
picks up where it stopped. A complete run is skipped only while its weights match the digest its training_stats.json
records: one changed or truncated since is said in one line and trained again, its diagnostics with it. Training an
interrupted run resumes from its last state. The untrained model, evaluated on the same task and splits
(RUNS/untrained.json, adapters.evaluate), is the report's reference row.
"""
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from adapters import command
from adapters.data import BUILTIN
from adapters.errors import AdapterError, cli
from adapters.io import write_json
from adapters.methods import CHAIN_LENGTH, METHODS
from adapters.settings import as_dict, setting
from analysis.claims import MARGIN
from analysis.layout import REFERENCE_FILE, SELECTION_FILE, STUDY_FILE, run_dir
from analysis.report import MARGIN_RANGE

# The paper's central comparison, the default: the sparse methods, their parameter-matched baselines (asym for cla and
# rcla, rac for c3la and rc3la) and LoRA, every one a claim of the report. `--methods paper` is the paper's 11.
METHOD_SETS = {"central": ["lora", "asym", "rac", "cla", "rcla", "c3la", "rc3la"],
               "paper": ["fft", "head", "lora", "lora_plus", "asym", "cola", "rac", "cla", "rcla", "c3la", "rc3la"]}
DEFAULT_METHODS = METHOD_SETS["central"]


def expand_methods(names):
    """Method names, a set's name (central, paper) standing for its methods; each method once, in order."""
    return list(dict.fromkeys(m for name in names for m in METHOD_SETS.get(name, [name])))


def native_bf16():
    """"bf16" where this machine computes bf16 natively (CUDA, or a CPU with AVX-512 BF16 / AMX: 2.4× faster steps
    for MiniLM here), else "no": elsewhere bf16 would be emulated, slower than fp32."""
    import torch
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    check = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(f is not None and f() for f in check) else "no"


# Budgets: `default` is the study of the README; `tiny` is its reduced form (CI). The Hessian's Lanczos budget
# is one that converges (hessian.json records whether it did; the report marks runs that did not): top-1 to
# a relative Ritz residual of 1e-3, which MiniLM's cLA and LoRA runs reach in 5–7 steps in either space; the
# 80 allowed leave room, and cost nothing once converged (the Lanczos basis grows with the steps taken).
BUDGETS = {
    # bf16 autocast, as the paper trains (fp32 master weights; the recorded evaluations and diagnostics are fp32).
    # Converged runs: early stopping on validation loss, evaluated every epoch (32 steps of 500 examples), patience 2
    # (two epochs without a lower loss), under a cap of 20 epochs, the paper's order (it trains 20–30); the best
    # evaluation's weights are the ones tested and diagnosed. Every half epoch with patience 4 (the same 64-step
    # window) costs twice the evaluations (an evaluation ≈ 6 training steps) and, replayed on a reduced study's 8 runs,
    # kept the same best step in 6 of them (bench/README.md). n_train/n_val/n_test are upper limits: a smaller data
    # set is used whole.
    "default": dict(select_seed=0, seeds=[1, 2, 3],
                    train=dict(epochs=20, n_train=500, n_val=500, n_test=600, batch_size=16, max_length=48,
                               eval_every=32, eval_examples=200, save_every=64, early_stopping=True, patience=2,
                               min_delta=0.0, mixed_precision=native_bf16()),
                    landscape=dict(dims=1, grid=7, range=1.0, examples=48),
                    hessian=dict(top_k=1, examples=16, max_iter=80, tol=1e-3)),
    "tiny": dict(select_seed=0, seeds=[1],
                 train=dict(max_steps=4, n_train=48, n_val=16, n_test=48, batch_size=8, max_length=32, eval_every=2,
                            early_stopping=True, patience=2),
                 landscape=dict(dims=1, grid=3, range=0.5, examples=16),
                 hessian=dict(top_k=1, examples=8, max_iter=40, tol=1e-3)),
}
# Default learning-rate grids, by what a method trains (docs/METHODS.md): each centred where that kind of method
# trains at this budget. B against a fixed A starts from B = 0 and needs about 3-10× LoRA's rate; LoRA+'s lr is
# lr_A (lr_B = 16·lr_A); the head-only grid is the base lr (the head gets 10×, head_lr_mult). The report flags
# a choice at either end of its grid. `--lr-grid` gives every method one grid instead.
LR_GRIDS = {"full": [2e-5, 5e-5, 1e-4], "head": [1e-3, 3e-3, 1e-2], "A and B": [3e-4, 1e-3, 3e-3],
            "A and B, LoRA+": [1e-4, 3e-4, 1e-3], "B": [1e-3, 3e-3, 1e-2]}
SELECT_BY = ("val_metric", "val_loss")
# An lr chosen at an edge of its grid extends the grid by one grid step on that side and trains there, until the
# choice is interior or the bound: at most MAX_EXTENSIONS steps per side, never outside LR_BOUNDS. Both are
# recorded in lr_selection.json, with every extension.
MAX_EXTENSIONS = 3
LR_BOUNDS = (1e-6, 1.0)


def trains(method):
    """What a method trains, the key of its default lr grid."""
    spec = METHODS[method]
    if spec.adapter is None:
        return "full" if spec.trains_base else "head"
    if not spec.adapter.train_a:
        return "B"
    return "A and B, LoRA+" if spec.adapter.lr_ratio != 1 else "A and B"


def _spectral(ckpt, out, budget, progress, device=None):
    from analysis import spectral
    spectral.run([ckpt], top_k="all", eps=0.5, sweep=True, out=out, formats=("png",), progress=progress, device=device)


def _landscape(space):
    def compute(ckpt, out, budget, progress, device=None):
        from analysis import landscape
        landscape.run(ckpt, out=out, space=space, directions="random", formats=("png",), progress=progress,
                      device=device, **budget["landscape"])
    return compute


def _hessian(space):
    def compute(ckpt, out, budget, progress, device=None):
        from analysis import hessian
        hessian.run(ckpt, out=out, space=space, progress=progress, device=device, **budget["hessian"])
    return compute


# name -> (how to compute it into a directory, the JSON it writes there last: its completion mark, the budget
# entry and space its recorded settings must match to count as complete).
DIAGNOSE = {"spectral": (_spectral, "spectral.json", None, None),
            "landscape": (_landscape("effective"), "landscape.json", "landscape", "effective"),
            "landscape_trainable": (_landscape("trainable"), "landscape.json", "landscape", "trainable"),
            "hessian": (_hessian("effective"), "hessian.json", "hessian", "effective"),
            "hessian_trainable": (_hessian("trainable"), "hessian.json", "hessian", "trainable")}


def _complete(path, budget_key, space, budget):
    """A diagnostic is complete when its JSON exists and records the settings (and space) asked for now."""
    if not path.exists():
        return False
    if budget_key is None:
        return True
    import json
    done = json.loads(path.read_text())
    wanted = {**budget[budget_key], "space": space}
    return done.get("space") == space and all(done["settings"].get(k) == v for k, v in wanted.items())


def diagnose(ckpt, which, budget, progress=False, device=None):
    """Compute one diagnostic for a checkpoint into ckpt/diagnostics/<which>/ (skipped if complete), on `device`
    (default: the diagnostic's own)."""
    if which not in DIAGNOSE:
        raise AdapterError(f"unknown diagnostic {which!r}; choose from {', '.join(DIAGNOSE)}")
    compute, mark, budget_key, space = DIAGNOSE[which]
    out = Path(ckpt) / "diagnostics" / which
    if not _complete(out / mark, budget_key, space, budget):
        compute(ckpt, out, budget, progress, device)


def _check_settings(runs, settings):
    """A runs directory holds one study: refuse to mix runs made with other settings."""
    path = Path(runs) / STUDY_FILE
    if path.exists():
        import json
        old = json.loads(path.read_text())
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise AdapterError(f"{runs} holds a study with other settings ({', '.join(changed)}); "
                               f"use another --runs directory")
    else:
        write_json(path, settings)


class Run(NamedTuple):
    """A train job's arguments: named, so the study reads a job's method and seed by name; a tuple, so the executor
    calls _train_job(*run) as it calls any job (and Ray pickles it as any argument)."""
    runs: str
    method: str
    lr: float
    seed: int
    common: dict


class Diagnosis(NamedTuple):
    """A diagnose job's arguments (_diagnose_job(*diagnosis))."""
    run: str
    which: str
    budget: str
    device: Optional[str] = None


def _train_job(runs, method, lr, seed, common):
    """One (method, lr, seed) run into its directory: a finished run whose weights are still those it finished with
    is skipped, an interrupted one resumes, a finished one whose weights changed since is trained again from scratch.
    Returns (the run's directory, why it was trained again or None), for the study to say (_said)."""
    from adapters.checkpoint import STATS, weights_changed
    from adapters.train import train
    out = run_dir(runs, method, seed, lr)
    finished = (out / STATS).exists()
    redone = weights_changed(out) if finished else None
    if finished and redone is None:
        return str(out), None
    if redone:
        shutil.rmtree(out / "diagnostics", ignore_errors=True)  # they are of the old weights: computed again
    adapter = METHODS[method].adapter
    chained = adapter is not None and adapter.chained
    # A redo does not resume: a state left beside the finished run is not of the new run's making.
    train(method=method, lr=lr, seed=seed, out=out, resume=not redone, overwrite=True, progress=False,
          **{**common, "chain_length": common["chain_length"] if chained else 1})
    return str(out), redone


def _said(result):
    """A train job's run directory, its redo said in one line here, in the study's own process: a Ray worker's
    output does not reach the user."""
    from tqdm.auto import tqdm
    run, redone = result
    if redone:
        tqdm.write(f"{run}: {redone}; trained it again", file=sys.stderr)
    return run


def _reference_job(runs, common, seed):
    """The untrained model on the runs' own task and split sizes into RUNS/untrained.json, once (a runs directory
    holds one study); a classifier's head drawn with `seed`, as that seed's runs start from it."""
    from adapters import evaluate, taskspec
    out = Path(runs) / REFERENCE_FILE
    if not out.exists():
        evaluate.run(common["model"], seed=seed, out=out, progress=False, device=common.get("device"),
                     **{k: common.get(k) for k in taskspec.TASK_OPTIONS})
    return str(out)


def _diagnose_job(run, which, budget, device=None):
    diagnose(run, which, BUDGETS[budget], device=device)
    return run


def select_lr(runs, method, grid, seed, by):
    """The lr of `grid` whose `seed` run scores best on validation: the best val_metric (highest accuracy, lowest
    perplexity; ties: lowest val_loss), or lowest val_loss.
    Returns {"lr", "grid", "by", "scores": {lr: score}, "val_loss": {lr: loss}, "at_edge"}."""
    import json
    stats = {lr: json.loads((run_dir(runs, method, seed, lr) / "training_stats.json").read_text()) for lr in grid}
    missing = [lr for lr, st in stats.items() if st.get("val_loss") is None]
    if missing:
        raise AdapterError(f"{method}: no validation split to select the lr on (runs at {missing}); "
                           "give the task a validation split or use a single --lr-grid value")
    # The metric's own direction: accuracy up, perplexity down (training_stats says which).
    sign = {lr: -1 if stats[lr].get("metric_higher_is_better", True) else 1 for lr in grid}
    key = (lambda lr: (sign[lr] * stats[lr]["val_metric"], stats[lr]["val_loss"])) if by == "val_metric" else (
        lambda lr: stats[lr]["val_loss"])
    best = min(grid, key=key)
    return dict(lr=best, grid=list(grid), by=by, metric=stats[best]["metric"],
                scores={f"{lr:g}": stats[lr][by] for lr in grid},
                val_loss={f"{lr:g}": stats[lr]["val_loss"] for lr in grid},
                at_edge=len(grid) > 1 and best in (min(grid), max(grid)))


def grid_step(grid, side):
    """The lr one grid step beyond `grid` on `side` ("up" or "down"): the ratio of its two outermost points on
    that side (a geometric grid's factor), rounded to two significant digits as the grids are written."""
    lo, hi = (grid[0], grid[1]) if side == "down" else (grid[-2], grid[-1])
    return float(f"{(lo * lo / hi if side == 'down' else hi * hi / lo):.2g}")


def extension(selection, done, max_extensions=MAX_EXTENSIONS, bounds=LR_BOUNDS):
    """(the next lr to try, its side) for a choice at the edge of its grid, or (None, why not) when the choice is
    interior or the bound is reached; `done`: {side: extensions so far}."""
    grid = selection["grid"]
    if not selection["at_edge"]:
        return None, None
    side = "up" if selection["lr"] == max(grid) else "down"
    lr = grid_step(grid, side)
    if done.get(side, 0) >= max_extensions:
        return None, f"{max_extensions} extensions {side}"
    if not bounds[0] <= lr <= bounds[1]:
        return None, f"lr {lr:g} outside [{bounds[0]:g}, {bounds[1]:g}]"
    return lr, side


# The study is one queue of jobs (analysis.executor's stream), each started as soon as what it needs is done; lower
# goes first: a grid point added at an edge is on the path every later run of its method waits for, a grid run may
# add one, a seed run and a diagnostic only end work.
EXTENDED, GRID, SEED, DIAGNOSTIC = 0, 1, 2, 3


class Search:
    """Every method's lr search as jobs that start their follow-ups: the grid at `seed`; when a method's grid is
    done, its choice, and either one grid step beyond an edge (trained, then chosen again) or, once the choice is
    final, `final(method, lr)`'s jobs ((priority, fn, args): its final seeds' runs). No method waits for
    another's runs.
    result(): {method: selection}, each with its `extensions` ([{lr, side, after}]), `bound` and, where the choice is
    still at an edge, `bound_reached`."""

    def __init__(self, runs, methods, grids, seed, common, select_by, max_extensions=MAX_EXTENSIONS, final=None):
        self.runs, self.methods, self.seed, self.common = runs, list(methods), seed, common
        self.select_by, self.max_extensions, self.final = select_by, max_extensions, final
        self.grids = {m: sorted(grids[m]) for m in methods}
        self.waiting = {m: set(self.grids[m]) for m in methods}  # grid runs not finished yet
        self.extensions, self.done, self.selection, self.stuck = ({m: [] for m in methods}, {m: {} for m in methods},
                                                                   {}, {})

    def _run(self, priority, method, lr):
        return priority, _train_job, Run(self.runs, method, lr, self.seed, self.common)

    def jobs(self):
        return [self._run(GRID, m, lr) for m in self.methods for lr in self.grids[m]]

    def then(self, fn, args, result):
        """The follow-ups of a finished job: none unless it is the last outstanding grid run of its method."""
        if fn is not _train_job or args.seed != self.seed or args.lr not in self.waiting.get(args.method, ()):
            return []
        m, lr = args.method, args.lr
        self.waiting[m].discard(lr)
        if self.waiting[m]:
            return []
        self.selection[m] = select_lr(self.runs, m, self.grids[m], self.seed, self.select_by)
        lr, side = extension(self.selection[m], self.done[m], self.max_extensions)
        if lr is None:
            self.stuck[m] = side  # why the search ends at an edge (None when the choice is interior)
            return list(self.final(m, self.selection[m]["lr"])) if self.final is not None else []
        self.extensions[m].append(dict(lr=lr, side=side, after=self.selection[m]["lr"]))
        self.done[m][side] = self.done[m].get(side, 0) + 1
        self.grids[m] = sorted(self.grids[m] + [lr])
        self.waiting[m].add(lr)
        return [self._run(EXTENDED, m, lr)]

    def result(self):
        bound = dict(max_extensions_per_side=self.max_extensions, lr_min=LR_BOUNDS[0], lr_max=LR_BOUNDS[1])
        return {m: dict(self.selection[m], extensions=self.extensions[m], bound=bound,
                        bound_reached=self.stuck.get(m)) for m in self.methods}


def search(pool, runs, methods, grids, seed, common, select_by, max_extensions=MAX_EXTENSIONS, progress=True,
           final=None):
    """The lr search alone (Search) on `pool`; returns Search.result()."""
    s = Search(runs, methods, grids, seed, common, select_by, max_extensions, final)
    pool.stream(s.jobs(), s.then, desc="lr search", progress=progress)
    return s.result()


def _data_limits(task, data_file, train_kwargs):
    """The budget's n_train/n_val/n_test as upper limits: what the data has, where it has fewer. Reads the data once
    (a data problem stops the study here, before Ray starts) and says once what the study uses. Returns the limited
    settings and the task (adapters.data.Task, whole)."""
    from adapters import data
    fraction = train_kwargs.get("val_fraction", data.VAL_FRACTION)
    whole = data.load_task(task, data_file, val_fraction=fraction)
    has = {"n_train": len(whole.train), "n_val": len(whole.val), "n_test": len(whole.test)}
    limited = {k: min(train_kwargs[k], n) if train_kwargs.get(k) is not None else None for k, n in has.items()}
    if any(limited[k] != train_kwargs.get(k) for k in has):
        print(f"data: {whole.name} has {has['n_train']} train / {has['n_val']} val / {has['n_test']} test examples; "
              "the study uses " + " / ".join(str(limited[k] or has[k]) for k in has)
              + " (the budget's " + " / ".join(str(train_kwargs.get(k)) for k in has) + " are upper limits)",
              file=sys.stderr)
    return {**train_kwargs, **limited}, whole


def _check_runs(methods, grids, seeds, common, runs, task_type):
    """Every run's arguments, checked as adapters.train checks them, and the model against the task, before Ray
    starts (one line, exit 2, instead of an error inside a task)."""
    from adapters import models, tasks
    from adapters.settings import make
    from adapters.train import TrainConfig, check_arguments
    for m in methods:
        lr, seed = grids[m][0], seeds[0]
        check_arguments(make(TrainConfig, **{**common, "method": m, "lr": lr, "seed": seed, "overwrite": True,
                                             "out": str(run_dir(runs, m, seed, lr))}))
    tasks.check_model(tasks.get_task_type(task_type), common["model"], models.model_family(common["model"]))


def _kind(fn, args):
    """A job's kind, for the progress bar's ETA: a method's training runs, one diagnostic, the reference."""
    if fn is _train_job:
        return f"train:{args.method}"
    if fn is _diagnose_job:
        return f"diagnose:{args.which}"
    return fn.__name__.strip("_").removesuffix("_job")  # the reference; a suite's study report


class Study:
    """One study, prepared: every argument and data problem is found here, before Ray starts; then its jobs in a
    queue it may share with other studies (analysis.suite): `jobs()` the first ones, `then()` the follow-ups of each
    finished one, `owns()` which jobs are its own, and `finish()` what it records once its last job is done.

    `settings` is what runs/study.json records (a runs directory holds one study), what it is computed on included:
    the task's name (a data file's own name unless --task names it), the data file's name and sha256 (None for a
    built-in task, which adapters.data checks against its own); analysis.layout.data_label says it in one line."""

    def __init__(self, runs="runs", methods=DEFAULT_METHODS, seeds=None, select_seed=None, budget="default",
                 model="minilm", task="movie-reviews", data_file=None, rank=16, alpha=32, chain_length=CHAIN_LENGTH,
                 diagnostics=tuple(DIAGNOSE), lr_grid=None, select_by="val_metric", head_lr_mult=None,
                 max_extensions=MAX_EXTENSIONS, device=None, **overrides):
        if budget not in BUDGETS:
            raise AdapterError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
        methods = expand_methods(methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise AdapterError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)} or a set "
                               f"({', '.join(METHOD_SETS)})")
        if lr_grid is not None and (not lr_grid or any(not lr > 0 for lr in lr_grid)):
            raise AdapterError(f"--lr-grid needs positive learning rates, got {lr_grid}")
        if select_by not in SELECT_BY:
            raise AdapterError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
        unknown = [d for d in diagnostics if d not in DIAGNOSE]
        if unknown:
            raise AdapterError(f"unknown diagnostic(s) {', '.join(unknown)}; choose from {', '.join(DIAGNOSE)}")
        b = BUDGETS[budget]
        seeds = list(b["seeds"] if seeds is None else seeds)
        select_seed = b["select_seed"] if select_seed is None else select_seed
        if not seeds or len(set(seeds)) != len(seeds):
            raise AdapterError(f"--seeds must be distinct seeds, got {seeds}")
        if select_seed in seeds:
            raise AdapterError(f"--select-seed {select_seed} is one of --seeds: the runs that chose the lr would be "
                               "tested, their scores carrying the selection's optimism; pick seeds apart from it")
        if not (isinstance(max_extensions, int) and max_extensions >= 0):
            raise AdapterError(f"max_extensions must be an integer >= 0, got {max_extensions!r}")
        grids = {m: sorted(set(lr_grid or LR_GRIDS[trains(m)])) for m in methods}
        train_kwargs = {**b["train"], **{k: v for k, v in overrides.items() if v is not None}}
        if overrides.get("max_steps") is not None:
            train_kwargs.pop("epochs", None)  # --max-steps is the cap instead of the budget's epochs
        train_kwargs, whole = _data_limits(task, data_file, train_kwargs)
        common = dict(model=model, task=task, data_file=data_file, rank=rank, alpha=alpha, chain_length=chain_length,
                      head_lr_mult=head_lr_mult, **train_kwargs)
        if device is not None:  # where the runs train: not a setting of what they compute (not in study.json)
            common["device"] = device
        # The task's resolved name and the data file, so a report never labels a user's table as the default task.
        self.settings = dict(model=model, task=whole.name, data=Path(data_file).name if data_file else None,
                             data_sha256=whole.sha256 if data_file else None,
                             rank=rank, alpha=alpha, chain_length=chain_length, budget=budget, train=train_kwargs,
                             lr_grids=grids, select_by=select_by, select_seed=select_seed, head_lr_mult=head_lr_mult,
                             lr_search=dict(max_extensions_per_side=max_extensions, lr_bounds=list(LR_BOUNDS)))
        _check_runs(methods, grids, [select_seed, *seeds], common, runs, whole.type)
        self.runs_arg = runs
        self.runs = str(Path(runs).resolve())  # jobs may run in other processes, other working directories
        self.methods, self.grids, self.seeds, self.select_seed = methods, grids, seeds, select_seed
        self.common, self.budget, self.diagnostics, self.device = common, budget, tuple(diagnostics), device
        final = lambda m, lr: [(SEED, _train_job, Run(self.runs, m, lr, s, common)) for s in seeds]  # noqa: E731
        self.search = Search(self.runs, methods, grids, select_seed, common, select_by, max_extensions, final=final)

    def begin(self, plan):
        """Record the settings (refusing a runs directory that holds another study) and add every job this study
        will run, known now, to `plan` (an extension adds its own later). Returns the first jobs."""
        _check_settings(self.runs_arg, self.settings)
        plan.add("reference")
        for m in self.methods:
            plan.add(f"train:{m}", len(self.grids[m]) + len(self.seeds))
            for which in self.diagnostics:
                plan.add(f"diagnose:{which}", len(self.seeds))
        self.plan = plan
        return self.search.jobs() + [(DIAGNOSTIC, _reference_job, (self.runs, self.common, self.seeds[0]))]

    def owns(self, fn, args):
        """Whether a job is this study's: every job's first argument is a path inside its runs directory."""
        path = str(args[0])
        return path == self.runs or path.startswith(self.runs + "/")

    def then(self, fn, args, result):
        """A finished final run: its diagnostics; anything else: the lr search's follow-ups."""
        if fn is _train_job:
            result = _said(result)
            if args.seed != self.select_seed:
                return [(DIAGNOSTIC, _diagnose_job, Diagnosis(result, which, self.budget, self.device))
                        for which in self.diagnostics]
        more = self.search.then(fn, args, result)
        for _, job, job_args in more:
            if job is _train_job and job_args.seed == self.select_seed:
                self.plan.add(f"train:{job_args.method}")  # an extension of the grid: not in the plan yet
        return more

    def finish(self, executor_settings):
        """Once every job is done: RUNS/lr_selection.json. Returns {method: [final run dirs]}."""
        selection = self.search.result()
        final = {m: [str(run_dir(self.runs, m, s, selection[m]["lr"])) for s in self.seeds] for m in self.methods}
        names = {m: [Path(run).name for run in final[m]] for m in self.methods}  # relative: the directory may move
        write_json(Path(self.runs) / SELECTION_FILE,
                   dict(select_seed=self.select_seed, seeds=self.seeds, select_by=self.settings["select_by"],
                        executor=executor_settings,
                        methods={m: dict(selection[m], runs=names[m]) for m in self.methods}))
        return final


def stream(pool, studies, progress=True, desc="study: runs and diagnostics", finished=None):
    """Every study's jobs in one queue on `pool`, no barrier between studies: each job starts as soon as what it
    needs is done. When a study's last job is done, `finished(study)` is called once; the jobs it returns join the
    queue (a report). Every study must be prepared (Study) before this starts."""
    from analysis.executor import Plan
    plan = Plan({}, kinds=_kind)
    outstanding, done = {}, set()
    jobs = []
    for i, study in enumerate(studies):
        first = study.begin(plan)
        outstanding[i] = len(first)
        jobs += first

    def owner(fn, args):
        return next(i for i, study in enumerate(studies) if study.owns(fn, args))

    def then(fn, args, result):
        i = owner(fn, args)
        more = list(studies[i].then(fn, args, result)) if i not in done else []
        outstanding[i] += len(more) - 1
        if outstanding[i] == 0 and i not in done:
            done.add(i)
            extra = list(finished(studies[i]) if finished is not None else [])
            outstanding[i] += len(extra)
            more += extra
        return more

    pool.stream(jobs, then, desc=desc, progress=progress, plan=plan)


def sweep(runs="runs", methods=DEFAULT_METHODS, executor="ray", address=None, cpus_per_run=1, gpus_per_run=0,
          progress=True, **study):
    """Select each method's lr on validation at `select_seed` (extending a grid whose choice is at an edge), train
    every one of `seeds` at it, compute their diagnostics; skip what is complete. The selection seed's runs are never
    among the final runs: their validation score chose the lr, so their test score would carry that optimism. Every
    argument and data problem is found before Ray starts (Study). `device` (a Study argument): where every run
    trains (adapters.train's device) and every diagnostic and the reference evaluation run; where, not what: it is
    not in study.json. Returns {method: [final run dirs]} (also in RUNS/lr_selection.json with the selection)."""
    from analysis.executor import make_executor
    prepared = Study(runs=runs, methods=methods, **study)
    pool = make_executor(executor, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
    try:
        stream(pool, [prepared], progress=progress)
        executor_settings = pool.settings()
    finally:
        pool.close()
    return prepared.finish(executor_settings)


# What sweep() applies to an argument not given: the CLI's defaults are these (read once, from the function itself).
SWEEP_DEFAULTS = {name: p.default for f in (Study.__init__, sweep)
                  for name, p in __import__("inspect").signature(f).parameters.items() if p.default is not p.empty}


def _budget_default(key, where="train"):
    """'the budget's: default V, tiny W' for --help: the values sweep() applies when the flag is not given."""
    values = {name: (b[where] if where else b).get(key) for name, b in BUDGETS.items()}
    return "the budget's: " + ", ".join(f"{name} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                        for name, v in values.items())


_RUNS = "the runs (default: the budget's)"
# Where the study writes and how it runs: not what it computes (study.json records what it computes).
_WHERE = dict(results=False)


@dataclass(frozen=True)
class StudyConfig:
    """The settings of `python -m analysis.study`: its flags, each with the default sweep() applies (SWEEP_DEFAULTS;
    None: the budget's); main() hands them to sweep() and analysis.report."""
    runs: str = setting(SWEEP_DEFAULTS["runs"], "directory of the runs (one checkpoint per method and seed)", **_WHERE)
    out: str = setting("figures", "where the report's tables and figures go", **_WHERE)
    methods: list[str] = setting(list(SWEEP_DEFAULTS["methods"]), "methods to compare, or a set: " + "; ".join(
        f"{k} = {' '.join(v)}" for k, v in METHOD_SETS.items()))
    seeds: Optional[list[int]] = setting(None, f"seeds of the final runs, the ones tested and compared (default: "
                                         f"{_budget_default('seeds', None)}); more seeds on a cluster: --seeds 1 2 3 "
                                         "4 5 6 7 8")
    select_seed: Optional[int] = setting(None, "the seed each method's lr is chosen at, never among --seeds "
                                         f"(default: {_budget_default('select_seed', None)})")
    margin: float = setting(MARGIN, "δ of the accuracy claims: non-inferior (not worse by more than δ), equivalent "
                            "(within ±δ), as a difference of accuracies in [0, 1]", check=MARGIN_RANGE)
    budget: str = setting(SWEEP_DEFAULTS["budget"], "sizes and steps of the runs and diagnostics",
                          choices=list(BUDGETS))
    model: str = setting(SWEEP_DEFAULTS["model"], "offline model name, transformers directory or hub id")
    task: str = setting(SWEEP_DEFAULTS["task"], "a built-in task: " + ", ".join(BUILTIN)
                        + " (with --data: the name your data is reported under; default: the file's name)")
    data_file: Optional[str] = setting(None, "your data (see python -m adapters.train --help; default: none)",
                                       flag="--data")
    rank: int = setting(SWEEP_DEFAULTS["rank"], "rank r of each link")
    alpha: float = setting(SWEEP_DEFAULTS["alpha"], "scale s = alpha / r")
    chain_length: int = setting(SWEEP_DEFAULTS["chain_length"], "links k of the chained methods")
    lr_grid: Optional[list[float]] = setting(None, "one starting lr grid for every method (default: a grid per kind "
                                             "of method: " + "; ".join(f"{kind} {' '.join(f'{lr:g}' for lr in grid)}"
                                                                       for kind, grid in LR_GRIDS.items()) + ")",
                                             metavar="LR")
    max_extensions: int = setting(SWEEP_DEFAULTS["max_extensions"], f"grid steps an edge choice may extend its grid "
                                  f"by, per side (lr kept in [{LR_BOUNDS[0]:g}, {LR_BOUNDS[1]:g}])")
    select_by: str = setting(SWEEP_DEFAULTS["select_by"], "validation score that picks each method's lr (val_metric: "
                             "the task metric, ties by loss)", choices=SELECT_BY)
    head_lr_mult: Optional[float] = setting(None, "head lr = this × lr (default: 10 for fft and head, else 1)")
    executor: str = setting(SWEEP_DEFAULTS["executor"], "ray (a local instance, or --address) or serial (in this "
                            "process, for debugging)", choices=["ray", "serial"], **_WHERE)
    address: Optional[str] = setting(None, "join this Ray cluster ('auto', HOST:PORT or ray://HOST:PORT; default: a "
                                     "local instance)", **_WHERE)
    cpus_per_run: float = setting(SWEEP_DEFAULTS["cpus_per_run"], "CPUs Ray reserves for each run and diagnostic",
                                  **_WHERE)
    gpus_per_run: float = setting(SWEEP_DEFAULTS["gpus_per_run"], "GPUs Ray reserves for each run and diagnostic",
                                  **_WHERE)
    epochs: Optional[float] = setting(None, f"cap in epochs ({_budget_default('epochs')})", group=_RUNS)
    max_steps: Optional[int] = setting(None, f"cap in optimizer steps, instead of epochs "
                                       f"({_budget_default('max_steps')})", group=_RUNS)
    n_train: Optional[int] = setting(None, f"upper limit on the train examples ({_budget_default('n_train')})",
                                     group=_RUNS)
    n_val: Optional[int] = setting(None, f"upper limit on the val examples ({_budget_default('n_val')})",
                                   group=_RUNS)
    n_test: Optional[int] = setting(None, f"upper limit on the test examples ({_budget_default('n_test')})",
                                    group=_RUNS)
    eval_every: Optional[int] = setting(None, f"steps between validation evaluations "
                                        f"({_budget_default('eval_every')})", group=_RUNS)
    patience: Optional[int] = setting(None, f"evaluations without an improvement before a run stops "
                                      f"({_budget_default('patience')})", group=_RUNS)
    min_delta: Optional[float] = setting(None, f"an improvement of the validation loss is larger than this "
                                         f"({_budget_default('min_delta')})", group=_RUNS)
    # None: the budget's; --no-early-stopping gives False (its flag is added by parser(): a switch to False).
    early_stopping: Optional[bool] = setting(None, "train every run to its cap (and keep the final weights)",
                                             flag="--no-early-stopping", group=_RUNS)
    keep: Optional[str] = setting(None, "weights tested and diagnosed (default: best with early stopping, final "
                                  "without)", choices=("best", "final"), group=_RUNS)
    # Any number of them, none included (its flag is added by parser(): nargs="*").
    diagnostics: list[str] = setting(list(SWEEP_DEFAULTS["diagnostics"]), "diagnostics of every final run",
                                     choices=list(DIAGNOSE), nargs="*")
    no_report: bool = setting(False, "only train and diagnose", **_WHERE)
    readme: Optional[str] = setting(None, "also rewrite this README's results section (analysis.report)", **_WHERE)
    formats: tuple = command.formats()
    device: Optional[str] = setting(None, "where every run trains (adapters.train --device: cpu or cuda) and every "
                                    "diagnostic and the reference evaluation run (default: cuda if available, else "
                                    "cpu)", **_WHERE)


def parser():
    return command.parser("python -m analysis.study", __doc__, StudyConfig)


def resolved_config(config):
    """The settings as the run's config.yaml records them: a config file again (--config reads it back)."""
    values = as_dict(config)
    values["formats"] = ",".join(config.formats)
    return values


@cli
def main(argv=None):
    import yaml
    from adapters.io import write_text
    config, _ = command.parse(parser(), StudyConfig, argv)  # --config FILE.yaml: its keys are flags; flags win
    write_text(Path(config.runs) / "config.yaml", yaml.safe_dump(resolved_config(config), sort_keys=False))
    args = {k: v for k, v in as_dict(config).items() if k not in ("out", "no_report", "readme", "margin", "formats")}
    if config.readme is not None:
        from analysis.readme import readme_parts
        readme_parts(config.readme)  # a bad --readme stops the study before hours of training
    final = sweep(**args)
    line = f"wrote {sum(map(len, final.values()))} final runs and {SELECTION_FILE} in {config.runs}"
    if not config.no_report:
        from analysis import report
        result = report.report(config.runs, config.out, readme=config.readme, margin=config.margin,
                               formats=config.formats)
        print(result["markdown"])
        line += "; " + report.written(result, config.out, config.formats, config.readme).removeprefix("wrote ")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
