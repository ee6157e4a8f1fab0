"""Hessian spectrum of the training loss at a checkpoint (docs/THEORY.md section 6).

    python -m analysis.hessian CKPT [--top-k 5] [--trace] [--density] [--space trainable|effective|all]
        [--parametrization trained|folded] [--matrices T ...] [--examples 256] [--split train|test] [--seed S]
        [--out DIR] [--formats png,pdf] [--device cuda] [--config FILE.yaml]
        [--task T | --data FILE] [--n-train N] [--n-test N]

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
DIR/hessian_density.{png,pdf} (the figure formats of --formats) with --density. Transformers models are loaded
with eager attention (SDPA has no double backward on CPU). From Python: `run(ckpt, config=None, **settings)` (the
settings of HessianConfig).
"""
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from adapters import command
from adapters.errors import AdapterError, cli
from adapters.settings import AT_LEAST_1, NON_NEGATIVE, POSITIVE, check, make, setting, shaping
from adapters.taskspec import DataChoice, checkpoint_score, examples_arg, task_options
from adapters.io import write_json
from analysis import lanczos, spaces
from adapters.evaluate import batch_loss, eval_mode
from adapters.tasks import class_scores
from analysis.landscape import EXAMPLES_HELP, MATRICES_HELP, PARAMETRIZATION_HELP, SPACE_HELP, SPLITS, to_device

TRACE_METHODS = ("hutchinson", "hutch++")


@dataclass(frozen=True)
class HessianConfig(DataChoice):
    """The settings of analysis.hessian: each field is a flag (python -m analysis.hessian --help) and a keyword of
    run(); those with results=True are hessian.json's "settings"."""
    top_k: int = setting(5, "top eigenvalues by Lanczos (0: none)", check=NON_NEGATIVE)
    trace: bool = setting(False, "estimate the trace (Hutchinson or Hutch++) with its standard error")
    density: bool = setting(False, "estimate the spectral density (stochastic Lanczos quadrature) and draw it")
    space: str = setting("trainable", SPACE_HELP, choices=spaces.SPACES)
    parametrization: str = setting("trained", PARAMETRIZATION_HELP, choices=spaces.PARAMETRIZATIONS)
    matrices: Optional[list[str]] = setting(None, MATRICES_HELP, metavar="T")
    examples: Optional[int] = setting(256, EXAMPLES_HELP, check=AT_LEAST_1, type=examples_arg)
    split: str = setting("train", "the examples the loss is taken over", choices=SPLITS)
    batch_size: int = setting(32, "examples per forward pass", check=AT_LEAST_1)
    seed: int = setting(0, "Lanczos start; trace uses seed+1, SLQ seed+2")
    max_iter: int = setting(100, "Lanczos steps at most (top-k)", check=AT_LEAST_1)
    tol: float = setting(1e-4, "relative Ritz residual for convergence", check=POSITIVE)
    trace_method: str = setting("hutchinson", "the trace estimator", choices=TRACE_METHODS)
    trace_samples: int = setting(32, "Hessian-vector products for the trace (at least 2; 6 for hutch++)",
                                 check=AT_LEAST_1)
    density_steps: int = setting(50, "Lanczos steps per SLQ run", check=AT_LEAST_1)
    density_runs: int = setting(3, "SLQ runs (random starts)", check=AT_LEAST_1)
    sigma: Optional[float] = setting(None, "Gaussian smoothing of the density (default: 1%% of its range)",
                                     check=POSITIVE)
    cache_graph: bool = setting(False, "keep the gradient graphs in memory: one backward per product instead of "
                                "three passes", results=False)
    out: Optional[str] = command.out(None, "hessian.json and the density figure (default: CKPT)")
    device: Optional[str] = command.device("the model runs")
    progress: bool = setting(True, "no progress bars", results=False, flag="--no-progress")
    formats: tuple = command.formats(("png", "pdf"))


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


def check_config(config):
    """What the fields' ranges cannot say: something to compute, and the trace's minimum samples."""
    if not (config.top_k or config.trace or config.density):
        raise AdapterError("nothing to compute: give --top-k ≥ 1, --trace or --density")
    minimum = 6 if config.trace_method == "hutch++" else 2  # Hutch++ spends a third on the sampled part
    if config.trace_samples < minimum:
        raise AdapterError(f"--trace-samples must be ≥ {minimum} for a standard error, got {config.trace_samples}")
    return config


def run(ckpt, config=None, **settings):
    """Hessian estimates of checkpoint `ckpt`; writes DIR/hessian.json (+ density figure); returns the dict.

    config: a HessianConfig (default: its defaults), `settings` replacing its fields."""
    c = check_config(check(make(HessianConfig, config, **settings)))
    import adapters
    from adapters import evaluate as ev
    ckpt = str(ckpt)
    meta = adapters.read_meta(ckpt)
    out = Path(c.out or ckpt)
    device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = adapters.load(ckpt, attn_implementation="eager").eval()
    named, space = spaces.prepare(model, meta, c.space, c.parametrization, c.matrices)
    model.to(device)
    # the checkpoint's own task unless --task / --data name one
    batches = to_device(ev.checkpoint_batches(ckpt, c.split, c.examples, c.batch_size, c.seed, **task_options(c)),
                        device)
    op = HessianOperator(model, [p for _, p in named], batches, cache_graph=c.cache_graph,
                         score=checkpoint_score(ckpt))
    loss, grad = op.gradient()
    result = {"checkpoint": ckpt, "method": meta.get("method"),
              "settings": shaping(c),  # the settings that shape the numbers (HessianConfig's results=True fields)
              "examples": sum(len(b["labels"]) for b in batches), "loss_units": op.count, "loss": loss,
              "grad_norm": float(grad.norm()), "space_tensors": len(named),
              **space}
    result.update(spectrum(op, top_k=c.top_k, trace=c.trace, density=c.density, seed=c.seed, max_iter=c.max_iter,
                           tol=c.tol, trace_method=c.trace_method, trace_samples=c.trace_samples,
                           density_steps=c.density_steps, density_runs=c.density_runs, sigma=c.sigma,
                           progress=c.progress))
    if c.density:
        result["figures"] = [str(p) for p in plot_density(result, out, command.figure_formats(c.formats))]
    write_json(out / "hessian.json", result)
    return result


def parser():
    p = command.parser("python -m analysis.hessian", __doc__, HessianConfig)
    p.add_argument("ckpt", metavar="CKPT")
    return p


@cli
def main(argv=None):
    config, args = command.parse(parser(), HessianConfig, argv)
    r = run(args["ckpt"], config)
    print(f"{r['parameters']} parameters ({r['space']} space, {r['parametrization']['name']}), {r['examples']} "
          f"{config.split} examples, loss {r['loss']:.6g}, ‖∇L‖ {r['grad_norm']:.4g}")
    if "eigenvalues" in r:
        print("| k | eigenvalue | residual |\n|---|---|---|")
        for k, (e, res) in enumerate(zip(r["eigenvalues"], r["eigenvalue_residuals"]), 1):
            print(f"| {k} | {e:.6g} | {res:.2g} |")
        for w in r.get("warnings", []):
            print(f"warning: {w}")
    if "trace" in r:
        print(f"trace {r['trace']:.6g} ± {r['trace_stderr']:.3g} ({r['trace_estimator']['method']})")
    print(f"wrote {Path(config.out or args['ckpt']) / 'hessian.json'}"
          + (f" and {len(r['figures'])} figure files" if r.get("figures") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
