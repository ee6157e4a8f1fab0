"""Train any method on a transformers model for a task and write a checkpoint directory.

    python -m adapters.train --method cla --max-steps 200 --out ckpt/cla
    python -m adapters.train --model smollm2-135m --task movie-dialog --method c3la --chain-length 3 --out ckpt/lm
    python -m adapters.train --model dinov2-small --task fashion-mnist --method cla --out ckpt/vit

The task's type (adapters.tasks) says which model class is built (a sequence classifier, a causal LM, an image
classifier), how examples are batched and what the loss is; everything else here is the same for every task.

Runs on accelerate, so the same command works under `accelerate launch` / torchrun (DDP): the batch
size is global (split over processes) and every random draw (selectors, head init, data order) comes
from --seed, so every process agrees. AdamW, warmup + linear decay, gradient clipping; chained
methods end a link at equal shares of the run, or with --early-stopping when the link converges (at most its
share); one learning-rate schedule runs over the whole run.
--mixed-precision bf16/fp16 trains under autocast (fp32 master weights); the final evaluation, the one recorded,
always runs in fp32 eval mode, so it is what a fresh evaluation of the loaded checkpoint gives.
"""
import functools
import json
import math
import os
import pickle
import platform
import random
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import yaml
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import checkpoint, command, data, evaluate, example_losses, models, pairing, tasks, taskspec
from .chain import link_boundaries
from .errors import AdapterError, cli
from .inject import adapted_layers, apply, next_link, param_groups
from .io import write_json, write_text
from .methods import CHAIN_LENGTH, METHODS, get_method, method_table, one_link_note, resolve_chain_length
from .settings import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, check, make, setting, shaping
from .stopping import KEEP, LinkByLink, finish_chain
from .tracking import installed_monitor, log_scalars, start_monitor, tracker_config, tracker_names

DEFAULT_LR = {True: 5e-5, False: 1e-3}  # by "trains the pretrained weights": fft vs everything else
EVALS_PER_RUN = 5  # mid-run evaluations when eval_every is not given
STATE = "state.pt"  # the resumable state, in OUT.partial/
STATE_VERSION = 4  # bump when the resumable state changes: an older state.pt is refused, not misread
MIXED_PRECISION = ("no", "fp16", "bf16")
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DEVICES = ("cpu", "cuda")  # accelerate places a run: which GPU is CUDA_VISIBLE_DEVICES' (or accelerate launch's)
CONFIG = "config.yaml"  # the run's resolved settings, in the checkpoint: `--config` it (with --out) to rerun it

_CHAINED = ", ".join(name for name, m in METHODS.items() if m.chain_length > 1)
_TRAINS_BASE = ", ".join(name for name, m in METHODS.items() if m.trains_base)
_DATA = "data"


