"""Putting a method on a model: resolve targets, freeze, wrap layers, and the public operations on them."""
import re

import torch
from . import models, tasks
from .errors import AdapterError
from .layers import LINEAR, AdaptedLinear, out_in_weight
from .methods import get_method, layer_seed, resolve_chain_length

# Default targets per architecture family (config.model_type): query and value projections, as in
# the paper. GPT-2 fuses q, k, v in one Conv1D (c_attn).
DEFAULT_TARGETS = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "vit", "electra", "camembert", "mpnet"],
                    ["query", "value"]),
    **dict.fromkeys(["deberta", "deberta-v2"], ["query_proj", "value_proj"]),
    "distilbert": ["q_lin", "v_lin"],
    **dict.fromkeys(["gpt2"], ["c_attn"]),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt"],
                    ["q_proj", "v_proj"]),
    # transformers 5 names DINOv2's projections q_proj/v_proj (4.x: attention.query/value, pass them as targets).
    "dinov2": ["q_proj", "v_proj"],
}
ALL_LINEAR = "all-linear"


def head_modules(model):
    """The task head's top-level module names (see models.head_names); none for a plain torch model."""
    return models.head_names(model) if getattr(model, "base_model_prefix", None) else []


def _matches(pattern, name):
    """A target matches a module by exact name, dotted suffix, or (full-match) regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def resolve_targets(model, targets=None, head=()):
    """Names of the Linear/Conv1D modules (outside the head) that `targets` selects, in forward order."""
    if targets is None:
        family = getattr(getattr(model, "config", None), "model_type", None)
        if family not in DEFAULT_TARGETS:
            raise AdapterError(f"no default targets for model type {family!r}; pass targets=[...] "
                               f"(module names, dotted suffixes, regexes, or {ALL_LINEAR!r})")
        targets = DEFAULT_TARGETS[family]
    if isinstance(targets, str):
        targets = [targets]
    linear = [name for name, mod in model.named_modules()
              if isinstance(mod, LINEAR) and not models.in_modules(name, head)]
    if ALL_LINEAR in targets:
        return linear
    for t in targets:
        if not any(_matches(t, name) for name in linear):
            raise AdapterError(f"target {t!r} matches no linear layer of the model "
                               f"(for example: {', '.join(linear[:3])})")
    return [name for name in linear if any(_matches(t, name) for t in targets)]


def owner(model, name):
    """(the module that holds submodule, parameter or buffer `name` of `model`, the attribute it holds it under)."""
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def replace_module(model, name, new):
    """Put module `new` where `model` holds its submodule `name` (a dotted path)."""
    setattr(*owner(model, name), new)


def adapted_layers(model):
    """{module name: AdaptedLinear} in forward (registration) order."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, AdaptedLinear)}


def apply(model, method, *, rank=16, alpha=32, targets=None, chain_length=None, seed=0, head=None, dropout=0.0):
    """Make `model` train with `method` (in place) and return it.

    Freezes everything, wraps the target layers in AdaptedLinear, and leaves trainable exactly the
    method's trained scalars plus the task head (`head`: top-level module names; default: a classifier's head, found
    by `head_modules`; none for a causal LM, whose lm_head is pretrained, unless the method is head-only).
    `dropout` is LoRA dropout on the adapter path's input (PEFT's lora_dropout). `chain_length`: the links k of a
    chained method, default the method's (adapters.methods; 1 for every other method), as adapters.train's.
    The settings are kept on the model as `model.adapter_settings`.
    """
    record = get_method(method)
    chain_length = resolve_chain_length(method, chain_length)
    if hasattr(model, "adapter_settings"):
        raise AdapterError("adapters already applied to this model")
    if not isinstance(chain_length, int) or chain_length < 1:
        raise AdapterError(f"chain_length must be an integer >= 1, got {chain_length!r}")
    chained = record.adapter is not None and record.adapter.chained
    if chain_length > 1 and not chained:
        raise AdapterError(f"method {method!r} is not chained; chain_length must be 1, got {chain_length}")
    if record.adapter is not None and (not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"rank must be an integer >= 1, got {rank!r}")
    if record.adapter is not None and not alpha > 0:
        raise AdapterError(f"alpha must be > 0 (the scale s = alpha/r multiplies the update), got {alpha!r}")
    if not 0 <= dropout < 1:
        raise AdapterError(f"dropout must be in [0, 1), got {dropout!r}")
    if record.adapter is None and (targets is not None or dropout):
        raise AdapterError(f"method {method!r} has no adapter layers: targets and dropout do not apply")
    if head is None:  # a classifier's new head trains; a causal LM's own lm_head only under head-only training
        head = tasks.for_model(model).trained_head(model, record) if getattr(model, "base_model_prefix", None) else []
    head = list(head)

    for p in model.parameters():
        p.requires_grad_(record.trains_base)
    names = []
    if record.adapter is not None:
        names = resolve_targets(model, targets, head)
        for name in names:
            base = model.get_submodule(name)
            n, m = out_in_weight(base).shape
            if rank > min(m, n):
                raise AdapterError(f"rank {rank} is larger than layer {name} allows "
                                   f"(in {m}, out {n}: rank <= {min(m, n)})")
            layer = AdaptedLinear(base, record.adapter, rank, alpha, chain_length, layer_seed(seed, name), dropout)
            replace_module(model, name, layer)
    for h in head:
        for p in model.get_submodule(h).parameters():
            p.requires_grad_(True)
    model.adapter_settings = dict(method=method, rank=rank, alpha=alpha, chain_length=chain_length,
                                  seed=seed, targets=names, head=head, dropout=dropout)
    return model


