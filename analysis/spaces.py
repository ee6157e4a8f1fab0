"""The parameter spaces landscapes and Hessians are taken in, and the parametrisation of each.

A checkpoint stores every LoRA-family update as one merged link B'·A with the scale folded in: B' = s·B
(docs/CHECKPOINT.md), and `adapters.load` attaches it with scale 1. The method trained B (and A) with s in the
forward, so along B' the loss curves 1/s² as much as along the B the optimiser moved:

    L(B') = L(s·B)   ⇒   ∇²_B L = s² ∇²_B' L.

`as_trained` puts the scale back (s on every adapted layer, B = B'/s; the forward is unchanged up to rounding).

Spaces:
- trainable: the method's own trained scalars in the parametrisation it trained (B, and A where it trains, as
  ΔW = s·B·A; the head; every weight for full fine-tuning). Its size differs by method (22.7 M vs 770 scalars
  in the default study), so its sharpness and λ_max compare curvature of different functions.
- effective: the weights W = W0 + ΔW of the compared matrices (default: the ones the LoRA family adapts, the
  architecture's default targets for fft and head), the update merged into plain linear layers. The loss is
  then the same function of the same variables for every method of one base model: the common space.
- all: every parameter of the model as loaded (frozen W0 included), B and A as trained.
"""
import torch

from adapters.errors import AdapterError

SPACES = ("trainable", "effective", "all")
PARAMETRIZATIONS = ("trained", "folded")


def scale_of(meta, name=None):
    """s of the adapted module `name` as the method trained it: the checkpoint's recorded `scale` (one for every
    module); a PEFT directory's own per module (`scales`: lora_alpha / r after rank_pattern and alpha_pattern,
    / √r under use_rslora), else lora_alpha / r."""
    scales = meta.get("scales")
    if scales is not None and name not in scales:
        raise AdapterError(f"the adapter directory has no scale for {name}: it adapts {', '.join(sorted(scales))}")
    s = scales[name] if scales is not None else meta.get("scale")
    if s is None and meta.get("rank"):
        s = meta["alpha"] / meta["rank"]
    if s is not None and not s > 0:
        raise AdapterError(f"the checkpoint records scale s = {s!r}{f' for {name}' if name else ''}; it must be > 0")
    return s


@torch.no_grad()
def as_trained(model, meta):
    """In place: every adapted layer gets its scale s back (scale_of) and B = B'/s. Returns s, or {layer: s} where
    the layers' scales differ (a PEFT rank_pattern / alpha_pattern); None: no adapter."""
    from adapters.inject import adapted_layers
    layers = adapted_layers(model)
    if not layers:
        return None
    scales = {name: scale_of(meta, name) for name in layers}
    for name, layer in layers.items():
        layer.B.div_(scales[name])
        layer.scale = scales[name]
    return scales if len(set(scales.values())) > 1 else next(iter(scales.values()))


@torch.no_grad()
def merge(model):
    """In place: each adapted layer becomes its plain base layer with weight W0 + ΔW. Returns the merged names."""
    from adapters.inject import adapted_layers, replace_module
    names = []
    for name, layer in adapted_layers(model).items():
        layer.base_weight().add_(layer.delta_weight().to(layer.base_weight().dtype))
        replace_module(model, name, layer.base)
        names.append(name)
    return names


def compared_matrices(model, targets=None, adapted=()):
    """Names of the compared matrices of a merged model, in forward order: `targets` (names, dotted suffixes,
    regexes or all-linear, as training's --targets), or by default the `adapted` layers, and for a model
    without any (fft, head) the architecture's default targets: the matrices a LoRA-family run adapts."""
    from adapters.inject import head_modules, resolve_targets
    if targets is None and adapted:
        return list(adapted)
    return resolve_targets(model, targets, head_modules(model))


def _named_weights(model, names):
    return [(f"{n}.weight", model.get_submodule(n).weight) for n in names]


def prepare(model, meta, space="trainable", parametrization="trained", targets=None):
    """Put a loaded checkpoint model into `space` (in place). Returns (named parameters, description).

    The description goes into hessian.json / landscape.json: the space, the parametrisation and, for the
    effective space, the compared matrices.
    """
    if space not in SPACES:
        raise AdapterError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
    if parametrization not in PARAMETRIZATIONS:
        raise AdapterError(f"--parametrization must be trained or folded, got {parametrization!r}")
    if space == "effective":
        names = compared_matrices(model, targets, merge(model))
        return _named_weights(model, names), {
            "space": space, "matrices": names,
            "parametrization": {"name": "effective", "scale": None,
                                "definition": "W = W0 + ΔW of each compared matrix, merged into the layer's weight"}}
    if targets is not None:
        raise AdapterError("--matrices selects the compared matrices of --space effective only")
    if parametrization == "trained":
        s = as_trained(model, meta)
        p = {"name": "trained", "scale": s,
             "definition": ("ΔW = s·B·A with the scale in the forward, B = B'/s (the checkpoint stores B' = s·B)"
                            if s is not None else "the trained tensors as stored (no adapter scale)")}
    else:
        from adapters.inject import adapted_layers
        p = {"name": "folded", "scale": 1.0 if adapted_layers(model) else None,
             "definition": "B' = s·B as stored, scale 1 in the forward: curvature along B' is 1/s² of that along B"}
    return space_parameters(model, space), {"space": space, "matrices": None, "parametrization": p}


def base_reference(ckpt, names):
    """W0 of each compared matrix (`names` as from `compared_matrices`), from the pretrained model: the rows
    that filter-normalise effective-space directions, shared by every method of one base model."""
    import adapters
    base = adapters.load_base(ckpt)
    return [base.get_submodule(n).weight.detach() for n in names]


def space_parameters(model, space):
    """[(name, parameter)]: the trainable ones, or every one, as the model stands (no reparametrisation)."""
    if space not in ("trainable", "all"):
        raise AdapterError(f"--space must be trainable or all here, got {space!r}")
    named = [(n, p) for n, p in model.named_parameters() if space == "all" or p.requires_grad]
    if not named:
        raise AdapterError("the model has no trainable parameters; use --space all")
    return named
