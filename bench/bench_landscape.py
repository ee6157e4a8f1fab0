"""Landscape throughput vs plain inference, and vs loss-landscapes' random_plane, side by side.

    python bench/bench_landscape.py [--examples 128] [--batch-size 32] [--rounds 5] [--points 4] [--threads 1] \
        [--json PATH]

1. MiniLM (the offline wheel) with LoRA r=8 on query/value: grid points × examples per second of
   analysis.landscape (perturb in place, evaluate, restore) against a plain no_grad inference loop
   (forward + cross-entropy) over the same examples and batch size. Both are timed in alternation,
   `rounds` times, and the median ratio is reported (the issue asks for ≥ 0.9). Times are process
   CPU times with one intra-op thread (robust to other jobs on a shared machine); wall-clock
   ratios are printed too.
2. A small MLP on scikit-learn's digits: the same n×n grid with loss-landscapes 3.0.6 random_plane
   (one batch holding all examples, as its Loss metric requires) and with ours.
Prints a Markdown table.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from analysis import directions as dirs  # noqa: E402
from analysis import landscape as ls  # noqa: E402


def minilm_setup(examples, batch_size):
    import adapters
    from adapters import data, models
    from adapters.evaluate import batches as make_batches
    model = adapters.apply(models.load_model("minilm", 2), "lora", rank=8, alpha=16, targets=["query", "value"])
    with torch.no_grad():  # a non-zero update, as after training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    task = data.load_task("movie-reviews", n_train=examples, n_test=8)
    tok = models.load_tokenizer("minilm")
    return model.eval(), make_batches(tok, task.train[:examples], 64, batch_size)


@torch.no_grad()
def plain_inference(model, batches):
    total = 0.0
    for b in batches:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        total += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
    return total


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def compare(ours, peer, rounds, work):
    """Alternate ours/peer `rounds` times; throughputs (work / median CPU s) and median ratios."""
    o, p = [], []
    for _ in range(rounds):
        o.append(timed(ours))
        p.append(timed(peer))
    cpu = [b[1] / a[1] for a, b in zip(o, p)]  # ours throughput / peer throughput
    wall = [b[0] / a[0] for a, b in zip(o, p)]
    return dict(ours=work / statistics.median(a[1] for a in o), peer=work / statistics.median(b[1] for b in p),
                ratio=statistics.median(cpu), ratios=cpu, wall_ratio=statistics.median(wall))


def bench_minilm(examples, batch_size, rounds, points, space):
    model, batches = minilm_setup(examples, batch_size)
    weights = [p for _, p in ls.space_parameters(model, space)]
    D = [dirs.random_direction(weights, s) for s in (0, 1)]
    # One grid row of `points` points (none at the centre), as a long grid visits them row by row.
    coords = [[0.1], [0.05 * (j + 1) for j in range(points)]]
    plain_inference(model, batches)  # warm-up

    def ours():
        ls.landscape_grid(model, weights, D, {"train": batches}, coords, progress=False)

    def plain():
        for _ in range(points):
            plain_inference(model, batches)

    n = sum(p.numel() for p in weights)
    return dict(what=f"MiniLM + LoRA r=8, space={space} ({n:,} params), {points} points/round",
                peer_name="plain inference", **compare(ours, plain, rounds, points * examples))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def bench_vs_loss_landscapes(steps, rounds):
    from loss_landscapes import random_plane
    from loss_landscapes.metrics import Loss
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = MLP().eval()
    weights = list(model.parameters())
    D = [dirs.random_direction(weights, s) for s in (0, 1)]
    coords = [ls.grid_coords(steps if steps % 2 else steps + 1, 1.0)] * 2
    batches = [{"x": X, "labels": y}]
    import copy

    def ours():
        ls.landscape_grid(model, weights, D, {"train": batches}, coords, progress=False)

    def peer():
        random_plane(copy.deepcopy(model), Loss(nn.CrossEntropyLoss(), X, y), distance=1, steps=len(coords[0]),
                     normalization="filter")

    pts = len(coords[0]) ** 2
    return dict(what=f"MLP 64-128-64-10 on digits ({len(y)} examples, one batch), {pts} points",
                peer_name="loss-landscapes random_plane", **compare(ours, peer, rounds, pts * len(y)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--json", help="also write the rows to this JSON file (atomically)")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    rows = [bench_minilm(a.examples, a.batch_size, a.rounds, a.points, "trainable"),
            bench_minilm(a.examples, a.batch_size, a.rounds, a.points, "all"),
            bench_vs_loss_landscapes(a.steps, a.rounds)]
    print(f"\nthreads {torch.get_num_threads()}, examples {a.examples}, batch {a.batch_size}, rounds {a.rounds}\n")
    print("| setting | ours (points·examples/CPU-s) | reference | reference (points·examples/CPU-s) | "
          "ours / reference (median, CPU) | per round | wall-clock ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['ours']:.1f} | {r['peer_name']} | {r['peer']:.1f} | {r['ratio']:.3f} | "
              f"{', '.join(f'{x:.3f}' for x in r['ratios'])} | {r['wall_ratio']:.3f} |")
    if a.json:
        from adapters.io import write_json
        write_json(a.json, {"settings": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
