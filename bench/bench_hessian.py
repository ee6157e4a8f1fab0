"""Top-1 Hessian eigenvalue: analysis.hessian (Lanczos) vs pyhessian 0.1 (power iteration), same model and batch.

    python bench/bench_hessian.py [--examples 32] [--rounds 3] [--threads 1] [--json PATH]

Models: an MLP on scikit-learn's digits (all parameters) and MiniLM with LoRA r=8 on query/value
(the trained scalars: LoRA factors + head; eager attention). One batch, as pyhessian's single-batch
mode (which keeps the gradient graph: one backward per product). Ours is timed both recomputing
the graph per product (the default, memory-light) and with cache_graph=True (pyhessian's regime).
Tolerances differ in meaning (ours: Ritz residual ‖Hy − θy‖ ≤ tol·|θ|; pyhessian: relative change
of the estimate between iterations), so both are run at two settings and the table shows the error
each reached. The reference eigenvalue is ours at tol 1e-7 (untimed). Times are process CPU seconds
(robust to other jobs on a shared machine), each the median of `rounds` runs. Prints a Markdown table.
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

from analysis import hessian as hs  # noqa: E402


class Logits(nn.Module):
    """pyhessian calls model(inputs): wrap a transformers classifier with a fixed attention mask."""

    def __init__(self, model, mask):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, attention_mask=self.mask).logits


def mlp_case(examples):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)  # all 1797: a measurable time
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).eval()
    opt = torch.optim.Adam(model.parameters(), 1e-2)  # a few steps so the point is not random init
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    # nn.Sequential.forward takes `input`: the dict batch {"input": X} calls it as model(input=X).
    return f"MLP 64-128-10 on digits ({len(y)} examples)", model, [{"input": X, "labels": y}], (X, y), model


def minilm_case(examples):
    import adapters
    from adapters import data, models
    from adapters.evaluate import batches as make_batches
    model = adapters.apply(models.load_model("minilm", 2, attn_implementation="eager"), "lora", rank=8, alpha=16,
                           targets=["query", "value"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    task = data.load_task("movie-reviews", n_train=examples, n_test=8)
    b = make_batches(models.load_tokenizer("minilm"), task.train[:examples], 64, examples)[0]
    b = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
    return (f"MiniLM + LoRA r=8, trainable ({examples} examples)", model.eval(), [b], (b["input_ids"], b["labels"]),
            Logits(model, b["attention_mask"]).eval())


def cpu(fn):
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def bench(case, rounds):
    import importlib
    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class as .hessian)
    name, model, batches, (inputs, targets), wrapped = case
    params = [p for p in model.parameters() if p.requires_grad]
    ref = hs.spectrum(hs.HessianOperator(model, params, batches), top_k=1, tol=1e-7, max_iter=300,
                      progress=False)["eigenvalues"][0]
    rows = []

    def ours(cache, tol):
        op = hs.HessianOperator(model, params, batches, cache_graph=cache)
        r = hs.spectrum(op, top_k=1, tol=tol, progress=False)
        return r["eigenvalues"][0], op.matvecs

    calls = {"n": 0}
    original = ph.hessian_vector_product

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    def peer(tol):
        calls["n"] = 0
        ph.hessian_vector_product = counting
        try:
            torch.manual_seed(0)
            h = ph.hessian(wrapped, nn.CrossEntropyLoss(), data=(inputs, targets), cuda=False)
            top, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=1)
        finally:
            ph.hessian_vector_product = original
            for p in wrapped.parameters():
                p.grad = None  # pyhessian leaves a graph in .grad
        return top[0], calls["n"]

    for label, fn in (("ours: Lanczos tol 1e-3, graph recomputed (default)", lambda: ours(False, 1e-3)),
                      ("ours: Lanczos tol 1e-3, cache_graph", lambda: ours(True, 1e-3)),
                      ("ours: Lanczos tol 1e-2, cache_graph", lambda: ours(True, 1e-2)),
                      ("pyhessian: power iteration tol 1e-3 (its default)", lambda: peer(1e-3)),
                      ("pyhessian: power iteration tol 1e-6", lambda: peer(1e-6))):
        runs = [cpu(fn) for _ in range(rounds)]
        t = statistics.median(r[0] for r in runs)
        value, hvps = runs[-1][1]
        rows.append(dict(case=name, method=label, seconds=t, hvps=hvps, value=value,
                         rel_err=abs(value - ref) / abs(ref)))
    return rows, ref


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the rows to this JSON file (atomically)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    table = []
    for make in (mlp_case, minilm_case):
        rows, ref = bench(make(a.examples), a.rounds)
        base = next(r["seconds"] for r in rows if r["method"].startswith("pyhessian"))  # its default
        for r in rows:
            r["speedup"] = base / r["seconds"]
            r["ref"] = ref
        table += rows
    print(f"\nthreads {a.threads}, examples {a.examples} (one batch), median of {a.rounds} runs (CPU s)\n")
    print("| model | method | CPU s | Hessian-vector products | λ_max | rel. error vs reference | "
          "speed vs pyhessian default |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['case']} | {r['method']} | {r['seconds']:.2f} | {r['hvps']} | {r['value']:.6g} | "
              f"{r['rel_err']:.1e} | {r['speedup']:.2f}× |")
    if a.json:
        from adapters.io import write_json
        write_json(a.json, {"settings": vars(a), "rows": table})


if __name__ == "__main__":
    main()
