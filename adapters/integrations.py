"""The toolkit inside a Hugging Face `Trainer`, experiment trackers and config files (issue 14).

    model = adapters.apply(model, "c3la", rank=16, alpha=32, chain_length=3)
    trainer = Trainer(model, args, train_dataset=..., data_collator=...,
                      optimizer_cls_and_kwargs=integrations.optimizer(args))   # param groups (LoRA+, head lr)
    integrations.AdaptersCallback.attach(trainer, diagnostics=True)            # chain, save, resume, diagnostics
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

Nothing here changes how the core trains: at the Trainer's own events the callback calls the public operations
adapters.train calls (next_link at the link boundaries, param_groups, checkpoint.save), and the Trainer keeps
its scheduler, clipping, mixed precision, gradient accumulation and DDP. The diagnostics are the toolkit's own
math (analysis.spectral, bounds.mi, analysis.hessian + analysis.lanczos) on the current weights, logged through
the Trainer's loggers (report_to) or accelerate's trackers (`log_scalars`). `parse_args_with_config` gives an
argparse CLI `--config FILE.yaml`.
"""
import argparse
import importlib.util
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import checkpoint, models, tasks
from .errors import AdapterError
from .inject import adapted_layers, next_link, param_groups, trained_parameters
from .tasks import class_scores

CHEAP = ("intruders", "delta_norm", "stable_rank", "mi_bound")
COSTLY = ("lambda_max",)
PREFIX = "adapters/"


# ---------------------------------------------------------------- optimizer: param groups in the Trainer's own
class _GroupedOptimizer:
    """An optimizer factory for `Trainer(optimizer_cls_and_kwargs=...)`: create_optimizer calls factory()(model,
    **kwargs), so the groups are built from the very model the Trainer trains, when it builds its optimizer."""

    def __call__(self, model, *, optimizer_cls, optimizer_kwargs, lr, weight_decay, lr_ratio, head_lr_mult):
        return optimizer_cls(param_groups(_unwrap(model), lr, weight_decay, lr_ratio, head_lr_mult),
                             **optimizer_kwargs)


def optimizer(args, lr_ratio=None, head_lr_mult=None):
    """`optimizer_cls_and_kwargs` for a Trainer: the optimizer `args.optim` names (with its betas, eps, fused...)
    over adapters.param_groups: B at lr·λ (LoRA+: λ = 16 by default), the head at lr·μ (10 for fft/head).

    A TrainerCallback cannot change the optimizer, and a replacement optimizer (`optimizers=`) would bypass
    args.optim; this goes through the Trainer's own create_optimizer, and its scheduler scales every group.
    Unlike the Trainer's default groups, weight decay applies to every trained tensor (as in adapters.train).
    """
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or {"params", "model"} & set(kwargs):
        raise AdapterError(f"optim={args.optim!r} builds its own parameter groups; use an Adam-type optimizer")
    return _GroupedOptimizer, dict(optimizer_cls=cls, optimizer_kwargs=kwargs, lr=args.learning_rate,
                                   weight_decay=args.weight_decay, lr_ratio=lr_ratio, head_lr_mult=head_lr_mult)


def _unwrap(model):
    while not hasattr(model, "adapter_settings") and hasattr(model, "module"):  # DDP, accelerate wrappers
        model = model.module
    if not hasattr(model, "adapter_settings"):
        raise AdapterError("the model has no adapters: prepare it with adapters.apply(model, method, ...) first")
    return model


# ---------------------------------------------------------------- resume: replay the chain before a load
def _replay_links(model, state_dict, prefix, *_):
    """load_state_dict pre-hook. A state saved at link j has wider folded buffers (B_prev holds j·r columns) than
    a fresh model at link 0, and the Trainer loads its checkpoint before any callback event: replay next_link up
    to j first, so the shapes fit; the load then overwrites every tensor (B, A, selectors, folded links)."""
    layers = adapted_layers(model)
    if not layers:
        return
    name, layer = next(iter(layers.items()))
    saved = state_dict.get(f"{prefix}{name}.B_prev")
    if saved is None:
        return
    links = saved.shape[1] // layer.r
    if links < layer.link:
        raise AdapterError(f"cannot load a state of link {links + 1} into a model at link {layer.link + 1}: "
                           "links are only folded forward (load it into a fresh adapters.apply model)")
    for _ in range(links - layer.link):
        next_link(model)  # no optimizer yet: the Trainer creates it after the load