def _by_method(value, default):
    """'name v, ...' for the methods whose `value(method)` is not `default` (for --help)."""
    return ", ".join(f"{name} {value(m):g}" for name, m in METHODS.items() if value(m) != default)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run: the CLI's flags, their ranges, config.yaml and which settings shape the run
    (results=True: recorded in OUT/config.yaml and shared by a resumed run with the state it resumes) all come from
    these fields. The field order is config.yaml's key order."""
    model: str = setting("minilm", f"offline model ({', '.join(models.OFFLINE_MODELS)}), a transformers directory or "
                         "a cached hub id")
    task: str = setting(data.MOVIE_REVIEWS, taskspec.TASKS_HELP, group=_DATA)
    data_file: Optional[str] = setting(None, taskspec.DATA_HELP + " (default: none, the built-in --task)",
                                       flag="--data", group=_DATA)
    method: str = setting("cla", "one of the methods below")
    rank: int = setting(16, "rank r of each link")
    alpha: float = setting(32, "scale s = alpha / r")
    targets: Optional[list[str]] = setting(None, "module names, dotted suffixes, regexes or all-linear (default: the "
                                           "query and value projections of the model's family)")
    chain_length: Optional[int] = setting(None, f"links k of a chained method (default: the method's, {CHAIN_LENGTH} "
                                          f"for {_CHAINED}; 1 for the others)")
    epochs: float = setting(1.0, "passes over the training split", check=POSITIVE)
    max_steps: Optional[int] = setting(None, "optimizer steps (default: --epochs of the training split)",
                                       check=AT_LEAST_1)
    lr: Optional[float] = setting(None, f"default {DEFAULT_LR[False]:g} ({DEFAULT_LR[True]:g} for the methods that "
                                  f"train the pretrained weights: {_TRAINS_BASE})", check=POSITIVE)
    lr_ratio: Optional[float] = setting(None, "lr_B / lr_A (default: the method's, "
                                        f"{_by_method(lambda m: m.adapter.lr_ratio if m.adapter else 1.0, 1.0)}; "
                                        "1 for the others)", check=POSITIVE)
    weight_decay: float = setting(0.0, "AdamW's", check=NON_NEGATIVE)
    warmup: float = setting(0.06, "warmup fraction of the run", check=FRACTION)
    grad_clip: float = setting(1.0, "max gradient norm (0: no clipping)", check=NON_NEGATIVE)
    batch_size: int = setting(16, "global batch size", check=AT_LEAST_1)
    max_length: int = setting(taskspec.MAX_LENGTH, taskspec.MAX_LENGTH_HELP, check=AT_LEAST_1, group=_DATA)
    seed: int = setting(0, "every random draw: selectors, head, data order, dropout")
    out: str = setting("ckpt", "the checkpoint directory", results=False, metavar="DIR")
    save_trajectory: int = setting(0, "N snapshots of trained params", check=NON_NEGATIVE, metavar="N")
    resume: bool = setting(False, "continue from OUT.partial/ if present", results=False)
    overwrite: bool = setting(False, "replace a non-empty --out directory", results=False)
    n_train: Optional[int] = setting(None, taskspec.SIZE_HELP.format("training") + " (default: all)",
                                     check=AT_LEAST_1, group=_DATA)
    n_val: Optional[int] = setting(None, taskspec.SIZE_HELP.format("validation") + " (default: all)",
                                   check=AT_LEAST_1, group=_DATA)
    n_test: Optional[int] = setting(None, taskspec.SIZE_HELP.format("test") + " (default: all)", check=AT_LEAST_1,
                                    group=_DATA)
    val_fraction: float = setting(data.VAL_FRACTION, taskspec.VAL_FRACTION_HELP, check=FRACTION, group=_DATA)
    head_lr_mult: Optional[float] = setting(None, "a new head's lr = this × lr (default: the method's, "
                                            f"{_by_method(lambda m: m.head_lr_mult, 1.0)}; 1 for the others and for "
                                            "a pretrained head)", check=POSITIVE)
    group_by_length: bool = setting(True, "plain shuffled batches instead of batches of similar length",
                                    flag="--no-group-by-length")
    eval_every: Optional[int] = setting(None, f"steps between mid-run evaluations (default: {EVALS_PER_RUN} per run)",
                                        check=AT_LEAST_1)
    eval_examples: int = setting(512, "validation examples each mid-run evaluation uses (the final one uses every "
                                 "split in full)", check=AT_LEAST_1)
    save_every: Optional[int] = setting(None, "write resumable state every N steps (to OUT.partial/; default: never)",
                                        check=AT_LEAST_1, results=False)
    dropout: float = setting(0.0, "LoRA dropout p on the adapter path (PEFT lora_dropout)")
    early_stopping: bool = setting(False, "stop after --patience evaluations without a lower validation loss (the "
                                   "cap: --max-steps or --epochs); a chain converges link by link: each link stops on "
                                   "its own patience or at its share of the cap, its best weights go on into the next "
                                   "link, and the last link ends the run")
    patience: int = setting(3, "evaluations without an improvement before stopping", check=AT_LEAST_1)
    min_delta: float = setting(0.0, "an improvement lowers the best validation loss by more than this",
                               check=NON_NEGATIVE)
    keep: Optional[str] = setting(None, "weights tested and saved: best (the best validation evaluation's; the "
                                  "default with --early-stopping) or final (the default without)", choices=KEEP)
    mixed_precision: Optional[str] = setting(None, "autocast for training (default: accelerate's, "
                                             "ACCELERATE_MIXED_PRECISION or no); the final evaluation is fp32",
                                             choices=MIXED_PRECISION)
    report_to: str = setting("none", "tensorboard, wandb, trackio, all or none: losses, lr, validation metric and "
                             "diagnostics at each evaluation, via accelerate's trackers", results=False)
    logging_dir: Optional[str] = setting(None, "where trackers write (default: OUT.logs/)", results=False)
    device: Optional[str] = setting(None, "cpu or cuda (default: cuda if available, else cpu; which GPUs: "
                                    "CUDA_VISIBLE_DEVICES, several: accelerate launch)", choices=DEVICES,
                                    results=False)
    progress: bool = setting(True, "no progress bar", flag="--no-progress", results=False)


def snapshot(model):
    """The trained scalars as the model `adapters.load` returns names them (for trajectories).

    LoRA-family layers appear as one merged link of rank k·r: B = [B_prev, s·B, 0 for links to come]
    and, where A trains, A = [A_prev; A; the initial A of each link to come].
    """
    out = {}
    layers = adapted_layers(model)
    for name, layer in layers.items():
        B, A = layer.factors()
        todo = range(layer.link + 1, layer.k)
        out[f"{name}.B"] = torch.cat([B] + [torch.zeros_like(layer.B) for _ in todo], dim=1)
        if layer.spec.train_a:
            future = [layer.spec.make_a(layer.shape[1], layer.r, j, layer.seed).to(A) for j in todo]
            out[f"{name}.A"] = torch.cat([A] + future)
    owned = {id(p) for layer in layers.values() for p in layer.parameters()}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            out[name] = p.detach()
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def _versions():
    import accelerate
    import peft
    import transformers
    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, accelerate=accelerate.__version__)


