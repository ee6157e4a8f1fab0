"""Hessian spectrum of the training loss at a checkpoint (docs/THEORY.md section 6).

    python -m analysis.hessian CKPT [--top-k 5] [--trace] [--density] [--space trainable|effective|all]
        [--parametrization trained|folded] [--matrices T ...] [--examples 256] [--split train|test] [--seed S]
        [--out DIR] [--task T | --data FILE] [--n-train N] [--n-test N]

H = ∇²L(θ*) over the chosen parameters, L the task's own loss over the examples (of the checkpoint's recorded
task, or of --task / --data), in eval mode (dropout off). The space and its parametrisation are
analysis.spaces': by default the method's trained scalars as it trained them (B with the scale s in the forward,
not the stored B' = s·B,
whose curvature is 1/s² as large); `--space effective` takes W0 + ΔW of the compared matrices, the same
variables for every method. H is never formed: Hessian-vector products come from double backward,
H v = ∇_θ (∇_θ L · v), accumulated over batches. On top of that (analysis.lanczos): the top-k
eigenvalues by Lanczos with full reorthogonalisation, the trace by Hutchinson (or Hutch++) with
its standard error, and the spectral density by stochastic Lanczos quadrature.

Writes DIR/hessian.json (eigenvalues descending, Lanczos convergence, trace, trace_stderr, settings,
seeds, the space and its parametrisation) and
DIR/hessian_density.{png,pdf} with --density. Transformers models are loaded with eager attention
(SDPA has no double backward on CPU).
"""
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from adapters.errors import AdapterError, ArgumentParser, cli
from adapters.taskspec import TASK_OPTIONS, add_task_arguments, checkpoint_score, examples_arg, task_options
from adapters.io import write_json
from analysis import lanczos, spaces
from adapters.evaluate import batch_loss, eval_mode
from adapters.tasks import class_scores
from analysis.landscape import SPLITS, to_device

DEFAULTS = dict(top_k=5, trace=False, density=False, space="trainable", parametrization="trained", matrices=None,
                examples=256, split="train",
                batch_size=32, seed=0, out=None, device=None, cache_graph=False, max_iter=100, tol=1e-4,
                trace_method="hutchinson", trace_samples=32, density_steps=50, density_runs=3, sigma=None,
                progress=True, formats=("png", "pdf"), **dict.fromkeys(TASK_OPTIONS))


