"""The toolkit inside a Hugging Face `Trainer`.

    model = adapters.apply(model, "c3la", rank=16, alpha=32, chain_length=3)
    trainer = Trainer(model, args, train_dataset=..., data_collator=...,
                      optimizer_cls_and_kwargs=callback.optimizer(args))   # param groups (LoRA+, head lr)
    callback.AdaptersCallback.attach(trainer)                              # chain, save, resume
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

Nothing here changes how the core trains: at the Trainer's own events the callback calls the public operations
adapters.train calls (next_link at the link boundaries of adapters.chain, param_groups, checkpoint.save), the loss
is the task's (TaskLoss: right under gradient accumulation and DDP for every model), and the Trainer keeps its
scheduler, clipping, mixed precision, gradient accumulation and DDP. A monitor (the hook of
adapters.tracking, e.g. analysis.monitor.Diagnostics) logs through the Trainer's loggers (report_to).
"""
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import checkpoint, evaluate, models, tasks
from .chain import check_boundaries, link_boundaries
from .errors import AdapterError
from .inject import adapted_layers, next_link, param_groups, unwrap
from .stopping import finish_chain
from .tracking import start_monitor


# ---------------------------------------------------------------- optimizer: param groups in the Trainer's own
class _GroupedOptimizer:
    """An optimizer factory for `Trainer(optimizer_cls_and_kwargs=...)`: create_optimizer calls factory()(model,
    **kwargs), so the groups are built from the very model the Trainer trains, when it builds its optimizer."""

    def __call__(self, model, *, optimizer_cls, optimizer_kwargs, lr, weight_decay, lr_ratio, head_lr_mult):
        return optimizer_cls(param_groups(unwrap(model), lr, weight_decay, lr_ratio, head_lr_mult),
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
        # An earlier link's state (load_best_model_at_end after a later fold): take its shapes; the load then
        # overwrites every tensor, so the model is that evaluation's, folded links and all.
        for n, l in layers.items():
            l.B_prev = torch.empty_like(state_dict[f"{prefix}{n}.B_prev"], device=l.B_prev.device)
            l.A_prev = torch.empty_like(state_dict[f"{prefix}{n}.A_prev"], device=l.A_prev.device)
            l.link = links
        return
    for _ in range(links - layer.link):
        next_link(model)  # no optimizer yet: the Trainer creates it after the load


def resumable(model):
    """Let `model.load_state_dict` take the state of any later link of its chain (idempotent)."""
    model = unwrap(model)
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


# ---------------------------------------------------------------- the loss: the task's, over the accumulated batch
class TaskLoss:
    """A Trainer's `compute_loss_func`: the task type's loss (adapters.tasks, as adapters.train computes it), Σ loss
    over the micro-batch / the units (examples, or scored tokens) of the whole accumulated batch.

    Why: transformers 5.x takes a model whose forward has **kwargs to divide its loss by `num_items_in_batch`
    itself, and then does not divide by the accumulation steps. A sequence classifier (BERT's) takes **kwargs but
    averages per micro-batch: under accumulation its loss and gradients come out × the accumulation steps. With
    this loss both are those of the unaccumulated batch, for a classifier as for a causal LM (whose
    `num_items_in_batch` counts the scored tokens, labels[..., 1:], as token_scores does).
    """

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, outputs, labels, num_items_in_batch=None):
        sums, units, _ = self.kind.score(evaluate.logits_of(outputs), labels)
        return sums.sum() / (units.sum() if num_items_in_batch is None else num_items_in_batch)


