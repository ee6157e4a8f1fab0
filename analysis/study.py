"""The study: every method at its own learning rate, over seeds, every diagnostic, then the report.

    python -m analysis.study                      # the default study (MiniLM, movie reviews) -> figures/
    python -m analysis.study --model PATH --data my.csv --runs runs/mine --out figures/mine
    python -m analysis.study --address auto      # the same study on an existing Ray cluster

The protocol: (1) every method trains at each learning rate of its grid with the first seed; (2) its lr is the one
with the best validation score (`--select-by`: the task metric, ties broken by the lower validation loss; test is
never looked at); (3) the other seeds train at that lr. The first seed's run at the chosen lr is one of the final
runs. Runs and diagnostics are Ray tasks (a local Ray instance by default, `--address` for a cluster,
`--executor serial` in-process), each idempotent, so an interrupted study redoes nothing that finished.

Every run is a normal checkpoint in RUNS/<method>-lr<lr>-s<seed>/; RUNS/lr_selection.json records each method's grid,
validation scores, chosen lr and final runs. The final runs' diagnostics go beside the checkpoint's files in
RUNS/<method>-lr<lr>-s<seed>/diagnostics/: intruders (spectral), then the landscape and the Hessian twice,
in the space common to every method (W0 + ΔW of the compared matrices: `landscape`, `hessian`) and in the
method's own trainable space as it trained it (`landscape_trainable`, `hessian_trainable`). A run already
complete is skipped, and so is a diagnostic complete with the settings asked for, so an interrupted study
picks up where it stopped. Training an interrupted run resumes from its last state.
"""
import sys
from pathlib import Path

from adapters.errors import AdapterError, ArgumentParser, cli
from adapters.io import write_json
from adapters.methods import METHODS

DEFAULT_METHODS = ["fft", "head", "lora", "lora_plus", "asym", "cola", "rac", "cla", "rcla", "c3la", "rc3la"]
# Budgets: `default` is the study of the README; `tiny` is its reduced form (CI). The Hessian's Lanczos budget
# is one that converges (hessian.json records whether it did; the report marks runs that did not): top-1 to
# a relative Ritz residual of 1e-3, which MiniLM's cLA and LoRA runs reach in 5–7 steps in either space; the
# 80 allowed leave room, and cost nothing once converged (the Lanczos basis grows with the steps taken).
def native_bf16():
    """"bf16" where this machine computes bf16 natively (CUDA, or a CPU with AVX-512 BF16 / AMX: 2.4× faster steps
    for MiniLM here), else "no": elsewhere bf16 would be emulated, slower than fp32."""
    import torch
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    check = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(f is not None and f() for f in check) else "no"


BUDGETS = {
    # bf16 autocast, as the paper trains (fp32 master weights; the recorded evaluations and diagnostics are fp32).
    "default": dict(seeds=[0, 1, 2], train=dict(max_steps=100, n_train=500, n_val=500, n_test=600, batch_size=16,
                                                max_length=48, eval_every=25, eval_examples=200, save_every=50,
                                                mixed_precision=native_bf16()),
                    landscape=dict(dims=1, grid=7, range=1.0, examples=48),
                    hessian=dict(top_k=1, examples=16, max_iter=80, tol=1e-3)),
    "tiny": dict(seeds=[0], train=dict(max_steps=4, n_train=48, n_val=16, n_test=48, batch_size=8, max_length=32),
                 landscape=dict(dims=1, grid=3, range=0.5, examples=16),
                 hessian=dict(top_k=1, examples=8, max_iter=40, tol=1e-3)),
}
STUDY_FILE, SELECTION_FILE = "study.json", "lr_selection.json"
# Default learning-rate grids, by what a method trains (METHODS.md): each centred where that kind of method
# trains at this budget. B against a fixed A starts from B = 0 and needs about 3-10× LoRA's rate; LoRA+'s lr is
# lr_A (lr_B = 16·lr_A); the head-only grid is the base lr (the head gets 10×, head_lr_mult). The report flags
# a choice at either end of its grid. `--lr-grid` gives every method one grid instead.
LR_GRIDS = {"full": [2e-5, 5e-5, 1e-4], "head": [1e-3, 3e-3, 1e-2], "A and B": [3e-4, 1e-3, 3e-3],
            "A and B, LoRA+": [1e-4, 3e-4, 1e-3], "B": [1e-3, 3e-3, 1e-2]}
