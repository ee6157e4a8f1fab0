"""Checkpoint directories (docs/CHECKPOINT.md): save, load, and the views analysis needs.

A LoRA-family update is exactly a LoRA of rank k·r (B_cat = [s·B_1 … s·B_k], A_cat = [A_1; …; A_k]),
so it is saved as a stock PEFT LoRA adapter with scaling 1; `fft` and `head` save their trained tensors.
Our own metadata (method, selectors, seeds, base hash, parameter counts) sits beside it.
"""
import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import models, tasks
from .errors import CheckpointError
from .inject import adapted_layers, attach_factors, trained_parameters
from .io import atomic_dir, write_json
from .layers import LINEAR, as_out_in, is_transposed
from .methods import get_method

FORMAT_VERSION = 1
META, STATS = "adapters_meta.json", "training_stats.json"
PEFT_CONFIG, PEFT_WEIGHTS, TRAINED = "adapter_config.json", "adapter_model.safetensors", "trained.safetensors"
# The files that fix a checkpoint's fine-tuned function on a verified base, whichever the method: a LoRA-family
# adapter's scaling and weights, fft's and head's trained tensors.
WEIGHT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, TRAINED)
PEFT_PREFIX = "base_model.model."
weights_hash = models.weights_hash


def save(model, path, *, base_model, base_model_hash, task_type="classification", extra_meta=None, files=None,
         overwrite=False):
    """Write `model` (with adapters applied) as a checkpoint directory at `path`, atomically.

    `task_type`: what the model was trained for (adapters.tasks), which says how to rebuild its base and which
    PEFT task_type the adapter carries. `files`: optional {relative name: callable(full path)} for more content
    (training stats, trajectory snapshots) written inside the same atomic directory.
    """
    settings = model.adapter_settings
    spec = get_method(settings["method"])
    kind = tasks.get_task_type(task_type)
    layers = adapted_layers(model)
    meta = dict(format_version=FORMAT_VERSION, **settings, task_type=kind.name,
                scale=settings["alpha"] / settings["rank"],
                link_boundaries=[], selectors={n: l.selectors() for n, l in layers.items() if l.spec.selector},
                layer_seeds={n: l.seed for n, l in layers.items()},
                base_model=str(base_model), base_model_hash=base_model_hash,
                num_labels=model.config.num_labels if kind.new_head else None,
                bits=torch.finfo(_trained_dtype(model)).bits,
                parameters=trained_parameters(model))
    meta.update(extra_meta or {})
    with atomic_dir(path, overwrite=overwrite) as tmp:
        head_state = {k: v for k, v in model.state_dict().items()
                      if models.in_modules(k, settings["head"])}
        if spec.adapter is None:
            state = model.state_dict() if spec.trains_base else head_state
            save_file(_unshared(state), str(tmp / TRAINED))
        else:
            _save_peft(model, tmp, layers, head_state, base_model, kind.peft_task_type)
        write_json(tmp / META, meta)
        for name, write in (files or {}).items():
            write(tmp / name)


