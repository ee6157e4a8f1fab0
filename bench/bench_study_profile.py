"""Where a default-study run and its diagnostics spend their time on this machine, one thread (as the study gives
each Ray task): one run as the study trains it, timed by part, then each of the five diagnostics on its checkpoint
beside the cost of loading that checkpoint.

    python bench/bench_study_profile.py [--method lora] [--lr 1e-3] [--json out.json]

The run is the default budget's (analysis.study.BUDGETS, movie reviews, MiniLM, seed 0): set-up (data, model,
adapter), optimizer steps, the mid-run validation evaluations (the loop's time less its steps) and the end (the
final train/val/test evaluation, the checkpoint). Each diagnostic is timed as the study's job runs it (it loads the
checkpoint itself); a checkpoint load is timed warm, as a Ray worker that has run a job before loads it, in both
attention implementations the diagnostics use. Prints one table; the shares are of the run's or the diagnostics'
total. The precision is the budget's for this machine (bf16 only where it is native).
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import adapters  # noqa: E402
from adapters.io import write_json  # noqa: E402
from adapters.train import train  # noqa: E402
from analysis import study  # noqa: E402


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="lora")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    budget = study.BUDGETS["default"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "run"
        marks = []  # the time after each optimizer step (and its evaluation, when one follows it)
        total, stats = timed(train, method=a.method, lr=a.lr, seed=0, out=ckpt, progress=False, model="minilm",
                             task="movie-reviews", on_step=lambda step: marks.append(time.perf_counter()),
                             **budget["train"])
        end = time.perf_counter() - marks[-1]
        step = stats["median_step_time_s"]
        steps = stats["steps"] * step
        run = {f"set-up (data, model, {a.method})": total - end - (marks[-1] - marks[0]) - step,
               f"{stats['steps']} optimizer steps (median {step:.3f} s)": steps,
               f"{len(stats['history'])} mid-run evaluations ({stats['mid_run_eval']['examples']} val examples)":
                   marks[-1] - marks[0] + step - steps,
               "end: train/val/test evaluation, checkpoint": end}
        rows += [("run", name, t, t / total) for name, t in run.items()]
        rows.append(("run", f"total ({a.method} lr {a.lr:g}, best step {stats['best_step']})", total, 1.0))

        diag = {}
        for which in study.DIAGNOSE:
            shutil.rmtree(ckpt / "diagnostics", ignore_errors=True)
            diag[which], _ = timed(study.diagnose, ckpt, which, budget)
        every = sum(diag.values())
        rows += [("diagnostic", which, t, t / every) for which, t in diag.items()]
        rows.append(("diagnostic", "total, five jobs", every, 1.0))
        loads = {attn: min(timed(adapters.load, ckpt, **({"attn_implementation": attn} if attn else {}))[0]
                           for _ in range(3)) for attn in (None, "eager")}
        for attn, t in loads.items():
            rows.append(("diagnostic", f"of which a checkpoint load, warm ({attn or 'sdpa'} attention)", t, t / every))
        rows.append(("diagnostic", "of which loading: the four jobs' model loads (spectral streams its weights)",
                     2 * loads[None] + 2 * loads["eager"], (2 * loads[None] + 2 * loads["eager"]) / every))

    print(f"precision {budget['train']['mixed_precision']}, torch {torch.__version__}, 1 thread")
    print("| part | what | seconds | share |")
    print("|---|---|---|---|")
    for part, name, t, share in rows:
        print(f"| {part} | {name} | {t:.2f} | {share:.0%} |")
    if a.json:
        write_json(a.json, dict(rows=rows, stats={k: stats[k] for k in ("steps", "best_step", "median_step_time_s",
                                                                           "wall_time_s")}))


if __name__ == "__main__":
    sys.exit(main())
