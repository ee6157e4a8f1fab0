"""Benchmark bounds: Theorem 1 closed form vs the 2^L definition, and `python -m bounds` end to end.

    python bench/bench_bounds.py [--checkpoint CKPT ...] [--json out.json]

Targets (issue 4): Theorem 1 for 10,000 synthetic layers under 50 ms; `bounds` on a MiniLM checkpoint
end to end under 5 s on 2 cores. Without --checkpoint, a MiniLM LoRA (r = 8, query/value) checkpoint
is built in a temp dir with adapters.apply + random factors + adapters.save (untrained: the cost of
the bounds does not depend on the values of the weights), with training_stats.json written by hand.
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.io import write_json  # noqa: E402
from bounds import theorem1  # noqa: E402
from bounds.theorem1 import theorem1_bruteforce  # noqa: E402

SEED = 0


def synthetic(L, rng):
    return dict(base_norms=rng.uniform(0.5, 3.0, L), delta_norms=rng.uniform(1e-4, 0.5, L),
                act_lipschitz=rng.uniform(0.25, 1.0, L), act_zero_norms=rng.uniform(0.0, 1.0, L),
                input_bound=1.0, loss_lipschitz=1.0)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_theorem1():
    rng = np.random.default_rng(SEED)
    rows = []
    net = synthetic(10_000, rng)
    t, r = timed(lambda: theorem1(**net), 21)
    rows.append(dict(what="Theorem 1 closed form, L = 10,000 (median of 21)", seconds=t,
                     target="< 0.05 s", log10_phi_delta=r["log10_phi_delta"]))
    net = synthetic(20, rng)
    t_closed, closed = timed(lambda: theorem1(**net), 21)
    t_brute, brute = timed(lambda: theorem1_bruteforce(**net), 1)
    rel = abs(closed["phi_delta"] / brute["phi_delta"] - 1)
    rows.append(dict(what="Theorem 1 closed form, L = 20 (median of 21)", seconds=t_closed, target=""))
    rows.append(dict(what=f"2^L definition (theorem1_bruteforce), L = 20 (relative difference {rel:.1e})",
                     seconds=t_brute, target=""))
    return rows


def make_minilm_checkpoint(directory):
    """MiniLM + LoRA r = 8 on query/value, random B so that ΔW ≠ 0, saved as a real checkpoint."""
    import torch

    import adapters
    from adapters import models
    model = models.load_model("minilm", 2, seed=SEED)
    h = models.weights_hash(model, exclude=models.head_names(model))
    adapters.apply(model, "lora", rank=8, alpha=16, seed=SEED)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    adapters.save(model, directory, base_model="minilm", base_model_hash=h)
    stats = dict(n_train=1000, n_test=500, train_loss=0.40, test_loss=0.45, generalization_gap=0.05,
                 train_loss_max=3.2, test_loss_max=3.9, note="synthetic statistics for the benchmark")
    (Path(directory) / "training_stats.json").write_text(json.dumps(stats))
    return directory


def bench_cli(ckpt, threads=None):
    """Wall and CPU time of one `python -m bounds CKPT --out DIR --formats md` (fresh process, imports included).

    threads: OMP_NUM_THREADS for the child; on a loaded machine, OpenMP threads spinning against
    other processes can dominate the SVD time, so the table shows the single-thread run beside it.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = Path(ckpt).parent / "bounds-report"
    proc = subprocess.run([sys.executable, "-m", "bounds", str(ckpt), "--out", str(out), "--formats", "md"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        return dict(what=f"python -m bounds {ckpt}", seconds=None, target="< 5 s", error=proc.stderr.strip())
    row = json.loads((out / "bounds.json").read_text())[0]
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    how = f", OMP_NUM_THREADS={threads}" if threads else ""
    return dict(what=f"python -m bounds ({row['method']}, {row['theorem1']['layers']} matrices{how}) {ckpt}",
                seconds=wall, cpu_seconds=cpu, target="< 5 s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", default=[], help="checkpoint(s) to time end to end")
    p.add_argument("--no-checkpoint", action="store_true", help="only the Theorem 1 timings")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    load_before = os.getloadavg()  # other processes on the machine distort every timing below
    rows = bench_theorem1()
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = args.checkpoint
        if not ckpts and not args.no_checkpoint:
            ckpts = [make_minilm_checkpoint(Path(tmp) / "minilm-lora")]
        for ckpt in ckpts:
            bench_cli(ckpt)  # warm the OS file cache once, then time
            rows.append(bench_cli(ckpt))
            rows.append(bench_cli(ckpt, threads=1))
    info = dict(python=platform.python_version(), cpus=os.cpu_count(), load_avg_after=os.getloadavg(),
                load_avg_before=load_before, seed=SEED)
    print("| what | seconds | CPU seconds | target |\n|---|---|---|---|")
    for r in rows:
        sec = "failed: " + r["error"] if r.get("error") else f"{r['seconds']:.4f}"
        cpu = f"{r['cpu_seconds']:.2f}" if r.get("cpu_seconds") is not None else ""
        print(f"| {r['what']} | {sec} | {cpu} | {r['target']} |")
    print(f"\n{info}")
    if args.json:
        write_json(args.json, dict(rows=rows, machine=info))
    return 0 if all(r.get("seconds") is not None and math.isfinite(r["seconds"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