def _machine(device):
    """What the run's timings were measured on: the CPU's model name (Linux's /proc/cpuinfo, else the platform's),
    its logical CPUs, and the GPU's name when the run used one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), gpu=gpu)


def _loss_summary(prefix, losses):
    q = torch.tensor(losses, dtype=torch.float64).quantile(torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {f"{prefix}_loss_quantiles": dict(zip(["0.5", "0.9", "0.99"], q.tolist())),
            f"{prefix}_loss_max": max(losses)}


def _eval_split(accelerator, model, rows, processor, max_length, batch_size, kind):
    """Evaluate `rows` sharded over processes; every process gets the full result (evaluate.summary, row order).

    None for no rows. Each shard's per-example scores: evaluate.row_scores (batched in order of length).
    """
    if not rows:
        return None
    rank, world = accelerator.process_index, accelerator.num_processes
    scores = evaluate.row_scores(model, processor, rows[rank::world], max_length, batch_size, kind)
    parts = [scores]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, scores)
    every = [None] * len(rows)
    for r, shard in enumerate(parts):
        every[r::world] = shard
    return evaluate.summary(*zip(*every))


def _loss(accelerator, net, batch, kind):
    """The batch's training loss: the task's Σ loss / Σ units over the whole global batch.

    Each process divides its own summed loss by the mean units per process (one all-reduce of a count), so the
    gradients DDP averages are those of the global batch's mean, also for a causal LM, whose rows hold different
    numbers of scored tokens (transformers' own loss, a per-process mean, would weigh each process's tokens
    unequally).
    """
    sums, units, _ = evaluate.batch_scores(net, batch, kind.score)
    per_process = accelerator.reduce(units.sum().detach(), "mean") if accelerator.num_processes > 1 else units.sum()
    return sums.sum() / per_process


def _split_stats(kind, evs):
    """training_stats' per-split numbers: {split}_loss, {split}_metric and {split}_<metric name> (accuracy or
    perplexity), None for a split without rows."""
    out = {}
    for split, ev in evs.items():
        metric = ev and kind.metric_of(ev)
        out.update({f"{split}_loss": ev and ev["loss"], f"{split}_metric": metric, f"{split}_{kind.metric}": metric})
    return out


def _mid_run_eval(accelerator, examples, of):
    """What the mid-run evaluations (history, progress bar, trackers) are: the first `examples` of the `of`
    validation examples, under the training precision. The recorded final numbers are fp32 on full splits."""
    precision = accelerator.mixed_precision
    return dict(split="val", examples=examples, of=of, precision="fp32" if precision == "no" else precision)


def _mid_run_label(kind, mid_run):
    """The progress bar's name for the mid-run metric, e.g. 'val accuracy (bf16, 200 of 849 examples)', so it is
    not taken for the checkpoint's final one."""
    return f"val {kind.metric} ({mid_run['precision']}, {mid_run['examples']} of {mid_run['of']} examples)"


def _link_caps(total, chain_length):
    """The most steps each link may train: its share of the run, round(j·T/k) − round((j−1)·T/k)."""
    ends = [0, *link_boundaries(total, chain_length), total]
    return [b - a for a, b in zip(ends, ends[1:])]


def _keep_weights(model, watch, keep, step):
    """Load the kept weights (keep="best": the best evaluation's, over every link) and return (their step, their
    link). A best evaluation in link j < k is restored with its links and the chain finished there: the later links
    stay untrained (B = 0), so the model holds all k links, as checkpoint.save expects, with ΔW unchanged."""
    if keep == "best" and watch.run.best_step is not None:
        watch.run.restore(model)
        finish_chain(model)
        return watch.run.best_step, watch.best_link
    return step, watch.index + 1


def _stopping_stats(watch, early_stopping, keep, stopped_at, kept_step, cap, eval_every, mid_run):
    """training_stats' record of how the run ended, link by link, and which weights it kept (adapters.stopping)."""
    best = watch.run
    return dict(stopped_at=stopped_at, cap_steps=cap,
                best_step=best.best_step, best_val_loss=None if best.best_step is None else best.best_loss,
                best_link=watch.best_link, links=watch.links(),
                converged=watch.converged(), kept=keep, kept_step=kept_step,
                early_stopping=dict(enabled=early_stopping, patience=watch.patience if early_stopping else None,
                                    min_delta=watch.min_delta, eval_every=eval_every, on=mid_run))


def _accelerator(mixed_precision, log_with=(), project_dir=None, cpu=False):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    # accelerate keeps one precision per process (a singleton): without a reset, a second train() in the same
    # process would silently keep the first one's, or refuse another. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    # Buffers (selectors, folded links) are identical on every process by construction; DDP need
    # not broadcast them, and they change shape when a link ends.
    # cpu=True when there is no GPU (or --device cpu): accelerate only sets up multi-process CPU (gloo) training then.
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                              log_with=list(log_with) or None, project_dir=project_dir,
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if accelerator.mixed_precision != "no" and not accelerator.native_amp:
        # accelerate would record the precision and train in fp32 (fp16 on CPU): refuse instead.
        raise AdapterError(f"mixed precision {accelerator.mixed_precision} is not available on "
                           f"{accelerator.device.type} (use bf16 or no)")
    return accelerator