def delta_weights(model):
    """{module name: ΔW (n×m)} = Σ_j s·B_j·A_j over every link so far."""
    return {name: layer.delta_weight() for name, layer in adapted_layers(model).items()}


def base_weights(model):
    """{module name: W0 (n×m)} of the adapted layers."""
    return {name: layer.base_weight().detach() for name, layer in adapted_layers(model).items()}


def selectors(model):
    """{module name: [[columns of link 1], ...]} for selector methods (empty for dense A)."""
    return {name: layer.selectors() for name, layer in adapted_layers(model).items() if layer.spec.selector}


def next_link(model, optimizer=None):
    """End the current link in every adapted layer: fold it, re-initialise, reset optimizer state."""
    layers = adapted_layers(model)
    if not layers or not next(iter(layers.values())).spec.chained:
        raise AdapterError("next_link needs a chained method (cola, rac, c3la, rc3la)")
    for layer in layers.values():
        if layer.link + 1 >= layer.k:
            raise AdapterError(f"all {layer.k} links of the chain are used; chain_length={layer.k}")
        layer.next_link()
        if optimizer is not None:
            # The re-initialised factors start afresh: Adam moments and step count of the old link
            # would otherwise drive the new B away from 0 on its first step.
            for p in (layer.B, getattr(layer, "A", None)):
                if p is not None:
                    optimizer.state.pop(p, None)


def trained_parameters(model):
    """Trained scalars per adapted layer (m_i, n_i, count over all links), adapter/head/other totals."""
    settings = getattr(model, "adapter_settings", {})
    head = settings.get("head", head_modules(model))
    count = lambda params: sum(p.numel() for p in params if p.requires_grad)  # noqa: E731
    head_count = count(p for h in head for p in model.get_submodule(h).parameters())
    layers, adapter = [], 0
    for name, layer in adapted_layers(model).items():
        n, m = layer.shape
        trained = layer.trained_parameters()
        layers.append(dict(name=name, m=m, n=n, trained=trained))
        adapter += trained
    in_adapters = {id(p) for layer in adapted_layers(model).values() for p in layer.parameters()}
    in_head = {id(p) for h in head for p in model.get_submodule(h).parameters()}
    other = count(p for p in model.parameters() if id(p) not in in_adapters | in_head)
    if not layers and other:  # full fine-tuning: report each trained weight matrix as a layer
        for name, mod in model.named_modules():
            if isinstance(mod, LINEAR) and not models.in_modules(name, head) and mod.weight.requires_grad:
                n, m = out_in_weight(mod).shape
                layers.append(dict(name=name, m=m, n=n, trained=count(mod.parameters())))
    return dict(layers=layers, adapter=adapter, head=head_count, other=other,
                total=adapter + head_count + other)


def trained_scalars_so_far(model):
    """Trained scalars of the links started so far (link j of k: j/k of each chained layer's count) + the rest."""
    count = trained_parameters(model)
    later = sum(l.trained_parameters() // l.k * (l.k - l.link - 1) for l in adapted_layers(model).values())
    return count["total"] - later


def unwrap(model):
    """The adapters.apply model inside DDP / accelerate wrappers."""
    while not hasattr(model, "adapter_settings") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "adapter_settings"):
        raise AdapterError("the model has no adapters: prepare it with adapters.apply(model, method, ...) first")
    return model


def param_groups(model, lr, weight_decay=0.0, lr_ratio=None, head_lr_mult=None):
    """Optimizer parameter groups: B factors get lr·λ (λ = lr_ratio or the method's default, LoRA+), the task head
    lr·μ (μ = head_lr_mult or the method's: 10 for fft and head-only, as in the paper), the rest lr."""
    settings = getattr(model, "adapter_settings", {})
    method = get_method(settings["method"]) if "method" in settings else None
    layers = adapted_layers(model).values()
    ratio = lr_ratio if lr_ratio is not None else (next(iter(layers)).spec.lr_ratio if layers else 1.0)
    mult = head_lr_mult if head_lr_mult is not None else (method.head_lr_mult if method else 1.0)
    b_ids = {id(layer.B) for layer in layers}
    head_ids = {id(p) for h in settings.get("head", []) for p in model.get_submodule(h).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in trainable if id(p) not in b_ids | head_ids], lr=lr),
              dict(params=[p for p in trainable if id(p) in b_ids], lr=lr * ratio),
              dict(params=[p for p in trainable if id(p) in head_ids], lr=lr * mult)]
    return [dict(g, weight_decay=weight_decay) for g in groups if g["params"]]


@torch.no_grad()
def attach_factors(model, factors, *, selector, train_a, head=()):
    """Re-attach saved updates as one merged link per layer: ΔW = B @ A, scale 1 (used by load).

    `factors` = {name: (B n×R, A R×m or column indices R)}; B trains, A trains iff `train_a`.
    """
    from .methods import Adapter
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (B, A) in factors.items():
        rank = B.shape[1]
        adapter = Adapter(make_a=lambda m, r, link, seed, A=A: A.clone(), selector=selector, train_a=train_a)
        layer = AdaptedLinear(model.get_submodule(name), adapter, rank, alpha=rank)
        layer.B.copy_(B)
        replace_module(model, name, layer)
    for h in head:
        for p in model.get_submodule(h).parameters():
            p.requires_grad_(True)
    return model