SELECT_BY = ("val_metric", "val_loss")


def trains(method):
    """What a method trains, the key of its default lr grid."""
    spec = METHODS[method]
    if spec.adapter is None:
        return "full" if spec.trains_base else "head"
    if not spec.adapter.train_a:
        return "B"
    return "A and B, LoRA+" if spec.adapter.lr_ratio != 1 else "A and B"


def run_dir(runs, method, seed, lr):
    return Path(runs) / f"{method}-lr{lr:g}-s{seed}"


def _spectral(ckpt, out, budget, progress):
    from analysis import spectral
    spectral.run([ckpt], k="all", eps=0.5, sweep=True, out=out, formats=("png",), progress=progress)


def _landscape(space):
    def compute(ckpt, out, budget, progress):
        from analysis import landscape
        landscape.run(ckpt, out=out, space=space, directions="random", formats=("png",), progress=progress,
                      **budget["landscape"])
    return compute


def _hessian(space):
    def compute(ckpt, out, budget, progress):
        from analysis import hessian
        hessian.run(ckpt, out=out, space=space, progress=progress, **budget["hessian"])
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


def diagnose(ckpt, which, budget, progress=False):
    """Compute one diagnostic for a checkpoint into ckpt/diagnostics/<which>/ (skipped if complete)."""
    if which not in DIAGNOSE:
        raise AdapterError(f"unknown diagnostic {which!r}; choose from {', '.join(DIAGNOSE)}")
    compute, mark, budget_key, space = DIAGNOSE[which]
    out = Path(ckpt) / "diagnostics" / which
    if not _complete(out / mark, budget_key, space, budget):
        compute(ckpt, out, budget, progress)


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


def _train_job(runs, method, lr, seed, common):
    """One (method, lr, seed) run into its directory; a finished run is skipped, an interrupted one resumes."""
    from adapters.train import train
    out = run_dir(runs, method, seed, lr)
    if not (out / "training_stats.json").exists():
        spec = METHODS[method].adapter
        chained = spec is not None and spec.chained
        train(method=method, lr=lr, seed=seed, out=out, resume=True, overwrite=True, progress=False,
              **{**common, "chain_length": common["chain_length"] if chained else 1})
    return str(out)


def _diagnose_job(run, which, budget):
    diagnose(run, which, BUDGETS[budget])
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