def resumable(model):
    """Let `model.load_state_dict` take the state of any later link of its chain (idempotent)."""
    model = _unwrap(model)
    if not getattr(model, "_adapters_replay_hook", None):
        model._adapters_replay_hook = model.register_load_state_dict_pre_hook(_replay_links)
    return model


class _Unadapted:
    """The state dict the model had before adapters.apply (X.base.* named X.*, adapter tensors left out),
    for models.weights_hash: the hash adapters.load checks the base model against."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        layers = [name + "." for name in adapted_layers(self.model)]
        out = {}
        for key, tensor in self.model.state_dict().items():
            owner = next((n for n in layers if key.startswith(n)), None)
            if owner is None:
                out[key] = tensor
            elif key.startswith(owner + "base."):
                out[owner + key[len(owner) + 5:]] = tensor
        return out


def base_weights_hash(model):
    """models.weights_hash of the pretrained weights, from a model adapters.apply already wrapped.

    Exact for every LoRA-family method (W0 is frozen) and, before training starts, for fft."""
    kind = tasks.for_model(model)  # a causal LM's own lm_head is part of the base; a new head is not
    return models.weights_hash(_Unadapted(model), exclude=kind.hash_exclude(model.adapter_settings["head"]))


# ---------------------------------------------------------------- diagnostics of the current weights
def _which(which):
    names = CHEAP if which is True else () if not which else (which,) if isinstance(which, str) else tuple(which)
    unknown = [n for n in names if n not in CHEAP + COSTLY]
    if unknown:
        raise AdapterError(f"unknown diagnostic {unknown[0]!r}; choose from {', '.join(CHEAP + COSTLY)}")
    return names


def trained_scalars_so_far(model):
    """Trained scalars of the links started so far (link j of k: j/k of each chained layer's count) + the rest."""
    count = trained_parameters(model)
    later = sum(l.trained_parameters() // l.k * (l.k - l.link - 1) for l in adapted_layers(model).values())
    return count["total"] - later


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
    from analysis import spectral, svd_cache
    from bounds.mi import mi_bound

    names, model, out = _which(which), _unwrap(model), {}
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
        from analysis.hessian import HessianOperator, spectrum
        from analysis.landscape import to_device
        params = [p for p in model.parameters() if p.requires_grad]
        op = HessianOperator(model, params, to_device(batches, params[0].device), score=score or class_scores)
        out["lambda_max"] = spectrum(op, top_k=1, max_iter=lanczos_steps, progress=False)["eigenvalues"][0]
    return {PREFIX + key: float(value) for key, value in out.items()}


class Diagnostics:
    """`diagnostics` for one training run: W0's SVDs computed once, lambda_max every `lanczos_every` steps.

    The callback and adapters.train's trackers share it: `values = diag(model, step)`."""

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


# ---------------------------------------------------------------- the callback
class AdaptersCallback(TrainerCallback):
    """Trains any method of the registry inside a stock Trainer (model prepared by adapters.apply).

    - chained methods fold at the link boundaries (equal shares of max_steps, as adapters.train, or
      `boundaries`): next_link on the model, with the re-initialised factors' state popped from the Trainer's
      own optimizer;
    - at each Trainer checkpoint, checkpoint-N/adapters/ is our checkpoint directory (PEFT format +
      adapters_meta.json), and output_dir/adapters/ at the end of training; `save=False` turns both off;
    - resume_from_checkpoint resumes the chain at its link: the model loads a later link's state (resumable);
    - under DDP every process folds its own copy (the selectors and folded links are equal everywhere by
      construction); ddp_broadcast_buffers=False spares DDP broadcasting them at each forward, as adapters.train;
    - `diagnostics` (True or a list of names, see `diagnostics`) at each logging/evaluation step, through
      trainer.log, so report_to decides where they go; this needs the Trainer: add the callback with
      `AdaptersCallback.attach(trainer, ...)`. `n_examples` defaults to the training set's size.
    """

    def __init__(self, *, boundaries=None, save=True, base_model=None, diagnostics=False, eps=0.5, k=10, sigma=1.0,
                 n_examples=None, lanczos_every=None, lanczos_batches=None, lanczos_steps=10):
        self.planned, self.save, self.base_model, self.trainer = boundaries, save, base_model, None
        self.diag = Diagnostics(diagnostics, eps=eps, k=k, n_examples=n_examples, sigma=sigma,
                                lanczos_every=lanczos_every, lanczos_batches=lanczos_batches,
                                lanczos_steps=lanczos_steps) if diagnostics or lanczos_every else None
        self.model, self.base_hash, self.boundaries, self._logged, self._logging = None, None, [], None, False

    @classmethod
    def attach(cls, trainer, **settings):
        """Add a new callback to `trainer` (before train()), with the Trainer at hand for logging."""
        callback = cls(**settings)
        callback.trainer = trainer
        callback._bind(trainer.model)
        trainer.add_callback(callback)
        return callback

    def _bind(self, model):
        """Hooks and the base hash, once, on the model as given (before the Trainer loads any checkpoint)."""
        if self.model is None and model is not None:  # None: a Trainer(model_init=...) builds it in train()
            self.model = resumable(model)
            self.base_hash = base_weights_hash(self.model)
            self.base_model = self.base_model or getattr(self.model.config, "_name_or_path", None)
            if self.save and not self.base_model:
                raise AdapterError("the model has no name_or_path: pass AdaptersCallback(base_model=...) (a model "
                                   "id or directory adapters.load can load the base from), or save=False")

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._bind(model)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        fresh = self.model is None
        self._bind(model)
        if fresh and model.adapter_settings["method"] == "fft" and state.global_step:
            self.base_hash = None  # fft's base already moved: no hash to record
        if self.diag is not None:
            if self.trainer is None:
                raise AdapterError("diagnostics log through the Trainer: add the callback with "
                                   "AdaptersCallback.attach(trainer, diagnostics=...)")
            if self.diag.settings["n_examples"] is None and "mi_bound" in self.diag.which:
                self.diag.settings["n_examples"] = len(train_dataloader.dataset)
        self.boundaries = self._boundaries(state.max_steps)
        done = sum(b <= state.global_step for b in self.boundaries)
        links = [l.link for l in adapted_layers(model).values()]
        if links and links[0] != done:
            raise AdapterError(f"the model is at link {links[0] + 1} but step {state.global_step} of the run is in "
                               f"link {done + 1}: resume with trainer.train(resume_from_checkpoint=...) on a fresh "
                               "adapters.apply model")

    def _boundaries(self, max_steps):
        settings = self.model.adapter_settings
        k = settings["chain_length"]
        if self.planned is None:
            from .train import link_boundaries
            if max_steps < k:
                raise AdapterError(f"{max_steps} steps cannot hold chain_length={k} links")
            return link_boundaries(max_steps, k)
        b = list(self.planned)
        if len(b) != k - 1 or b != sorted(set(b)) or (b and not 0 < b[0] <= b[-1] < max_steps):
            raise AdapterError(f"boundaries must be {k - 1} increasing steps in 1..{max_steps - 1} "
                               f"(chain_length={k}, max_steps={max_steps}), got {self.planned!r}")
        return b

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in self.boundaries:
            # accelerate's AcceleratedOptimizer shares its .state with the wrapped optimizer: popping there resets it.
            next_link(model, optimizer)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self.diag is None or self._logging or self._logged == state.global_step:
            return
        self._logged = state.global_step  # once per step: a training log and an evaluation may share one
        values = self.diag(model, state.global_step) if state.is_world_process_zero else {}
        if values:
            self._logging = True  # trainer.log calls on_log again
            try:
                self.trainer.log(values)
            finally:
                self._logging = False

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.save and state.is_world_process_zero:
            self.write(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / "adapters",
                       state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.save and state.is_world_process_zero:
            self.write(model, Path(args.output_dir) / "adapters", state)

    def write(self, model, path, state):
        """Our checkpoint directory of the model as it is now (adapters.load reads it)."""
        model = _unwrap(model)
        checkpoint.save(model, path, base_model=self.base_model, base_model_hash=self.base_hash,
                        task_type=tasks.for_model(model).name, overwrite=True,
                        extra_meta=dict(link_boundaries=self.boundaries,
                                        trainer=dict(global_step=state.global_step, max_steps=state.max_steps)))


# ---------------------------------------------------------------- accelerate trackers (--report-to)
TRACKERS = ("tensorboard", "wandb", "trackio")


def tracker_names(report_to):
    """--report-to tensorboard|wandb|trackio|none|all (or a list) -> accelerate's log_with list.

    "all": the installed ones. A named tracker that is not installed is an AdapterError saying what to install."""
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    names = [str(n).lower() for n in names if n is not None]
    if "all" in names:
        return [t for t in TRACKERS if importlib.util.find_spec(t)]
    out = []
    for name in names:
        if name == "none":
            continue
        if name not in TRACKERS:
            raise AdapterError(f"unknown --report-to {name!r}; choose from {', '.join(TRACKERS + ('none', 'all'))}")
        if importlib.util.find_spec(name) is None:
            raise AdapterError(f"--report-to {name}: the {name} package is not installed (pip install {name})")
        out.append(name)
    return list(dict.fromkeys(out))


def tracker_config(config):
    """A resolved config as trackers store it (TensorBoard's hparams take only numbers, strings and bools)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def log_scalars(accelerator, values, step):
    """Log {name: float} to every tracker of `accelerator` (main process only, as accelerate does)."""
    if values and accelerator.trackers:
        accelerator.log({k: float(v) for k, v in values.items()}, step=step)


# ---------------------------------------------------------------- --config FILE.yaml
def parse_args_with_config(parser, argv=None):
    """Parse `argv` with `parser`, plus `--config FILE.yaml`: every key of the file is a flag's dest or long
    option (dashes or underscores), its value the flag's; flags on the command line override the file.

    Values go through the flag's own type and choices; an unknown key or a wrong type is an AdapterError naming
    the key. Returns the resolved {dest: value} (without config), to write into the run's output.
    """
    if not any("--config" in a.option_strings for a in parser._actions):
        parser.add_argument("--config", metavar="FILE.yaml", help="a YAML file of flag values (the command line wins)")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    values = _read_config(parser, config) if config else {}
    # The file's values become the parser's defaults, so an explicit flag overrides them exactly as it overrides
    # a default; a required flag or positional the file gives is no longer required. Restored afterwards.
    saved = [(a, a.default, a.required, a.nargs) for a in parser._actions]
    try:
        for action in parser._actions:
            if action.dest in values:
                action.default, action.required = values[action.dest], False
                if not action.option_strings:  # a positional: may now be absent from the command line
                    action.nargs = {None: "?", "+": "*"}.get(action.nargs, action.nargs)
        resolved = vars(parser.parse_args(argv))
    finally:
        for action, default, required, nargs in saved:
            action.default, action.required, action.nargs = default, required, nargs
    resolved.pop("config", None)
    return resolved


def _read_config(parser, path):
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise AdapterError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AdapterError(f"cannot read config file {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AdapterError(f"config file {path}: expected a mapping of flag: value, got {type(data).__name__}")
    actions = [a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help", "config")]
    by_dest = {a.dest: a for a in actions}
    by_option = {o[2:].replace("-", "_"): a for a in actions for o in a.option_strings if o.startswith("--")}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        action = by_dest.get(name) or by_option.get(name)
        if action is None:
            raise AdapterError(f"config file {path}: unknown key {key!r} (not a flag of {parser.prog})")
        if action.dest in values:
            raise AdapterError(f"config file {path}: key {key!r} sets {action.dest} a second time")
        values[action.dest] = _config_value(action, key, value, as_flag=name not in by_dest, path=path)
    return values


def _config_value(action, key, value, *, as_flag, path):
    def bad(why):
        return AdapterError(f"config file {path}: key {key!r}: {why}")

    if value is None:
        if action.default is None:
            return None
        raise bad("null is not a value of this flag")
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {value!r}")
        if as_flag:  # `no-group-by-length: true` means the flag is given
            return action.const if value else action.default
        if not isinstance(action.const, bool):
            raise bad("give this flag by its option name (true: the flag is given)")
        return value

    def one(item):
        if isinstance(item, (dict, list, tuple)):
            raise bad(f"expected a single value, got {item!r}")
        if isinstance(item, bool):  # YAML reads yes/no/on/off as booleans: never a number or a string here
            raise bad(f"expected {getattr(action.type, '__name__', 'a string')}, got {item!r} (quote it for a string)")
        try:
            converted = action.type(str(item)) if action.type is not None else str(item)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise bad(f"expected {getattr(action.type, '__name__', 'a string')}, got {item!r} ({e})") from None
        if action.choices is not None and converted not in action.choices:
            raise bad(f"{converted!r} is not one of {', '.join(map(str, action.choices))}")
        return converted

    if action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if (action.nargs == "+" and not items) or (isinstance(action.nargs, int) and len(items) != action.nargs):
            raise bad(f"expected {action.nargs} value(s), got {len(items)}")
        return [one(item) for item in items]
    return one(value)