def check_arguments(config):
    """Refuse bad settings before anything is read, loaded or written (one line each): the fields' ranges and
    choices, then what needs the filesystem. The adapter's own settings (rank, alpha, chain_length, dropout, targets)
    are checked by `apply`, before anything is written."""
    get_method(config.method)
    check(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise AdapterError("device cuda asked for, but no GPU is available here")
    if config.data_file and not Path(config.data_file).exists():
        raise AdapterError(f"data file not found: {config.data_file}")
    out = Path(config.out)
    for path in (out, out.with_name(out.name + ".partial")):
        if path.exists() and not path.is_dir():
            raise AdapterError(f"output path {path} exists and is not a directory")
    parent = next(p for p in out.parents if p.exists())  # the filesystem root always exists
    if not parent.is_dir():
        raise AdapterError(f"cannot create output directory {out}: {parent} is a file")
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise AdapterError(f"output directory {out} exists and is not empty (use --overwrite)")


def train(config=None, /, *, monitor=None, on_step=None, **settings):
    """Fine-tune and write a checkpoint to `config.out`; returns training_stats (also in OUT/training_stats.json).

    `config`: a TrainConfig (its fields are the settings, each with its meaning); keyword `settings` replace fields
    of it (or of the defaults): `train(method="c3la", chain_length=3, out="ckpt/c3la")`.
    `monitor(model, step) -> {name: float}`: the hook of adapters.tracking, called at each evaluation; with trackers
    and no monitor given, the installed one (analysis.monitor.Diagnostics: intruders, ‖ΔW‖, stable rank, the MI
    bound so far). `on_step(step)` is called after each optimizer step (a hook for logging, or to stop a run).

    The steps, each below: resolve and check the settings; set up (data, model, method, optimizer, schedule);
    resume or start; the loop; the final evaluation; writing. The validation split is what the mid-run evaluations
    use; test is never looked at before the end. A chained method's links end at equal shares of the run, or with
    early_stopping when the link converges (adapters.stopping; at most its share); keep="best" (the default with
    early stopping) tests and saves the weights of the best evaluation over every link, "final" the last ones.
    OUT/config.yaml records the settings that shape the run, resolved. Bad settings raise AdapterError before
    anything is written; an existing OUT.partial/ is kept until the run has set up successfully.
    """
    config = _resolve(make(TrainConfig, config, **settings))
    run = _set_up(config)
    loop = _start(run, config)
    monitor = _start_tracking(run, config, monitor)
    _train_loop(run, config, loop, monitor, on_step)
    # The final evaluation is in the weights' own precision (fp32): accelerate's autocast wrapper comes off, so it
    # is what a fresh load of the checkpoint evaluates to.
    inner = run.accelerator.unwrap_model(run.net, keep_fp32_wrapper=False)
    kept_step, kept_link = _keep_weights(inner, run.watch, config.keep, loop.step)
    evs, stats = _final_evaluation(run, config, loop, inner, kept_step)
    if run.accelerator.is_main_process:
        _write(run, config, loop, inner, evs, stats, kept_link)
    if run.trackers:
        log_scalars(run.accelerator, {f"final/{k}": v for k, v in stats.items()
                                      if k.endswith(("_loss", "_metric", "_gap")) and isinstance(v, (int, float))},
                    run.total)
        run.accelerator.end_training()
    run.accelerator.wait_for_everyone()
    return stats


def _resolve(config):
    """The settings checked, with chain_length (methods.resolve_chain_length) and keep (best with early stopping,
    else final) resolved: the values the run records."""
    check_arguments(config)
    chain_length = resolve_chain_length(config.method, config.chain_length)
    return replace(config, chain_length=chain_length,
                   keep=config.keep or ("best" if config.early_stopping else "final"))


class _Run(SimpleNamespace):
    """What set-up makes and the rest of the run reads: the accelerator, the task and its type, the model and its
    optimizer and schedule, the step plan (total, links' boundaries and caps, evaluations, snapshots)."""


@dataclass
class _Loop:
    """What the loop changes, all of it in the resumable state: the step, the history of mid-run evaluations, the
    step times, the running losses since the last evaluation, the steps links ended after, the snapshots saved."""
    step: int = 0
    history: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    running: list = field(default_factory=list)
    folds: list = field(default_factory=list)
    snapshots: dict = field(default_factory=dict)
    stopped: bool = False


def _set_up(c):
    """Data, model, method, optimizer and schedule, in the order that draws the seed's random numbers."""
    from accelerate.utils import set_seed
    r = _Run(spec=get_method(c.method), out=Path(c.out), trackers=tracker_names(c.report_to))
    r.partial = r.out.with_name(r.out.name + ".partial")
    r.lr = c.lr if c.lr is not None else DEFAULT_LR[r.spec.trains_base]
    logging_dir = Path(c.logging_dir) if c.logging_dir else r.out.with_name(r.out.name + ".logs")
    r.accelerator = accelerator = _accelerator(c.mixed_precision, r.trackers, logging_dir if r.trackers else None,
                                               cpu=c.device == "cpu" or not torch.cuda.is_available())
    note = one_link_note(c.method, c.chain_length)
    if note and accelerator.is_main_process:
        print(f"note: {note}", file=sys.stderr)
    if c.batch_size % accelerator.num_processes:
        raise AdapterError(f"batch_size {c.batch_size} must divide over {accelerator.num_processes} processes")
    set_seed(c.seed)  # dropout draws from the global RNG: same seed, same run
    r.task = data.load_task(c.task, c.data_file, n_train=c.n_train, n_val=c.n_val, n_test=c.n_test,
                            val_fraction=c.val_fraction)
    if (c.early_stopping or c.keep == "best") and not r.task.val:
        raise AdapterError("early stopping and keep=best need a validation split (val_fraction > 0, or a split "
                           "column with validation rows)")
    r.kind = kind = tasks.get_task_type(r.task.type)
    tasks.check_model(kind, c.model, models.model_family(c.model))
    r.processor = models.load_processor(c.model)
    net = models.load_model(c.model, num_labels=len(r.task.labels or ()), seed=c.seed, auto_class=kind.auto_class)
    # The new head as drawn from the seed, before the method is applied: the same for every method (pairing).
    r.head_init = pairing.head_digest(net, models.head_names(net)) if kind.new_head else None
    head = kind.trained_head(net, r.spec)
    r.base_hash = models.weights_hash(net, exclude=kind.hash_exclude(head))
    apply(net, c.method, rank=c.rank, alpha=c.alpha, targets=c.targets, chain_length=c.chain_length, seed=c.seed,
          dropout=c.dropout, head=head)
    # the paper's 10x is for a new head; a pretrained one (an LM's) trains at the base lr
    r.head_lr_mult = c.head_lr_mult if c.head_lr_mult is not None else (r.spec.head_lr_mult if kind.new_head else 1.0)
    r.groups = param_groups(net, r.lr, c.weight_decay, c.lr_ratio, r.head_lr_mult)
    r.net, r.optimizer = net, torch.optim.AdamW(r.groups, lr=r.lr, weight_decay=c.weight_decay)

    r.steps_per_epoch = math.ceil(len(r.task.train) / c.batch_size)
    r.total = total = c.max_steps if c.max_steps is not None else max(1, round(c.epochs * r.steps_per_epoch))
    r.boundaries = link_boundaries(total, c.chain_length)
    # With early stopping a chain converges link by link (adapters.stopping): each link ends on its own patience or
    # at its share of the cap, and the next one starts there. Otherwise links end at the fixed shares (boundaries).
    r.by_link, r.caps = c.early_stopping and c.chain_length > 1, _link_caps(total, c.chain_length)
    warmup_steps = round(c.warmup * total)
    r.schedule = torch.optim.lr_scheduler.LambdaLR(r.optimizer, lambda s: min(
        (s + 1) / max(1, warmup_steps), max(0.0, (total - s) / max(1, total - warmup_steps))))
    r.eval_every = c.eval_every or max(1, total // EVALS_PER_RUN)
    r.trajectory_steps = sorted({round(total * (i + 1) / c.save_trajectory) for i in range(c.save_trajectory)})
    r.watch = LinkByLink(c.chain_length, c.patience if c.early_stopping else math.inf, c.min_delta,
                         c.keep == "best", r.by_link)
    # What a resumed run must share with the state it resumes (the precision as accelerate resolved it).
    r.results_args = {**shaping(c), "mixed_precision": accelerator.mixed_precision}
    return r


def _start(r, c):
    """A fresh loop, or the resumed one: the links already ended are replayed (they change buffer shapes), then the
    saved model, optimizer, schedule, random states and loop are loaded. Then accelerate wraps the model."""
    loop, accelerator = _Loop(), r.accelerator
    state_file = r.partial / STATE
    state = _read_state(state_file, r.results_args) if c.resume and state_file.exists() else None
    if state is not None:
        for _ in state["folds"]:
            next_link(r.net)
        r.net.load_state_dict(state["model"])
        r.optimizer.load_state_dict(state["optimizer"])
        r.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["py_rng"])
        loop = _Loop(step=state["step"], history=state["history"], step_times=state["step_times"],
                     running=state["running"], folds=list(state["folds"]),
                     snapshots={s: None for s in state["snapshot_steps"]})  # the files are already in partial/
        r.watch.load_state_dict(state["stopping"])
    elif c.resume and r.partial.exists():  # nothing at all to resume is the normal first run: say nothing then
        accelerator.print(f"no resumable state in {r.partial}; starting from step 0")
    elif r.partial.exists() and accelerator.is_main_process:
        shutil.rmtree(r.partial)  # a fresh run: the old state and snapshots are not ours (only now: set-up worked)
    accelerator.wait_for_everyone()

    r.net, r.optimizer = accelerator.prepare(r.net, r.optimizer)
    r.inner = accelerator.unwrap_model(r.net)  # still under the training precision (autocast), for mid-run evals
    if state is not None and accelerator.scaler is not None:  # fp16's loss scale goes on where it was
        accelerator.scaler.load_state_dict(state["scaler"])
    r.eval_rows = r.task.val[:c.eval_examples]  # mid-run evaluations: validation, never test
    r.mid_run = _mid_run_eval(accelerator, len(r.eval_rows), len(r.task.val))
    # What the run computes (not where it writes, nor whether it resumed): the same file for a resumed run.
    r.config = {k: (str(v) if isinstance(v, Path) else v) for k, v in shaping(c).items()}
    return loop


def _start_tracking(r, c, monitor):
    """Trackers and the monitor (the installed one when trackers run and none is given); the monitor, started."""
    if r.trackers:
        # The logged val_* scalars are the mid-run ones (final/* the recorded ones): the hparams say what they are.
        r.accelerator.init_trackers(r.out.name, config=tracker_config(
            {**r.config, **{f"mid_run_eval_{k}": v for k, v in r.mid_run.items()}}))
        if monitor is None and (installed := installed_monitor()) is not None:
            monitor = installed()
    start_monitor(monitor, len(r.task.train))
    return monitor


def _epoch_loader(r, c, epoch, rows, collate, lengths):
    """This epoch's DataLoader over `rows` (the training split, or its indices): the order depends on (seed, epoch)
    only, never on the method, and is the same on every process."""
    g = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch)
    if c.group_by_length:
        # generator= as well: without one, the DataLoader draws its workers' base seed from the global RNG when
        # iteration starts, which would shift dropout's stream on a resumed run.
        return torch.utils.data.DataLoader(rows, collate_fn=collate, generator=g,
                                           batch_sampler=data.length_grouped_batches(lengths, c.batch_size, g))
    return torch.utils.data.DataLoader(rows, batch_size=c.batch_size, shuffle=True, generator=g, drop_last=False,
                                       collate_fn=collate)