def _unshared(state):
    """The state's tensors with each storage saved once: tied weights (an LM's lm_head and input embeddings) are
    one tensor under two names, which safetensors refuses; loading one name sets both."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().contiguous()
    return out


def _trained_dtype(model):
    return next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)


def _save_peft(model, directory, layers, head_state, base_model, peft_task_type):
    import peft
    settings = model.adapter_settings
    tensors = {}
    for name, layer in layers.items():
        B, A = layer.factors()
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    tensors.update({PEFT_PREFIX + k: v.detach().contiguous() for k, v in head_state.items()})
    rank = settings["rank"] * settings["chain_length"]
    config = peft.LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=settings["dropout"], target_modules=list(layers),
        modules_to_save=settings["head"] or None, task_type=peft_task_type,
        fan_in_fan_out=any(is_transposed(l.base) for l in layers.values()),
        base_model_name_or_path=models.resolve_model(base_model))
    # PEFT keeps target_modules as a set, written in the order of Python's per-process string hash: sorted here,
    # so the same run writes the same adapter_config.json (and the same weights digest) every time.
    config.target_modules = sorted(layers)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / PEFT_WEIGHTS))


# -- reading ------------------------------------------------------------------------------------

def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {what} {path}: {e}") from None


def _check_dir(path):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    if not ((path / META).exists() or (path / PEFT_CONFIG).exists()):
        raise CheckpointError(f"not a checkpoint: {path} has neither {META} nor {PEFT_CONFIG}")
    return path


def read_meta(path):
    """Our metadata; for a plain PEFT LoRA directory, the same keys read off adapter_config.json."""
    path = _check_dir(path)
    if (path / META).exists():
        meta = _read_json(path / META, "checkpoint metadata")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path / META}: unsupported format_version {meta.get('format_version')!r}")
        return meta
    config = _peft_config(path)
    if not config.get("base_model_name_or_path"):
        raise CheckpointError(f"{path / PEFT_CONFIG}: not a LoRA adapter with base_model_name_or_path")
    heads = config.get("modules_to_save") or []
    tensors = _read_tensors(path / PEFT_WEIGHTS)
    head_shapes = {k: v.shape for k, v in tensors.items() if k.endswith(".weight")}
    # each adapted module's own s as PEFT applies it (rank_pattern, alpha_pattern, use_rslora)
    scales = {name: _peft_scaling(config, name)[1] for name in _lora_modules(tensors)}
    num_labels = next((shape[0] for k, shape in head_shapes.items()
                       if any(f".{h}." in k for h in heads) and len(shape) == 2), 2)
    return dict(format_version=FORMAT_VERSION, method="lora", rank=config["r"], alpha=config["lora_alpha"],
                chain_length=1, dropout=config.get("lora_dropout", 0.0), base_model=config["base_model_name_or_path"],
                base_model_hash=None, num_labels=num_labels, head=sorted(set(heads)), bits=32, peft=True,
                task_type=_peft_task_type(config), scales=scales)


def _peft_task_type(config):
    """Our task type for a PEFT adapter: by its task_type, and for none (PEFT has no image task type) by its base."""
    ours = next((t.name for t in tasks.TASK_TYPES.values() if t.peft_task_type and
                 t.peft_task_type == config.get("task_type")), None)
    if ours is None and models.model_family(config["base_model_name_or_path"]) == "vision":
        ours = "image-classification"
    return ours or tasks.CLASSIFICATION.name


# adapter_config.json, field by field. Read by us: r, lora_alpha, use_rslora, rank_pattern, alpha_pattern (the
# per-module scaling), bias (which biases the adapter file holds), modules_to_save (the head), lora_dropout.
PEFT_READ = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
             "modules_to_save", "lora_dropout", "base_model_name_or_path", "init_lora_weights"}
# No bearing on the outputs once the saved weights are in place: where adapters go (the weights file says),
# bookkeeping, and settings that only the initialisations we refuse (init_lora_weights) consult.
PEFT_NEUTRAL = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
                "task_type", "inference_mode", "revision", "auto_mapping", "peft_version", "runtime_config",
                "ensure_weight_tying", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
                "corda_config", "lora_ga_config"}
# Initialisations that only draw A and B, which the saved weights replace. The others (pissa, olora, corda,
# loftq, lora_ga, mica, ...) rewrite the base weights or change the forward when PEFT loads the adapter.
PEFT_INITS = (True, False, "gaussian", "eva", "orthogonal")
PEFT_BIAS = {"none", "lora_only", "all"}


def _peft_config(path):
    """adapter_config.json, refused (CheckpointError naming the field) when any field we do not reproduce
    (DoRA, lora_bias, layer_replication, trainable tokens, ...) has a value other than its empty default."""
    file = Path(path) / PEFT_CONFIG
    config = _read_json(file, "PEFT adapter config")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    init = config.get("init_lora_weights", True)
    init = init.lower() if isinstance(init, str) else init
    unsupported = [(k, v) for k, v in config.items()
                   if k not in PEFT_READ | PEFT_NEUTRAL and v not in (None, False, [], {})]
    if init not in PEFT_INITS:
        unsupported.append(("init_lora_weights", config["init_lora_weights"]))
    if config.get("bias", "none") not in PEFT_BIAS:
        unsupported.append(("bias", config["bias"]))
    if unsupported:
        field, value = unsupported[0]
        raise CheckpointError(f"{file}: unsupported {field}={json.dumps(value)[:80]} (it changes the adapter's "
                              "outputs and adapters does not reproduce it)")
    return config


def _pattern_value(patterns, name, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that matches
    the module name as a whole or as a dotted suffix, the key read as a regular expression."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise CheckpointError(f"{PEFT_CONFIG}: pattern key {key!r} is not a regular expression ({e})") from None
    return default


def _lora_modules(tensors):
    """{module name: its lora_A key} of a PEFT adapter's tensors, the names as the base model has them."""
    return {key[len(PEFT_PREFIX):-len(".lora_A.weight")]: key for key in tensors if key.endswith(".lora_A.weight")}