def sweep(runs="runs", methods=DEFAULT_METHODS, seeds=None, budget="default", model="minilm",
          task="movie-reviews", data_file=None, rank=16, alpha=32, chain_length=3, diagnostics=tuple(DIAGNOSE),
          lr_grid=None, select_by="val_metric", head_lr_mult=None, executor="ray", address=None, cpus_per_run=1,
          gpus_per_run=0, progress=True, **overrides):
    """Select each method's lr on validation, train every seed at it, compute the diagnostics; skip what is
    complete. Returns {method: [final run dirs]} (also in RUNS/lr_selection.json with the selection)."""
    from analysis.executor import make_executor
    if budget not in BUDGETS:
        raise AdapterError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AdapterError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if lr_grid is not None and (not lr_grid or any(not lr > 0 for lr in lr_grid)):
        raise AdapterError(f"--lr-grid needs positive learning rates, got {lr_grid}")
    if select_by not in SELECT_BY:
        raise AdapterError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    b = BUDGETS[budget]
    seeds = list(b["seeds"] if seeds is None else seeds)
    grids = {m: sorted(set(lr_grid or LR_GRIDS[trains(m)])) for m in methods}
    train_kwargs = {**b["train"], **{k: v for k, v in overrides.items() if v is not None}}
    common = dict(model=model, task=task, data_file=data_file, rank=rank, alpha=alpha, chain_length=chain_length,
                  head_lr_mult=head_lr_mult, **train_kwargs)
    settings = dict(model=model, task=task, data=str(data_file) if data_file else None, rank=rank, alpha=alpha,
                    chain_length=chain_length, budget=budget, train=train_kwargs, lr_grids=grids,
                    select_by=select_by, head_lr_mult=head_lr_mult)
    _check_settings(runs, settings)
    runs = str(Path(runs).resolve())  # jobs may run in other processes, other working directories

    pool = make_executor(executor, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
    try:
        first = [(runs, m, lr, seeds[0], common) for m in methods for lr in grids[m]]
        pool.map(_train_job, first, desc="lr selection", progress=progress)
        selection = {m: select_lr(runs, m, grids[m], seeds[0], select_by) for m in methods}
        rest = [(runs, m, selection[m]["lr"], s, common) for m in methods for s in seeds[1:]]
        pool.map(_train_job, rest, desc="seeds", progress=progress)
        final = {m: [str(run_dir(runs, m, s, selection[m]["lr"])) for s in seeds] for m in methods}
        jobs = [(run, which, budget) for m in methods for run in final[m] for which in diagnostics]
        pool.map(_diagnose_job, jobs, desc="diagnostics", progress=progress)
        executor_settings = pool.settings()
    finally:
        pool.close()
    names = {m: [Path(run).name for run in final[m]] for m in methods}  # relative: the directory may move
    write_json(Path(runs) / SELECTION_FILE, dict(seeds=seeds, select_by=select_by, executor=executor_settings,
                                                 methods={m: dict(selection[m], runs=names[m]) for m in methods}))
    return final


def _parser():
    p = ArgumentParser(prog="python -m analysis.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="directory of the runs (one checkpoint per method and seed)")
    p.add_argument("--out", default="figures", help="where the report's tables and figures go")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, help="default: the budget's (0 1)")
    p.add_argument("--budget", default="default", choices=list(BUDGETS))
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="movie-reviews", help="movie-reviews, movie-dialog or fashion-mnist")
    p.add_argument("--data", dest="data_file", help="your data (see python -m adapters.train --help)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--chain-length", type=int, default=3, help="k for the chained methods")
    p.add_argument("--lr-grid", nargs="+", type=float, metavar="LR",
                   help="one lr grid for every method (default: a grid per kind of method, see LR_GRIDS)")
    p.add_argument("--select-by", default="val_metric", choices=SELECT_BY,
                   help="validation score that picks each method's lr (default: the task metric, ties by loss)")
    p.add_argument("--head-lr-mult", type=float, help="head lr = this × lr (default: 10 for fft and head, else 1)")
    p.add_argument("--executor", default="ray", choices=["ray", "serial"],
                   help="ray (default: a local instance, or --address) or serial (in this process, for debugging)")
    p.add_argument("--address", help="join this Ray cluster ('auto', HOST:PORT or ray://HOST:PORT)")
    p.add_argument("--cpus-per-run", type=float, default=1, help="CPUs Ray reserves for each run and diagnostic")
    p.add_argument("--gpus-per-run", type=float, default=0, help="GPUs Ray reserves for each run and diagnostic")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-val", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--diagnostics", nargs="*", default=list(DIAGNOSE), choices=list(DIAGNOSE))
    p.add_argument("--no-report", action="store_true", help="only train and diagnose")
    p.add_argument("--readme", default=None, help="also rewrite this README's results section (analysis.report)")
    return p


@cli
def main(argv=None):
    import yaml
    from adapters.integrations import parse_args_with_config
    from adapters.io import write_text
    args = parse_args_with_config(_parser(), argv)  # --config FILE.yaml: its keys are flags; flags override it
    write_text(Path(args["runs"]) / "config.yaml", yaml.safe_dump(args, sort_keys=False))  # the resolved config
    out, no_report, readme = args.pop("out"), args.pop("no_report"), args.pop("readme")
    if readme is not None:
        from analysis import report
        report._readme_parts(readme)  # a bad --readme stops the study before hours of training
    sweep(**args)
    if not no_report:
        from analysis import report
        result = report.report(args["runs"], out, readme=readme)
        print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