def _save_state(r, loop):
    """Everything the rest of the run depends on, down to the running loss of the current evaluation window, into
    OUT.partial/state.pt (written whole, then renamed)."""
    if r.accelerator.is_main_process:
        r.partial.mkdir(parents=True, exist_ok=True)
        scaler = r.accelerator.scaler
        state = dict(version=STATE_VERSION, args=r.results_args, step=loop.step, model=r.inner.state_dict(),
                     optimizer=r.optimizer.optimizer.state_dict(), schedule=r.schedule.state_dict(),
                     scaler=scaler.state_dict() if scaler is not None else None,
                     rng=torch.get_rng_state(), py_rng=random.getstate(),
                     cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                     history=loop.history, running=loop.running, step_times=loop.step_times,
                     snapshot_steps=sorted(loop.snapshots), folds=loop.folds, stopping=r.watch.state_dict())
        torch.save(state, r.partial / (STATE + ".tmp"))
        (r.partial / (STATE + ".tmp")).replace(r.partial / STATE)


def _train_loop(r, c, loop, monitor, on_step):
    """Epochs of batches until the cap or the last link's end: each optimizer step (_step), then what comes after
    it (_after_step: link ends, mid-run evaluations, snapshots, resumable state)."""
    accelerator, kind = r.accelerator, r.kind
    lengths = kind.lengths(r.processor, r.task.train, c.max_length) if c.group_by_length else None

    def batches(epoch):
        """This epoch's batches; starting an epoch leaves the global RNG (dropout) untouched, so a resumed run
        replays exactly."""
        loader = _epoch_loader(r, c, epoch, r.task.train, kind.collate(r.processor, c.max_length), lengths)
        with torch.random.fork_rng(devices=[]):
            return iter(accelerator.prepare_data_loader(loader))

    # The example indices epoch 0 trains on, batch by batch: the same loader over indices (its own generator, so
    # neither the global RNG nor the loop's batches move).
    with torch.random.fork_rng(devices=[]):
        data_order = pairing.order_digest(_epoch_loader(r, c, 0, range(len(r.task.train)), list, lengths))
    r.pairs = dict(split_sha256=pairing.split_digest(r.task.sha256, len(r.task.train), len(r.task.val),
                                                     len(r.task.test), c.val_fraction, c.max_length),
                   head_init_sha256=r.head_init, data_order_sha256=data_order, seed=c.seed)

    start = time.perf_counter()
    desc = f"{c.method} r={c.rank}" + (f" k={c.chain_length}" if c.chain_length > 1 else "")
    bar = tqdm(total=r.total, initial=loop.step, desc=desc, disable=not (c.progress and accelerator.is_main_process))
    r.net.train()
    while loop.step < r.total and not loop.stopped:
        epoch, skip = divmod(loop.step, r.steps_per_epoch)
        for i, batch in enumerate(batches(epoch)):
            if i < skip:
                continue  # resumed mid-epoch: the same order, the batches already seen skipped
            _step(r, c, loop, batch)
            bar.update(1)
            _after_step(r, c, loop, monitor, bar)
            if on_step:
                on_step(loop.step)
            if loop.step >= r.total or loop.stopped:
                break
    bar.close()
    r.wall = time.perf_counter() - start


