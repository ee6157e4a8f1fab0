"""The study: methods × seeds on one model and task, every diagnostic, then the report.

    python -m analysis.study                      # the default study (MiniLM, movie reviews) -> figures/
    python -m analysis.study --model PATH --data my.csv --runs runs/mine --out figures/mine

Every run is a normal checkpoint in RUNS/<method>-s<seed>/; its diagnostics go beside the checkpoint's
files in RUNS/<method>-s<seed>/diagnostics/. A run or diagnostic already complete is skipped, so an
interrupted study picks up where it stopped. Training an interrupted run resumes from its last state.
"""
import sys
from pathlib import Path

from tqdm.auto import tqdm

from adapters.errors import AdapterError, ArgumentParser, cli
from adapters.io import write_json
from adapters.methods import METHODS

DEFAULT_METHODS = ["fft", "head", "lora", "lora_plus", "asym", "cola", "rac", "cla", "rcla", "c3la", "rc3la"]
# Budgets: `default` finishes within about 20 minutes on 2 CPU cores; `tiny` is its reduced form (CI).
BUDGETS = {
    "default": dict(seeds=[0, 1], train=dict(max_steps=120, n_train=500, n_test=300, batch_size=16, max_length=48,
                                             eval_every=40, eval_examples=128, save_every=40),
                    landscape=dict(dims=1, grid=7, range=1.0, examples=48),
                    hessian=dict(top_k=1, examples=16, max_iter=8)),
    "tiny": dict(seeds=[0], train=dict(max_steps=4, n_train=48, n_test=48, batch_size=8, max_length=32),
                 landscape=dict(dims=1, grid=3, range=0.5, examples=16),
                 hessian=dict(top_k=1, examples=8, max_iter=4)),
}
STUDY_FILE = "study.json"


def run_dir(runs, method, seed):
    return Path(runs) / f"{method}-s{seed}"


def _spectral(ckpt, out, budget, progress):
    from analysis import spectral
    spectral.run([ckpt], k="all", eps=0.5, sweep=True, out=out, formats=("png",), progress=progress)


def _landscape(ckpt, out, budget, progress):
    from analysis import landscape
    landscape.run(ckpt, out=out, space="trainable", directions="random", formats=("png",), progress=progress,
                  **budget["landscape"])


def _hessian(ckpt, out, budget, progress):
    from analysis import hessian
    hessian.run(ckpt, out=out, space="trainable", progress=progress, **budget["hessian"])


# name -> how to compute it into a directory; each writes <name>.json there last (its completion mark).
DIAGNOSE = {"spectral": _spectral, "landscape": _landscape, "hessian": _hessian}


def diagnose(ckpt, which, budget, progress=False):
    """Compute one diagnostic for a checkpoint into ckpt/diagnostics/<which>/ (skipped if there)."""
    if which not in DIAGNOSE:
        raise AdapterError(f"unknown diagnostic {which!r}; choose from {', '.join(DIAGNOSE)}")
    out = Path(ckpt) / "diagnostics" / which
    if not (out / f"{which}.json").exists():
        DIAGNOSE[which](ckpt, out, budget, progress)


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


def sweep(runs="runs", methods=DEFAULT_METHODS, seeds=None, budget="default", model="minilm",
          task="movie-reviews", data_file=None, rank=16, alpha=32, chain_length=3, diagnostics=tuple(DIAGNOSE),
          progress=True, **overrides):
    """Train every (method, seed) and compute its diagnostics; skip what is complete. Returns run dirs."""
    if budget not in BUDGETS:
        raise AdapterError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AdapterError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    b = BUDGETS[budget]
    seeds = list(b["seeds"] if seeds is None else seeds)
    train_kwargs = {**b["train"], **{k: v for k, v in overrides.items() if v is not None}}
    settings = dict(model=model, task=task, data=str(data_file) if data_file else None, rank=rank, alpha=alpha,
                    chain_length=chain_length, budget=budget, train=train_kwargs)
    _check_settings(runs, settings)

    from adapters.train import train
    jobs = [(m, s) for s in seeds for m in methods]
    dirs = []
    bar = tqdm(jobs, desc="study", disable=not progress)
    for method, seed in bar:
        bar.set_postfix(run=f"{method}-s{seed}")
        out = run_dir(runs, method, seed)
        if not (out / "training_stats.json").exists():
            spec = METHODS[method].adapter
            train(model=model, task=task, data_file=data_file, method=method, rank=rank, alpha=alpha,
                  chain_length=chain_length if spec is not None and spec.chained else 1, seed=seed, out=out,
                  resume=True, overwrite=True, progress=False, **train_kwargs)
        for which in diagnostics:
            diagnose(out, which, b)
        dirs.append(out)
    return dirs


def _parser():
    p = ArgumentParser(prog="python -m analysis.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="directory of the runs (one checkpoint per method and seed)")
    p.add_argument("--out", default="figures", help="where the report's tables and figures go")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, help="default: the budget's (0 1)")
    p.add_argument("--budget", default="default", choices=list(BUDGETS))
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="movie-reviews")
    p.add_argument("--data", dest="data_file", help="CSV/TSV/JSONL with text and label columns")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--chain-length", type=int, default=3, help="k for the chained methods")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--diagnostics", nargs="*", default=list(DIAGNOSE), choices=list(DIAGNOSE))
    p.add_argument("--no-report", action="store_true", help="only train and diagnose")
    return p


@cli
def main(argv=None):
    args = vars(_parser().parse_args(argv))
    out, no_report = args.pop("out"), args.pop("no_report")
    sweep(**args)
    if not no_report:
        from analysis import report
        result = report.report(args["runs"], out)
        print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
