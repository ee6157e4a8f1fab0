"""Benchmark the study's executor on this machine: runs one after another with every core (serial) against
single-thread runs side by side (Ray, one CPU per run), the same runs, alternated.

    python bench/bench_study.py [--runs 4] [--steps 40] [--rounds 2] [--json out.json]

Each configuration trains the same `--runs` MiniLM cLA runs (movie reviews, batch 16, the default study's
sizes, `--steps` steps each, no diagnostics) into a fresh directory; rounds alternate serial and Ray so load from
other jobs hits both alike. Prints wall seconds per configuration (median over rounds) and the ratio.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.io import write_json  # noqa: E402
from analysis import study  # noqa: E402
from analysis.executor import make_executor  # noqa: E402


def timed(name, jobs):
    pool = make_executor(name, cpus_per_run=1)
    try:
        start = time.perf_counter()
        pool.map(study._train_job, jobs, desc=name, progress=False)
        return time.perf_counter() - start
    finally:
        pool.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    common = dict(study.BUDGETS["default"]["train"], max_steps=a.steps, model="minilm", task="movie-reviews",
                  data_file=None, rank=16, alpha=32, chain_length=1, head_lr_mult=None)
    times = {"serial": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name in ("serial", "ray") if r % 2 == 0 else ("ray", "serial"):
                runs = Path(tmp) / f"{name}-{r}"
                jobs = [(str(runs), "cla", 1e-2, seed, common) for seed in range(a.runs)]
                times[name].append(timed(name, jobs))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"| executor | wall s for {a.runs} runs × {a.steps} steps (median of {a.rounds}) | ratio to serial |")
    print("|---|---|---|")
    for name in ("serial", "ray"):
        print(f"| {name} | {med[name]:.1f} | {med[name] / med['serial']:.2f} |")
    if a.json:
        write_json(a.json, dict(times=times, median=med, runs=a.runs, steps=a.steps))


if __name__ == "__main__":
    sys.exit(main())