def _step(r, c, loop, batch):
    """One optimizer step on the batch: the loss, its gradients (clipped), AdamW and the schedule."""
    t0 = time.perf_counter()
    loss = _loss(r.accelerator, r.net, batch, r.kind)
    r.accelerator.backward(loss)
    if c.grad_clip:
        r.accelerator.clip_grad_norm_([p for p in r.net.parameters() if p.requires_grad], c.grad_clip)
    r.optimizer.step()
    r.schedule.step()
    r.optimizer.zero_grad(set_to_none=True)
    loop.step_times.append(time.perf_counter() - t0)
    loop.step += 1
    loop.running.append(loss.item())


def _after_step(r, c, loop, monitor, bar):
    """After step t: a fixed link share that ends is folded; a mid-run evaluation when one is due; the link ends
    (on patience or at its cap), the last one ending the run; a trajectory snapshot; the resumable state."""
    step, watch, inner, kind = loop.step, r.watch, r.inner, r.kind
    if not r.by_link and step in r.boundaries:
        next_link(inner, r.optimizer.optimizer)  # a fixed share ends: folded before this step's evaluation
    link_end = watch.start + r.caps[watch.index]  # the current link's cap (its fixed boundary without by_link)
    # Evaluations count from the link's start and come at its end (from 0 and at the run's end when the links are
    # not watched one by one: then the two are the same for a non-chained run).
    origin, end = (watch.start, link_end) if r.by_link else (0, r.total)
    link_done = False
    if (step - origin) % r.eval_every == 0 or step == end:
        ev = _eval_split(r.accelerator, inner, r.eval_rows, r.processor, c.max_length, 2 * c.batch_size, kind)
        loop.history.append(dict(step=step, train_loss_running=sum(loop.running) / len(loop.running),
                                 lr=r.schedule.get_last_lr()[0], **_split_stats(kind, {"val": ev})))
        link_done = ev is not None and watch.update(step, ev["loss"], inner)
        if r.trackers or monitor is not None:
            numbers = {k: v for k, v in loop.history[-1].items() if isinstance(v, (int, float)) and k != "step"}
            log_scalars(r.accelerator, {**numbers, **(monitor(inner, step) if monitor else {})}, step)
        bar.set_postfix({"train loss (running)": f"{loop.history[-1]['train_loss_running']:.3f}",
                         **({_mid_run_label(kind, r.mid_run): f"{kind.metric_of(ev):.3f}"} if ev else {})})
        loop.running = []
    if link_done or step == link_end:
        watch.end_link(step, "patience" if link_done else "cap")
        if watch.index == c.chain_length - 1:
            loop.stopped = True  # the last link ends the run
        else:
            if r.by_link:  # the link's best weights go on into the fold; the next link starts from them
                watch.restore_link(inner)
                next_link(inner, r.optimizer.optimizer)
            loop.folds.append(step)
            watch.start_link(step)
    if step in r.trajectory_steps and r.accelerator.is_main_process:
        r.partial.mkdir(parents=True, exist_ok=True)
        save_file(snapshot(inner), str(r.partial / f"step_{step:08d}.safetensors"))
        loop.snapshots[step] = None
    if c.save_every and step % c.save_every == 0 and step < r.total and not loop.stopped:
        _save_state(r, loop)