def _install_loss(trainer, model):
    """Give `trainer` the task's loss, unless it computes its own (a compute_loss_func, or label smoothing, whose
    LabelSmoother already divides by num_items_in_batch)."""
    if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        return
    kind = tasks.for_model(unwrap(model))
    if kind.name == "causal-lm" and getattr(trainer, "_loss_shifts_labels", True) is False:
        raise AdapterError(f"the Trainer counts {type(unwrap(model)).__name__}'s labels unshifted, but a causal LM's "
                           "loss scores labels[..., 1:]: pass Trainer(compute_loss_func=...) of your own")
    trainer.compute_loss_func = TaskLoss(kind)


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
    - the loss is the task's (TaskLoss), so that gradient accumulation gives the unaccumulated batch's loss and
      gradients (attach() installs it; a Trainer with a compute_loss_func or label smoothing keeps its own);
    - `monitor` (the hook of adapters.tracking, e.g. analysis.monitor.Diagnostics) at each logging/evaluation
      step, through trainer.log, so report_to decides where its values go; this needs the Trainer: add the
      callback with `AdaptersCallback.attach(trainer, monitor=...)`. A monitor with `start` is told the training
      set's size at train begin.
    """

    def __init__(self, *, boundaries=None, save=True, base_model=None, monitor=None):
        self.planned, self.save, self.base_model = boundaries, save, base_model
        self.trainer, self.monitor = None, monitor
        self.model, self.base_hash, self.boundaries, self._logged, self._logging = None, None, [], None, False

    @classmethod
    def attach(cls, trainer, **settings):
        """Add a new callback to `trainer` (before train()), with the Trainer at hand for logging."""
        callback = cls(**settings)
        callback.trainer = trainer
        callback._bind(trainer.model)
        if trainer.model is not None:  # else (model_init) at train begin, once the Trainer has built it
            _install_loss(trainer, trainer.model)
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
        if self.trainer is not None:
            _install_loss(self.trainer, model)
        elif args.gradient_accumulation_steps > 1:
            raise AdapterError("gradient accumulation needs the task's loss in the Trainer: add the callback with "
                               "AdaptersCallback.attach(trainer) (a sequence classifier's loss would be × the "
                               "accumulation steps)")
        if fresh and model.adapter_settings["method"] == "fft" and state.global_step:
            self.base_hash = None  # fft's base already moved: no hash to record
        if self.monitor is not None:
            if self.trainer is None:
                raise AdapterError("a monitor logs through the Trainer: add the callback with "
                                   "AdaptersCallback.attach(trainer, monitor=...)")
            start_monitor(self.monitor, len(train_dataloader.dataset))
        self.boundaries = self._boundaries(state.max_steps)
        done = sum(b <= state.global_step for b in self.boundaries)
        links = [l.link for l in adapted_layers(model).values()]
        if links and links[0] != done:
            raise AdapterError(f"the model is at link {links[0] + 1} but step {state.global_step} of the run is in "
                               f"link {done + 1}: resume with trainer.train(resume_from_checkpoint=...) on a fresh "
                               "adapters.apply model")

    def _boundaries(self, max_steps):
        k = self.model.adapter_settings["chain_length"]
        return link_boundaries(max_steps, k) if self.planned is None else check_boundaries(self.planned, k, max_steps)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in self.boundaries:
            # accelerate's AcceleratedOptimizer shares its .state with the wrapped optimizer: popping there resets it.
            next_link(model, optimizer)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self.monitor is None or self._logging or self._logged == state.global_step:
            return
        self._logged = state.global_step  # once per step: a training log and an evaluation may share one
        values = self.monitor(model, state.global_step) if state.is_world_process_zero else {}
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
        # Stopped early (EarlyStoppingCallback) or given the best evaluation's weights (load_best_model_at_end), the
        # model may be in an earlier link than the schedule's last: the links it passed are recorded, and the chain
        # ends there, the links not reached untrained (adapters.stopping.finish_chain).
        links = [l.link for l in adapted_layers(unwrap(model)).values()]
        self.boundaries = self.boundaries[:links[0]] if links else self.boundaries
        finish_chain(unwrap(model))
        if self.save and state.is_world_process_zero:
            self.write(model, Path(args.output_dir) / "adapters", state)

    def write(self, model, path, state):
        """Our checkpoint directory of the model as it is now (adapters.load reads it)."""
        model = unwrap(model)
        checkpoint.save(model, path, base_model=self.base_model, base_model_hash=self.base_hash,
                        task_type=tasks.for_model(model).name, overwrite=True,
                        extra_meta=dict(link_boundaries=self.boundaries,
                                        trainer=dict(global_step=state.global_step, max_steps=state.max_steps)))
