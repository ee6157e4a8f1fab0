"""Live diagnostics of a model while it trains: the toolkit's monitor for the training hook of adapters.tracking.

    monitor = Diagnostics(n_examples=len(train))          # or Diagnostics(["intruders", "mi_bound"], ...)
    adapters.train.train(..., monitor=monitor)            # at each evaluation, logged with the losses
    AdaptersCallback.attach(trainer, monitor=monitor)     # in a stock Trainer: at each logging step

Each value is the toolkit's own math on the current weights: intruders, ‖ΔW‖ and stable rank by
analysis.spectral.analyse_matrix, the MI bound by bounds.mi, λ_max by analysis.hessian's Lanczos.
Registered as the entry point `diagnostics` of adapters.tracking.MONITORS, so `adapters.train --report-to` finds it.
"""
import math

import torch

from adapters.errors import AdapterError
from adapters.inject import adapted_layers, trained_scalars_so_far, unwrap
from adapters.tasks import class_scores
from analysis import spectral, svd_cache
from analysis.hessian import HessianOperator, spectrum
from analysis.landscape import to_device
from bounds.mi import mi_bound

CHEAP = ("intruders", "delta_norm", "stable_rank", "mi_bound")
COSTLY = ("lambda_max",)
PREFIX = "adapters/"


def _which(which):
    names = CHEAP if which is True else () if not which else (which,) if isinstance(which, str) else tuple(which)
    unknown = [n for n in names if n not in CHEAP + COSTLY]
    if unknown:
        raise AdapterError(f"unknown diagnostic {unknown[0]!r}; choose from {', '.join(CHEAP + COSTLY)}")
    return names


def diagnostics(model, which=True, *, eps=0.5, k=10, n_examples=None, sigma=1.0, batches=None, lanczos_steps=10,
                base=None, score=None):
    """{name: float} of the model as it is now, names prefixed "adapters/":

    intruders/<layer> (top-k left singular vectors of W0 + ΔW with max |cos| to W0's below ε, and their
    total), delta_norm/<layer> (‖ΔW‖_F), stable_rank/<layer> (‖ΔW‖_F² / ‖ΔW‖₂², NaN for ΔW = 0): per adapted
    matrix, by analysis.spectral.analyse_matrix. mi_bound: bounds.mi.mi_bound over trained_scalars (the links
    started so far) for `n_examples` training examples and σ = `sigma` (the bound is linear in σ: σ = 1 gives
    it per unit σ). lambda_max: the top Hessian eigenvalue of the mean loss over `batches` (trained
    parameters, eval mode) after `lanczos_steps` Lanczos steps (analysis.hessian, analysis.lanczos); the
    attention must be twice differentiable (attn_implementation="eager" on CPU).
    `base`: a dict that caches W0's SVD per layer across calls (W0 is frozen, so one SVD per run). `score`: the
    task type's (adapters.tasks; default: classification), which says what the loss of `batches` is.
    """
    names, model, out = _which(which), unwrap(model), {}
    if {"intruders", "delta_norm", "stable_rank"} & set(names):
        base = {} if base is None else base
        total = 0
        for name, layer in adapted_layers(model).items():
            W0 = layer.base_weight().detach()
            if name not in base:
                base[name] = svd_cache.svd(W0, "left")
            with torch.no_grad():
                rec = spectral.analyse_matrix(name, W0, layer.delta_weight(), k=k, eps=eps, base=base[name])
            total += rec["intruders"]
            if "intruders" in names:
                out[f"intruders/{name}"] = rec["intruders"]
            if "delta_norm" in names:
                out[f"delta_norm/{name}"] = rec["delta_norm_fro"]
            if "stable_rank" in names:
                out[f"stable_rank/{name}"] = rec["delta_stable_rank"] if rec["delta_stable_rank"] else math.nan
        if "intruders" in names:
            out["intruders_total"] = total
    if "mi_bound" in names:
        if n_examples is None:
            raise AdapterError("the mi_bound diagnostic needs n_examples (the training set size)")
        scalars = trained_scalars_so_far(model)
        bits = torch.finfo(next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)).bits
        out.update(trained_scalars=scalars, mi_bound=mi_bound(scalars, n_examples, sigma, bits))
    if "lambda_max" in names:
        if not batches:
            raise AdapterError("the lambda_max diagnostic needs batches (a list of dict batches with labels)")
        params = [p for p in model.parameters() if p.requires_grad]
        op = HessianOperator(model, params, to_device(batches, params[0].device), score=score or class_scores)
        out["lambda_max"] = spectrum(op, top_k=1, max_iter=lanczos_steps, progress=False)["eigenvalues"][0]
    return {PREFIX + key: float(value) for key, value in out.items()}


class Diagnostics:
    """`diagnostics` for one training run, as a monitor (adapters.tracking): W0's SVDs computed once, lambda_max
    every `lanczos_every` steps. `values = monitor(model, step)`; `start(n_examples=N)` sets the training set's
    size for the MI bound when it was not given."""

    def __init__(self, which=True, *, eps=0.5, k=10, n_examples=None, sigma=1.0, lanczos_every=None,
                 lanczos_batches=None, lanczos_steps=10, score=None):
        self.which = _which(which)
        if lanczos_every is not None and "lambda_max" not in self.which:
            self.which += ("lambda_max",)
        if "lambda_max" in self.which and not lanczos_batches:
            raise AdapterError("lambda_max needs lanczos_batches (a list of dict batches with labels)")
        self.settings = dict(eps=eps, k=k, n_examples=n_examples, sigma=sigma, batches=lanczos_batches,
                             lanczos_steps=lanczos_steps, score=score)
        self.every, self.last_lanczos, self.base = lanczos_every, None, {}

    def __call__(self, model, step):
        costly = "lambda_max" in self.which and (self.every is None or self.last_lanczos is None
                                                 or step - self.last_lanczos >= self.every)
        if costly:
            self.last_lanczos = step
        which = [w for w in self.which if w != "lambda_max" or costly]
        return diagnostics(model, which, base=self.base, **self.settings) if which else {}

    def start(self, n_examples):
        if self.settings["n_examples"] is None and "mi_bound" in self.which:
            self.settings["n_examples"] = n_examples