def _final_evaluation(r, c, loop, inner, kept_step):
    """Eval mode, the kept weights, full splits (docs/THEORY.md section 3): (the splits' evaluations,
    training_stats)."""
    kind, task, accelerator = r.kind, r.task, r.accelerator
    evs = {split: _eval_split(accelerator, inner, getattr(task, split), r.processor, c.max_length,
                              2 * c.batch_size, kind) for split in ("train", "val", "test")}
    train_ev, test_ev = evs["train"], evs["test"]
    # The metric's gap, signed like the loss's: positive when the test split does worse.
    metric_gap = (kind.metric_of(train_ev) - kind.metric_of(test_ev)) * (1 if kind.higher_is_better else -1)
    peak, peak_kind = _peak_memory(accelerator.device)
    r.precision = dict(dropout=c.dropout, mixed_precision=accelerator.mixed_precision,
                       eval_precision=PRECISION_NAMES[next(inner.parameters()).dtype])
    stopped_at, times = loop.step, loop.step_times
    stats = dict(
        n_train=len(task.train), n_val=len(task.val), n_test=len(task.test), task_type=kind.name,
        metric=kind.metric, metric_higher_is_better=kind.higher_is_better, loss_unit=kind.loss_unit,
        **_split_stats(kind, evs),
        **{f"{split}_units": sum(ev["units"]) for split, ev in evs.items() if ev},
        generalization_gap=test_ev["loss"] - train_ev["loss"],
        abs_generalization_gap=abs(test_ev["loss"] - train_ev["loss"]),
        metric_gap=metric_gap,
        **_loss_summary("train", train_ev["losses"]), **_loss_summary("test", test_ev["losses"]),
        steps=stopped_at, epochs=stopped_at / r.steps_per_epoch, history=loop.history, wall_time_s=r.wall,
        **_stopping_stats(r.watch, c.early_stopping, c.keep, stopped_at, kept_step, r.total, r.eval_every,
                          r.mid_run),
        median_step_time_s=statistics.median(times) if times else None,
        throughput_examples_per_s=c.batch_size / statistics.median(times) if times else None,
        peak_memory_bytes=peak, peak_memory_kind=peak_kind, seed=c.seed, world_size=accelerator.num_processes,
        device=str(accelerator.device), machine=_machine(accelerator.device), **r.precision,
        mid_run_eval=r.mid_run, pairing=r.pairs, versions=_versions())
    return evs, stats