def _peft_scaling(config, name):
    """(r, scaling) PEFT gives module `name`: lora_alpha / r, or lora_alpha / √r with use_rslora."""
    r = _pattern_value(config.get("rank_pattern"), name, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def read_stats(path):
    return _read_json(_check_dir(path) / STATS, "training statistics")


def weights_digest(directory):
    """sha256 over the WEIGHT_FILES a checkpoint directory holds, each by name and content."""
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        file = Path(directory) / name
        if file.is_file():
            h.update(name.encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def weights_changed(path):
    """Why the checkpoint's weights are not the ones its run finished with (the weights_sha256 that training_stats.json,
    the run's completion record, holds), in words; None when they are. A run trained before the digest was recorded
    has none to check: it is trusted, as it was before."""
    try:
        stats = read_stats(path)
    except CheckpointError as e:
        return str(e)
    if not isinstance(stats, dict):
        return f"its {STATS} holds no JSON object"
    recorded = stats.get("weights_sha256")
    if recorded is None or recorded == weights_digest(path):
        return None
    files = " + ".join(name for name in WEIGHT_FILES if (Path(path) / name).is_file()) or "none left"
    return f"its weights ({files}) do not match the digest its run recorded (changed, truncated or removed)"


def _read_tensors(file):
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"weights not found: {file}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {file}: {e}") from None


def lowrank_factors(path):
    """{module: (B, A)} with ΔW = B @ A, PEFT's scaling folded into B; {} for fft/head checkpoints."""
    path, meta = _check_dir(path), read_meta(path)
    if not (path / PEFT_WEIGHTS).exists() and get_method(meta["method"]).adapter is None:
        return {}
    config = _peft_config(path)
    tensors = _read_tensors(path / PEFT_WEIGHTS)
    factors = {}
    for name, key in _lora_modules(tensors).items():
        A = tensors[key]
        B = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if B is None:
            raise CheckpointError(f"corrupt adapter {path}: {name} has lora_A but no lora_B")
        r, scaling = _peft_scaling(config, name)
        if A.shape[0] != r:
            raise CheckpointError(f"corrupt adapter {path}: {name} has rank {A.shape[0]} but "
                                  f"{PEFT_CONFIG} gives it r={r}")
        factors[name] = (B.float() * scaling, A.float())
    if not factors:
        raise CheckpointError(f"corrupt adapter {path}: no LoRA weights in {PEFT_WEIGHTS}")
    return factors


def load_base(path, *, attn_implementation=None):
    """The model before training: the pretrained body and the head as initialised with the run's seed.

    Verifies the base weights' hash when the checkpoint recorded one.
    """
    return _load_base(path, attn_implementation)[0]


def _load_base(path, attn_implementation=None):
    meta = read_meta(path)
    kind = tasks.of_meta(meta)
    model = models.load_model(meta["base_model"], meta["num_labels"], seed=meta.get("seed", 0),
                              attn_implementation=attn_implementation, auto_class=kind.auto_class)
    # PEFT lists every head name it knows ("classifier", "score") in modules_to_save: keep the real ones.
    meta["head"] = [h for h in meta["head"] if h in dict(model.named_children())]
    expected = meta.get("base_model_hash")
    # The hash leaves out a new (trained) head, as training computed it; a causal LM's own lm_head is pretrained.
    if expected and models.weights_hash(model, exclude=kind.hash_exclude(meta["head"])) != expected:
        raise CheckpointError(f"base model {meta['base_model']} does not match the checkpoint's recorded "
                              f"weights hash ({expected[:12]}…): it was trained on other weights")
    return model, meta


def load(path, *, attn_implementation=None):
    """The fine-tuned model of a checkpoint (ours or a plain PEFT LoRA directory), in eval mode.

    LoRA-family updates stay attached as one merged link of rank k·r; exactly the trained scalars
    (B, A where the method trains it, the head) have requires_grad=True.
    """
    path = _check_dir(path)
    model, meta = _load_base(path, attn_implementation)
    spec = get_method(meta["method"])
    if spec.adapter is None:
        state = _read_tensors(path / TRAINED)
        missing = set(state) - set(model.state_dict())
        if missing:
            raise CheckpointError(f"corrupt checkpoint {path}: unknown tensors {sorted(missing)[:3]}")
        model.load_state_dict(state, strict=False)
        for p in model.parameters():
            p.requires_grad_(spec.trains_base)
        for h in meta["head"]:  # by module, not by name: a tied lm_head's weight is named after the embeddings
            model.get_submodule(h).requires_grad_(True)
    else:
        factors = lowrank_factors(path)
        if spec.adapter.selector:  # keep selectors as gathers: columns of the one-hot rows of A
            factors = {n: (B, A.argmax(dim=1)) for n, (B, A) in factors.items()}
        try:
            attach_factors(model, factors, selector=spec.adapter.selector, train_a=spec.adapter.train_a,
                           head=meta["head"])
        except AttributeError as e:
            raise CheckpointError(f"checkpoint {path} does not fit base {meta['base_model']}: {e}") from None
        _load_other_tensors(model, path, set(factors), meta["head"])
    model.adapter_settings = dict(method=meta["method"], rank=meta["rank"], alpha=meta["alpha"],
                                  chain_length=meta["chain_length"], seed=meta.get("seed", 0),
                                  targets=list(meta.get("targets", [])), head=list(meta["head"]),
                                  dropout=meta.get("dropout", 0.0))
    return model.eval()


def _load_other_tensors(model, path, adapted, head):
    """Load the adapter file's tensors other than lora_A/lora_B (the head; biases with PEFT's bias="lora_only" or
    "all"; other modules_to_save) where they belong in our model, and let them train (PEFT trained them).

    PEFT names an adapted layer's own tensors X.base_layer.*, ours are X.base.*. With bias="all" PEFT also saves
    the biases of its modules_to_save wrapper's inner copies (M.original_module.*, M.modules_to_save.*); its
    forward uses M.* (which it loads over them), so those copies are skipped when M.* is present. Any other
    tensor that lands nowhere, and any head tensor the file lacks, is an error: never a silent drop.
    """
    tensors = {k: v for k, v in _read_tensors(path / PEFT_WEIGHTS).items()
               if not re.search(r"\.lora_[AB]\.weight$", k)}
    stray = next((k for k in tensors if not k.startswith(PEFT_PREFIX)), None)
    if stray is not None:
        raise CheckpointError(f"checkpoint {path}: tensor {stray} is not under {PEFT_PREFIX} "
                              "(PEFT would not load it)")
    tensors = {k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}
    params, state = dict(model.named_parameters()), model.state_dict()
    loaded = {}
    for key, value in tensors.items():
        copy = re.fullmatch(r"(.+)\.(?:original_module|modules_to_save)\.(.+)", key)
        if copy and ".".join(copy.groups()) in tensors:
            continue
        module, sep, rest = key.partition(".base_layer.")
        ours = f"{module}.base.{rest}" if sep and module in adapted else key
        if ours not in state or state[ours].shape != value.shape:
            raise CheckpointError(f"checkpoint {path}: tensor {key} {tuple(value.shape)} fits nothing in the "
                                  f"model (an unsupported adapter type, or another base)")
        loaded[ours] = value
    missing = sorted(k for k in state if models.in_modules(k, head) and k not in loaded)
    if missing:
        raise CheckpointError(f"corrupt checkpoint {path}: head tensor {missing[0]} is missing from {PEFT_WEIGHTS}")
    model.load_state_dict(loaded, strict=False)
    for name in loaded:
        if name in params:
            params[name].requires_grad_(True)


def matrices(path):
    """[(name, W0, ΔW)] for every adapted matrix (n×m, float32, forward order).

    fft: every Linear/Conv1D weight outside the head, ΔW = W_finetuned − W0.
    """
    model = load(path)
    layers = adapted_layers(model)
    if layers:
        return [(n, l.base_weight().detach().float(), l.delta_weight().float()) for n, l in layers.items()]
    base = dict(load_base(path).named_modules())
    head = model.adapter_settings["head"]
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LINEAR) and not models.in_modules(name, head):
            w, w0 = (as_out_in(m.weight.detach().float(), is_transposed(mod)) for m in (mod, base[name]))
            out.append((name, w0, w - w0))
    return out