@contextmanager
def only_grad(model, params):
    """requires_grad exactly on `params` (so double backward builds no graph for the rest), restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


class HessianOperator:
    """v ↦ H v for L = (1/N) Σ_units ℓ over `batches` (the task's loss, `score`: N examples for a classifier, N
    scored tokens for a causal LM), w.r.t. `params`, on flat vectors.

    cache_graph=True keeps each batch's differentiable gradient graph, so a product costs one
    backward pass instead of forward + backward + backward: faster, but it holds every batch's
    activations (and their graph) in memory for the whole computation.
    """

    def __init__(self, model, params, batches, cache_graph=False, score=class_scores):
        self.model, self.params, self.batches, self.score = model, list(params), batches, score
        self.cache_graph, self._cache = cache_graph, None
        self.n = sum(p.numel() for p in self.params)
        with eval_mode(model), torch.no_grad():  # N, as the task counts units (one forward pass per batch)
            self.count = sum(batch_loss(model, b, score)[2] for b in batches)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.matvecs = 0

    def _grads(self, batch, create_graph):
        loss = batch_loss(self.model, batch, self.score)[0] / self.count
        g = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        return loss, g

    def gradient(self):
        """Full-batch loss and gradient (flat)."""
        total, flat = 0.0, torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with eval_mode(self.model), only_grad(self.model, self.params):
            for b in self.batches:
                loss, g = self._grads(b, create_graph=False)
                total += float(loss.detach())
                flat += torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                   for x, p in zip(g, self.params)])
        return total, flat

    def __call__(self, v):
        v = v.to(dtype=self.dtype, device=self.device)
        vs, i = [], 0
        for p in self.params:
            vs.append(v[i:i + p.numel()].view_as(p))
            i += p.numel()
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with eval_mode(self.model), only_grad(self.model, self.params):
            if self.cache_graph and self._cache is None:
                self._cache = [self._grads(b, create_graph=True)[1] for b in self.batches]
            for k_batch, b in enumerate(self.batches):
                g = self._cache[k_batch] if self.cache_graph else self._grads(b, create_graph=True)[1]
                # Only gradients that depend on θ contribute; others have zero derivative.
                keep = [k for k, x in enumerate(g) if x is not None and x.requires_grad]
                hv = torch.autograd.grad([g[k] for k in keep], self.params, grad_outputs=[vs[k] for k in keep],
                                         allow_unused=True, retain_graph=self.cache_graph)
                out += torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                  for x, p in zip(hv, self.params)]).detach()
        self.matvecs += 1
        return out


def spectrum(op, *, top_k=5, trace=False, density=False, seed=0, max_iter=100, tol=1e-4,
             trace_method="hutchinson", trace_samples=32, density_steps=50, density_runs=3,
             sigma=None, progress=True):
    """The estimates on a HessianOperator (or any v ↦ Hv with .n/.dtype/.device); seeds recorded."""
    like = torch.zeros(1, dtype=op.dtype, device=op.device)
    out = {"parameters": op.n}
    t0 = time.perf_counter()
    if top_k:
        top = lanczos.top_eigenvalues(op, op.n, top_k, max_iter=max_iter, tol=tol, seed=seed, like=like,
                                      progress=progress)
        out.update(eigenvalues=top["eigenvalues"], eigenvalue_residuals=top["residuals"],
                   lambda_min_ritz=top["lambda_min"],
                   lanczos={"iterations": top["iterations"], "converged": top["converged"], "tol": tol,
                            "seed": seed, "reorthogonalisation": "full (two Gram-Schmidt passes)"})
        if not top["converged"]:
            out["warnings"] = [f"Lanczos did not reach tol {tol} in {max_iter} steps; raise --max-iter"]
    if trace:
        est = lanczos.hutchpp if trace_method == "hutch++" else lanczos.hutchinson
        tr = est(op, op.n, trace_samples, seed=seed + 1, like=like, progress=progress)
        out.update(trace=tr["trace"], trace_stderr=tr["stderr"],
                   trace_estimator={k: tr[k] for k in ("method", "matvecs", "seed", "samples")})
    if density:
        d = lanczos.slq(op, op.n, density_steps, density_runs, seed=seed + 2, like=like, progress=progress)
        t, phi, sig = lanczos.slq_density(d["nodes"], d["weights"], sigma)
        out["density"] = {**d, "sigma": sig, "grid": t.tolist(), "values": phi.tolist(),
                          "definition": "φ(t) = mean over runs of Σ_i τ_i N(t; θ_i, σ²); Rademacher starts"}
    out["seconds"] = time.perf_counter() - t0
    out["hessian_vector_products"] = getattr(op, "matvecs", None)
    return out


def plot_density(result, out_dir, formats):
    import matplotlib.pyplot as plt
    from analysis import style
    style.use()
    d = result["density"]
    fig, ax = plt.subplots()
    m = result.get("method") or ""
    ax.semilogy(d["grid"], np.maximum(d["values"], 1e-12), color=style.color(m), linestyle=style.linestyle(m))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_ylim(bottom=max(1e-8, min(np.max(d["values"]) * 1e-8, 1e-3)))
    ax.set_title(f"Hessian spectral density (SLQ, σ = {d['sigma']:.3g}): {style.label(m) if m else ''}")
    return style.save(fig, out_dir, "hessian_density", formats)


def _settings(settings):
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise AdapterError(f"unknown hessian setting(s): {', '.join(sorted(unknown))}")
    s = {**DEFAULTS, **settings}
    if not isinstance(s["top_k"], int) or s["top_k"] < 0:
        raise AdapterError(f"--top-k must be an integer ≥ 0, got {s['top_k']!r}")
    if not (s["top_k"] or s["trace"] or s["density"]):
        raise AdapterError("nothing to compute: give --top-k ≥ 1, --trace or --density")
    if s["split"] not in SPLITS:
        raise AdapterError(f"--split must be train or test, got {s['split']!r}")
    if s["space"] not in spaces.SPACES or s["parametrization"] not in spaces.PARAMETRIZATIONS:
        raise AdapterError(f"--space must be one of {', '.join(spaces.SPACES)} and --parametrization one of "
                           f"{', '.join(spaces.PARAMETRIZATIONS)}, got {s['space']!r}, {s['parametrization']!r}")
    if s["examples"] is not None and (not isinstance(s["examples"], int) or s["examples"] < 1):
        raise AdapterError(f"--examples must be a positive integer or all, got {s['examples']!r}")
    if s["trace_method"] not in ("hutchinson", "hutch++"):
        raise AdapterError(f"--trace-method must be hutchinson or hutch++, got {s['trace_method']!r}")
    minimum = 6 if s["trace_method"] == "hutch++" else 2  # Hutch++ spends a third on the sampled part
    if s["trace_samples"] < minimum:
        raise AdapterError(f"--trace-samples must be ≥ {minimum} for a standard error, got {s['trace_samples']}")
    for k in ("max_iter", "density_steps", "density_runs", "batch_size"):
        if s[k] < 1:
            raise AdapterError(f"--{k.replace('_', '-')} must be ≥ 1, got {s[k]}")
    if not s["tol"] > 0 or (s["sigma"] is not None and not s["sigma"] > 0):
        raise AdapterError("--tol and --sigma must be > 0")
    return s


def run(ckpt, **settings):
    """Hessian estimates of checkpoint `ckpt`; writes DIR/hessian.json (+ density figure); returns the dict."""
    s = _settings(settings)
    import adapters
    from adapters import evaluate as ev
    ckpt = str(ckpt)
    meta = adapters.read_meta(ckpt)
    out = Path(s["out"] or ckpt)
    device = torch.device(s["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = adapters.load(ckpt, attn_implementation="eager").eval()
    named, space = spaces.prepare(model, meta, s["space"], s["parametrization"], s["matrices"])
    model.to(device)
    data = {k: s[k] for k in TASK_OPTIONS}  # the checkpoint's own task unless --task / --data name one
    batches = to_device(ev.checkpoint_batches(ckpt, s["split"], s["examples"], s["batch_size"], s["seed"], **data),
                        device)
    op = HessianOperator(model, [p for _, p in named], batches, cache_graph=s["cache_graph"],
                         score=checkpoint_score(ckpt))
    loss, grad = op.gradient()
    result = {"checkpoint": ckpt, "method": meta.get("method"),
              "settings": {k: v for k, v in s.items() if k not in ("out", "progress", "device", "formats")},
              "examples": sum(len(b["labels"]) for b in batches), "loss_units": op.count, "loss": loss,
              "grad_norm": float(grad.norm()), "space_tensors": len(named),
              **space}
    result.update(spectrum(op, **{k: s[k] for k in ("top_k", "trace", "density", "seed", "max_iter", "tol",
                                                   "trace_method", "trace_samples", "density_steps",
                                                   "density_runs", "sigma", "progress")}))
    if s["density"]:
        result["figures"] = [str(p) for p in plot_density(result, out, s["formats"])]
    write_json(out / "hessian.json", result)
    return result


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m analysis.hessian", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--density", action="store_true")
    p.add_argument("--space", default="trainable", choices=spaces.SPACES,
                   help="trainable: the method's trained scalars; effective: W0+ΔW of the compared matrices; all")
    p.add_argument("--parametrization", default="trained", choices=spaces.PARAMETRIZATIONS,
                   help="trained: B with the scale in the forward (as trained); folded: the stored B' = s·B")
    p.add_argument("--matrices", nargs="+", default=None, metavar="T",
                   help="--space effective: the compared matrices (names, suffixes, regexes or all-linear; "
                        "default: the adapted ones, or the architecture's default targets)")
    p.add_argument("--examples", type=examples_arg, default=256)
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="Lanczos start; trace uses seed+1, SLQ seed+2")
    p.add_argument("--max-iter", type=int, default=100, help="Lanczos steps at most (top-k)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative Ritz residual for convergence")
    p.add_argument("--trace-method", default="hutchinson", choices=("hutchinson", "hutch++"))
    p.add_argument("--trace-samples", type=int, default=32, help="Hessian-vector products for the trace")
    p.add_argument("--density-steps", type=int, default=50)
    p.add_argument("--density-runs", type=int, default=3)
    p.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing (default 1%% of the range)")
    p.add_argument("--out", default=None, help="output directory (default: CKPT)")
    p.add_argument("--device", default=None)
    p.add_argument("--cache-graph", action="store_true",
                   help="keep the gradient graphs in memory: one backward per product instead of three passes")
    p.add_argument("--no-progress", action="store_true")
    add_task_arguments(p)
    a = p.parse_args(argv)
    r = run(a.ckpt, **task_options(a), cache_graph=a.cache_graph, top_k=a.top_k, trace=a.trace, density=a.density,
            space=a.space, parametrization=a.parametrization, matrices=a.matrices, examples=a.examples,
            split=a.split, batch_size=a.batch_size, seed=a.seed, max_iter=a.max_iter, tol=a.tol,
            trace_method=a.trace_method, trace_samples=a.trace_samples, density_steps=a.density_steps,
            density_runs=a.density_runs, sigma=a.sigma, out=a.out, device=a.device, progress=not a.no_progress)
    print(f"{r['parameters']} parameters ({r['space']} space, {r['parametrization']['name']}), {r['examples']} "
          f"{a.split} examples, loss {r['loss']:.6g}, ‖∇L‖ {r['grad_norm']:.4g}")
    if "eigenvalues" in r:
        print("| k | eigenvalue | residual |\n|---|---|---|")
        for k, (e, res) in enumerate(zip(r["eigenvalues"], r["eigenvalue_residuals"]), 1):
            print(f"| {k} | {e:.6g} | {res:.2g} |")
        for w in r.get("warnings", []):
            print(f"warning: {w}")
    if "trace" in r:
        print(f"trace {r['trace']:.6g} ± {r['trace_stderr']:.3g} ({r['trace_estimator']['method']})")
    print(f"wrote {Path(a.out or a.ckpt) / 'hessian.json'}")
    return 0


if __name__ == "__main__":
    main()