def _write(r, c, loop, inner, evs, stats, kept_link):
    """The checkpoint (adapters.checkpoint.save, atomically): weights, adapters_meta.json with the task and the
    hyperparameters, training_stats.json (the completion record), config.yaml, the per-example losses and the
    trajectory; then OUT.partial/ goes."""
    task_meta = dict(name=r.task.name, type=r.kind.name,
                     data=str(Path(c.data_file).resolve()) if c.data_file else None, labels=r.task.labels,
                     max_length=c.max_length, n_train=c.n_train, n_val=c.n_val, n_test=c.n_test,
                     val_fraction=c.val_fraction, sha256=r.task.sha256)
    lr_ratio = c.lr_ratio if c.lr_ratio is not None else (r.spec.adapter.lr_ratio if r.spec.adapter else 1.0)
    hyper = dict(lr=r.lr, lr_ratio=lr_ratio, head_lr_mult=r.head_lr_mult, group_lrs=[g["lr"] for g in r.groups],
                 weight_decay=c.weight_decay, warmup=c.warmup, grad_clip=c.grad_clip, batch_size=c.batch_size,
                 group_by_length=c.group_by_length, steps=r.total, **r.precision)

    def write_trajectory(directory):
        directory.mkdir()
        for s in sorted(loop.snapshots):
            shutil.copy(r.partial / f"step_{s:08d}.safetensors", directory / f"step_{s:08d}.safetensors")

    # Both records below hold the digest of the weights, already written beside them (checkpoint.save writes
    # `files` after them): hashed once, since a full fine-tuning's weights are the whole model.
    weights_sha256 = functools.cache(checkpoint.weights_digest)

    def write_stats(file):
        # The completion record says what it completes, so a resumed study can check a finished run it skips.
        stats["weights_sha256"] = weights_sha256(file.parent)
        write_json(file, stats)

    files = {checkpoint.STATS: write_stats,
             CONFIG: lambda p: write_text(p, yaml.safe_dump(r.config, sort_keys=False))}
    # The final per-example losses with the digest of the weights they are of, so bounds need not run the model.
    files[example_losses.EXAMPLE_LOSSES] = lambda p: example_losses.write_example_losses(
        p, evs, task_meta, weights_sha256(p.parent))
    if loop.snapshots:
        files["trajectory"] = write_trajectory
    checkpoint.save(inner, r.out, base_model=c.model, base_model_hash=r.base_hash, task_type=r.kind.name,
                    overwrite=c.overwrite, files=files,
                    extra_meta=dict(link_boundaries=loop.folds, best_link=kept_link, task=task_meta, training=hyper))
    shutil.rmtree(r.partial, ignore_errors=True)


def _read_state(state_file, results_args):
    """The resumable state, refused when it is from another version or another run's settings."""
    try:
        state = torch.load(state_file, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise AdapterError(f"corrupt resumable state {state_file} ({e}); rerun without --resume") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise AdapterError(f"{state_file} was written by another version of adapters.train; "
                           "rerun without --resume to start afresh")
    changed = sorted(k for k in results_args if state["args"].get(k) != results_args[k])
    if changed:
        raise AdapterError(f"{state_file} is from a run with other settings ({', '.join(changed)}); "
                           "resume with the same settings, or rerun without --resume")
    return state


def parser():
    return command.parser("python -m adapters.train", __doc__, TrainConfig,
                          epilog="methods (--method):\n" + method_table())


@cli
def main(argv=None):
    config, _ = command.parse(parser(), TrainConfig, argv)  # --config FILE.yaml: its keys are flags; flags win
    stats = train(config)  # checks every setting before it writes anything
    summary = {k: stats[k] for k in ("n_train", "n_val", "n_test", "train_loss", "val_loss", "test_loss",
                                     "train_metric", "val_metric", "test_metric", "generalization_gap",
                                     "median_step_time_s")}
    k = resolve_chain_length(config.method, config.chain_length)  # as train() resolved it
    note = one_link_note(config.method, k)
    print(json.dumps(dict(out=str(config.out), method=config.method, chain_length=k, **summary,
                          **({"note": note} if note else {}))))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under torchrun every rank leaves together (train() ends at a barrier): a rank exiting while gloo's threads
        # still run can abort at exit.
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
