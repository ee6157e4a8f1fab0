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
import inspect
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
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import checkpoint, data, evaluate, example_losses, models, pairing, tasks, taskspec
from .chain import link_boundaries
from .config import parse_args_with_config
from .errors import AdapterError, ArgumentParser, HelpFormatter, cli
from .inject import adapted_layers, apply, next_link, param_groups
from .io import write_json, write_text
from .methods import CHAIN_LENGTH, METHODS, get_method, method_table, one_link_note, resolve_chain_length
from .stopping import KEEP, LinkByLink, finish_chain
from .tracking import installed_monitor, log_scalars, start_monitor, tracker_config, tracker_names

DEFAULT_LR = {True: 5e-5, False: 1e-3}  # by "trains the pretrained weights": fft vs everything else
EVALS_PER_RUN = 5  # mid-run evaluations when eval_every is not given
STATE = "state.pt"  # the resumable state, in OUT.partial/
STATE_VERSION = 4  # bump when the resumable state changes: an older state.pt is refused, not misread
MIXED_PRECISION = ("no", "fp16", "bf16")
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# The range of every numeric argument of train() (None = not given, where it may be). The adapter's own
# arguments (rank, alpha, chain_length, dropout, targets) are checked by `apply`, before anything is written.
_AT_LEAST_1, _POSITIVE, _NON_NEGATIVE = (">= 1", lambda v: v >= 1), ("> 0", lambda v: v > 0), (">= 0", lambda v: v >= 0)
_FRACTION = ("in [0, 1)", lambda v: 0 <= v < 1)
RANGES = dict(epochs=_POSITIVE, max_steps=_AT_LEAST_1, lr=_POSITIVE, lr_ratio=_POSITIVE, weight_decay=_NON_NEGATIVE,
              warmup=_FRACTION, grad_clip=_NON_NEGATIVE, batch_size=_AT_LEAST_1, max_length=_AT_LEAST_1,
              n_train=_AT_LEAST_1, n_val=_AT_LEAST_1, n_test=_AT_LEAST_1, val_fraction=_FRACTION,
              head_lr_mult=_POSITIVE, eval_every=_AT_LEAST_1, eval_examples=_AT_LEAST_1, save_every=_AT_LEAST_1,
              save_trajectory=_NON_NEGATIVE, patience=_AT_LEAST_1, min_delta=_NON_NEGATIVE)
# Arguments that do not change what a run computes: a resumed run may differ in these only.
NOT_RESULTS = ("out", "resume", "overwrite", "save_every", "monitor", "on_step", "progress", "report_to",
               "logging_dir")
CONFIG = "config.yaml"  # the run's resolved settings, in the checkpoint: `--config` it (with --out) to rerun it


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


def check_arguments(args):
    """Refuse bad arguments before anything is read, loaded or written (one line each)."""
    get_method(args["method"])
    for name, (text, ok) in RANGES.items():
        value = args[name]
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise AdapterError(f"{name} must be {text}, got {value!r}")
    if args["mixed_precision"] not in (None, *MIXED_PRECISION):
        raise AdapterError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                           f"got {args['mixed_precision']!r}")
    if args["data_file"] and not Path(args["data_file"]).exists():
        raise AdapterError(f"data file not found: {args['data_file']}")
    out = Path(args["out"])
    for path in (out, out.with_name(out.name + ".partial")):
        if path.exists() and not path.is_dir():
            raise AdapterError(f"output path {path} exists and is not a directory")
    parent = next(p for p in out.parents if p.exists())  # the filesystem root always exists
    if not parent.is_dir():
        raise AdapterError(f"cannot create output directory {out}: {parent} is a file")
    if out.exists() and any(out.iterdir()) and not args["overwrite"]:
        raise AdapterError(f"output directory {out} exists and is not empty (use --overwrite)")


def _accelerator(mixed_precision, log_with=(), project_dir=None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    # accelerate keeps one precision per process (a singleton): without a reset, a second train() in the same
    # process would silently keep the first one's, or refuse another. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    # Buffers (selectors, folded links) are identical on every process by construction; DDP need
    # not broadcast them, and they change shape when a link ends.
    # cpu=True when there is no GPU: accelerate only sets up multi-process CPU (gloo) training then.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                              log_with=list(log_with) or None, project_dir=project_dir,
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if accelerator.mixed_precision != "no" and not accelerator.native_amp:
        # accelerate would record the precision and train in fp32 (fp16 on CPU): refuse instead.
        raise AdapterError(f"mixed precision {accelerator.mixed_precision} is not available on "
                           f"{accelerator.device.type} (use bf16 or no)")
    return accelerator


def train(model="minilm", task="movie-reviews", data_file=None, method="cla", rank=16, alpha=32, targets=None,
          chain_length=None, epochs=1.0, max_steps=None, lr=None, lr_ratio=None, weight_decay=0.0, warmup=0.06,
          grad_clip=1.0, batch_size=16, max_length=taskspec.MAX_LENGTH, seed=0, out="ckpt", save_trajectory=0,
          resume=False, overwrite=False, n_train=None, n_val=None, n_test=None, val_fraction=data.VAL_FRACTION,
          head_lr_mult=None, group_by_length=True, eval_every=None, eval_examples=512, save_every=None, dropout=0.0,
          early_stopping=False, patience=3, min_delta=0.0, keep=None, mixed_precision=None, report_to="none",
          logging_dir=None, monitor=None, on_step=None, progress=True):
    """Fine-tune and write a checkpoint to `out`; returns training_stats (also in out/training_stats.json).

    `chain_length`: the number of links k; None = the method's (methods.CHAIN_LENGTH for a chained method, 1 for
    the others), recorded as resolved. k = 1 for a chained method is its non-chained twin: said on stderr.
    `dropout`: LoRA dropout p on the adapter path (PEFT's lora_dropout). `mixed_precision`: "no", "fp16" or
    "bf16" autocast for training; None = accelerate's default (ACCELERATE_MIXED_PRECISION, else "no").
    The validation split (`val_fraction` of the training split unless the data has one; `n_val` caps it) is what
    the mid-run evaluations in `history` use and is evaluated at the end beside train and test; test is never
    looked at before the end. `head_lr_mult`: the head's lr multiplier (default: the method's, 10 for fft and
    head-only). `group_by_length`: batches of similar length (less padding, same examples per epoch).
    `report_to`: tensorboard, wandb, trackio, all or none (accelerate's trackers, logs under `logging_dir`, default
    OUT.logs/): at each evaluation the running loss, lr, validation loss and metric, and the values of `monitor`.
    `monitor(model, step) -> {name: float}`: the hook of adapters.tracking, called at each evaluation; with
    trackers and no monitor given, the installed one (analysis.monitor.Diagnostics: intruders, ‖ΔW‖, stable rank,
    the MI bound so far). OUT/config.yaml records these arguments, less those in NOT_RESULTS (the CLI's flags are
    exactly these arguments).
    `early_stopping`: stop after `patience` validation evaluations (every `eval_every` steps, on the mid-run
    evaluation's examples) without a validation loss lower than the best by more than `min_delta`; the cap is
    max_steps (or epochs). A chained method converges link by link (adapters.stopping): each link trains until its
    own validation loss stops improving (patience evaluations, counted every `eval_every` steps from the link's
    start and at its end) or until its share of the cap (round(j·T/k) − round((j−1)·T/k) steps), its best weights
    are restored and folded, and the next link starts from them; the last link ends the run. Without early
    stopping a chain's links end at the fixed shares. `keep`: "best" (the default with early stopping) tests and
    saves the weights of the best evaluation over every link (a best in link j < k: the later links untrained),
    "final" (the default without) the last ones. Recorded: stopped_at, best_step, best_link, links (per link: its
    start, end, best and how it ended), converged, kept; adapters_meta.json's link_boundaries are the folds made.
    `on_step(step)` is called after each optimizer step (a hook for logging, or to stop a run).
    Bad arguments raise AdapterError before anything is written; an existing OUT.partial/ is kept until
    the run has set up successfully.
    """
    args = dict(locals())  # exactly the arguments: checked here, and recorded in the resumable state
    from accelerate.utils import set_seed

    check_arguments(args)
    args["chain_length"] = chain_length = resolve_chain_length(method, chain_length)  # recorded as resolved
    if keep not in (None, *KEEP):
        raise AdapterError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    args["keep"] = keep = keep or ("best" if early_stopping else "final")  # recorded as resolved
    out = Path(out)
    spec = get_method(method)
    partial = out.with_name(out.name + ".partial")
    if lr is None:
        lr = DEFAULT_LR[spec.trains_base]

    trackers = tracker_names(report_to)
    logging_dir = Path(logging_dir) if logging_dir else out.with_name(out.name + ".logs")
    accelerator = _accelerator(mixed_precision, trackers, logging_dir if trackers else None)
    note = one_link_note(method, chain_length)
    if note and accelerator.is_main_process:
        print(f"note: {note}", file=sys.stderr)
    if batch_size % accelerator.num_processes:
        raise AdapterError(f"batch_size {batch_size} must divide over {accelerator.num_processes} processes")
    set_seed(seed)  # dropout draws from the global RNG: same seed, same run
    the_task = data.load_task(task, data_file, n_train=n_train, n_val=n_val, n_test=n_test, val_fraction=val_fraction)
    if (early_stopping or keep == "best") and not the_task.val:
        raise AdapterError("early stopping and keep=best need a validation split (val_fraction > 0, or a split "
                           "column with validation rows)")
    kind = tasks.get_task_type(the_task.type)
    tasks.check_model(kind, model, models.model_family(model))
    processor = models.load_processor(model)
    net = models.load_model(model, num_labels=len(the_task.labels or ()), seed=seed, auto_class=kind.auto_class)
    # The new head as drawn from the seed, before the method is applied: the same for every method (pairing).
    head_init = pairing.head_digest(net, models.head_names(net)) if kind.new_head else None
    head = kind.trained_head(net, spec)
    base_hash = models.weights_hash(net, exclude=kind.hash_exclude(head))
    apply(net, method, rank=rank, alpha=alpha, targets=targets, chain_length=chain_length, seed=seed, dropout=dropout,
          head=head)
    if head_lr_mult is None:  # the paper's 10x is for a new head; a pretrained one (an LM's) trains at the base lr
        head_lr_mult = spec.head_lr_mult if kind.new_head else 1.0
    groups = param_groups(net, lr, weight_decay, lr_ratio, head_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)

    steps_per_epoch = math.ceil(len(the_task.train) / batch_size)
    total = max_steps if max_steps is not None else max(1, round(epochs * steps_per_epoch))
    boundaries = link_boundaries(total, chain_length)
    # With early stopping a chain converges link by link (adapters.stopping): each link ends on its own patience or
    # at its share of the cap, and the next one starts there. Otherwise links end at the fixed shares (boundaries).
    by_link, caps = early_stopping and chain_length > 1, _link_caps(total, chain_length)
    warmup_steps = round(warmup * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / max(1, warmup_steps), max(0.0, (total - s) / max(1, total - warmup_steps))))
    eval_every = eval_every or max(1, total // EVALS_PER_RUN)
    trajectory_steps = sorted({round(total * (i + 1) / save_trajectory) for i in range(save_trajectory)})
    snapshots, history, step_times, running, step, folds = {}, [], [], [], 0, []  # folds: steps links ended after
    watch = LinkByLink(chain_length, patience if early_stopping else math.inf, min_delta, keep == "best", by_link)
    stopped = False
    # What a resumed run must share with the state it resumes (the precision as accelerate resolved it).
    results_args = {**{k: v for k, v in args.items() if k not in NOT_RESULTS},
                    "mixed_precision": accelerator.mixed_precision}

    # Resume: replay the links already ended (they change buffer shapes), then load the saved state.
    state_file = partial / STATE
    state = _read_state(state_file, results_args) if resume and state_file.exists() else None
    if state is not None:
        for _ in state["folds"]:
            next_link(net)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["py_rng"])
        step, history, step_times, running = state["step"], state["history"], state["step_times"], state["running"]
        folds = list(state["folds"])
        snapshots = {s: None for s in state["snapshot_steps"]}  # the files are already in partial/
        watch.load_state_dict(state["stopping"])
    elif resume and partial.exists():  # nothing at all to resume is the normal first run: say nothing then
        accelerator.print(f"no resumable state in {partial}; starting from step 0")
    elif partial.exists() and accelerator.is_main_process:
        shutil.rmtree(partial)  # a fresh run: the old state and snapshots are not ours (only now: set-up worked)
    accelerator.wait_for_everyone()

    net, optimizer = accelerator.prepare(net, optimizer)
    inner = accelerator.unwrap_model(net)  # still under the training precision (autocast), for mid-run evals
    if state is not None and accelerator.scaler is not None:  # fp16's loss scale goes on where it was
        accelerator.scaler.load_state_dict(state["scaler"])
    eval_rows = the_task.val[:eval_examples]  # mid-run evaluations: validation, never test
    mid_run = _mid_run_eval(accelerator, len(eval_rows), len(the_task.val))
    loss_label, val_label = "train loss (running)", _mid_run_label(kind, mid_run)
    # What the run computes (not where it writes, nor whether it resumed): the same file for a resumed run.
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items() if k not in NOT_RESULTS}
    if trackers:
        # The logged val_* scalars are the mid-run ones (final/* the recorded ones): the hparams say what they are.
        accelerator.init_trackers(out.name, config=tracker_config(
            {**config, **{f"mid_run_eval_{k}": v for k, v in mid_run.items()}}))
        if monitor is None and (installed := installed_monitor()) is not None:
            monitor = installed()
    start_monitor(monitor, len(the_task.train))
    lengths = kind.lengths(processor, the_task.train, max_length) if group_by_length else None

    def epoch_loader(epoch, rows, collate):
        """This epoch's DataLoader over `rows` (the training split, or its indices): the order depends on (seed,
        epoch) only, never on the method, and is the same on every process."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        if group_by_length:
            # generator= as well: without one, the DataLoader draws its workers' base seed from the global RNG
            # when iteration starts, which would shift dropout's stream on a resumed run.
            return torch.utils.data.DataLoader(rows, collate_fn=collate, generator=g,
                                               batch_sampler=data.length_grouped_batches(lengths, batch_size, g))
        return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True, generator=g, drop_last=False,
                                           collate_fn=collate)

    def batches(epoch):
        """This epoch's batches; starting an epoch leaves the global RNG (dropout) untouched, so a resumed run
        replays exactly."""
        loader = epoch_loader(epoch, the_task.train, kind.collate(processor, max_length))
        with torch.random.fork_rng(devices=[]):
            return iter(accelerator.prepare_data_loader(loader))

    # The example indices epoch 0 trains on, batch by batch: the same loader over indices (its own generator, so
    # neither the global RNG nor the loop's batches move).
    with torch.random.fork_rng(devices=[]):
        data_order = pairing.order_digest(epoch_loader(0, range(len(the_task.train)), list))
    pairs = dict(split_sha256=pairing.split_digest(the_task.sha256, len(the_task.train), len(the_task.val),
                                                   len(the_task.test), val_fraction, max_length),
                 head_init_sha256=head_init, data_order_sha256=data_order, seed=seed)

    def save_state():
        if accelerator.is_main_process:
            partial.mkdir(parents=True, exist_ok=True)
            # Everything the rest of the run depends on, down to the running loss of the current eval window.
            state = dict(version=STATE_VERSION, args=results_args, step=step, model=inner.state_dict(),
                         optimizer=optimizer.optimizer.state_dict(), schedule=schedule.state_dict(),
                         scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                         rng=torch.get_rng_state(), py_rng=random.getstate(),
                         cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                         history=history, running=running, step_times=step_times, snapshot_steps=sorted(snapshots),
                         folds=folds, stopping=watch.state_dict())
            torch.save(state, partial / (STATE + ".tmp"))
            (partial / (STATE + ".tmp")).replace(state_file)

    start = time.perf_counter()
    desc = f"{method} r={rank}" + (f" k={chain_length}" if chain_length > 1 else "")
    bar = tqdm(total=total, initial=step, desc=desc, disable=not (progress and accelerator.is_main_process))
    net.train()
    while step < total and not stopped:
        epoch, skip = divmod(step, steps_per_epoch)
        for i, batch in enumerate(batches(epoch)):
            if i < skip:
                continue  # resumed mid-epoch: the same order, the batches already seen skipped
            t0 = time.perf_counter()
            loss = _loss(accelerator, net, batch, kind)
            accelerator.backward(loss)
            if grad_clip:
                accelerator.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - t0)
            step += 1
            running.append(loss.item())
            bar.update(1)
            if not by_link and step in boundaries:
                next_link(inner, optimizer.optimizer)  # a fixed share ends: folded before this step's evaluation
            link_end = watch.start + caps[watch.index]  # the current link's cap (its fixed boundary without by_link)
            # Evaluations count from the link's start and come at its end (from 0 and at the run's end when the links
            # are not watched one by one: then the two are the same for a non-chained run).
            origin, end = (watch.start, link_end) if by_link else (0, total)
            link_done = False
            if (step - origin) % eval_every == 0 or step == end:
                ev = _eval_split(accelerator, inner, eval_rows, processor, max_length, 2 * batch_size, kind)
                history.append(dict(step=step, train_loss_running=sum(running) / len(running),
                                    lr=schedule.get_last_lr()[0], **_split_stats(kind, {"val": ev})))
                link_done = ev is not None and watch.update(step, ev["loss"], inner)
                if trackers or monitor is not None:
                    numbers = {k: v for k, v in history[-1].items() if isinstance(v, (int, float)) and k != "step"}
                    log_scalars(accelerator, {**numbers, **(monitor(inner, step) if monitor else {})}, step)
                bar.set_postfix({loss_label: f"{history[-1]['train_loss_running']:.3f}",
                                 **({val_label: f"{kind.metric_of(ev):.3f}"} if ev else {})})
                running = []
            if link_done or step == link_end:
                watch.end_link(step, "patience" if link_done else "cap")
                if watch.index == chain_length - 1:
                    stopped = True  # the last link ends the run
                else:
                    if by_link:  # the link's best weights go on into the fold; the next link starts from them
                        watch.restore_link(inner)
                        next_link(inner, optimizer.optimizer)
                    folds.append(step)
                    watch.start_link(step)
            if step in trajectory_steps and accelerator.is_main_process:
                partial.mkdir(parents=True, exist_ok=True)
                save_file(snapshot(inner), str(partial / f"step_{step:08d}.safetensors"))
                snapshots[step] = None
            if save_every and step % save_every == 0 and step < total and not stopped:
                save_state()
            if on_step:
                on_step(step)
            if step >= total or stopped:
                break
    bar.close()
    wall = time.perf_counter() - start

    # Final evaluation: eval mode, final weights, full splits (docs/THEORY.md section 3), in the weights' own
    # precision (fp32): accelerate's autocast wrapper comes off, so this is what a fresh load evaluates to.
    inner = accelerator.unwrap_model(net, keep_fp32_wrapper=False)
    stopped_at, (kept_step, kept_link) = step, _keep_weights(inner, watch, keep, step)
    evs = {split: _eval_split(accelerator, inner, getattr(the_task, split), processor, max_length, 2 * batch_size,
                              kind) for split in ("train", "val", "test")}
    train_ev, test_ev = evs["train"], evs["test"]
    # The metric's gap, signed like the loss's: positive when the test split does worse.
    metric_gap = (kind.metric_of(train_ev) - kind.metric_of(test_ev)) * (1 if kind.higher_is_better else -1)
    peak, peak_kind = _peak_memory(accelerator.device)
    precision = dict(dropout=dropout, mixed_precision=accelerator.mixed_precision,
                     eval_precision=PRECISION_NAMES[next(inner.parameters()).dtype])
    stats = dict(
        n_train=len(the_task.train), n_val=len(the_task.val), n_test=len(the_task.test), task_type=kind.name,
        metric=kind.metric, metric_higher_is_better=kind.higher_is_better, loss_unit=kind.loss_unit,
        **_split_stats(kind, evs),
        **{f"{split}_units": sum(ev["units"]) for split, ev in evs.items() if ev},
        generalization_gap=test_ev["loss"] - train_ev["loss"],
        abs_generalization_gap=abs(test_ev["loss"] - train_ev["loss"]),
        metric_gap=metric_gap,
        **_loss_summary("train", train_ev["losses"]), **_loss_summary("test", test_ev["losses"]),
        steps=stopped_at, epochs=stopped_at / steps_per_epoch, history=history, wall_time_s=wall,
        **_stopping_stats(watch, early_stopping, keep, stopped_at, kept_step, total, eval_every, mid_run),
        median_step_time_s=statistics.median(step_times) if step_times else None,
        throughput_examples_per_s=batch_size / statistics.median(step_times) if step_times else None,
        peak_memory_bytes=peak, peak_memory_kind=peak_kind, seed=seed, world_size=accelerator.num_processes,
        device=str(accelerator.device), machine=_machine(accelerator.device), **precision, mid_run_eval=mid_run,
        pairing=pairs, versions=_versions())
    if accelerator.is_main_process:
        task_meta = dict(name=the_task.name, type=kind.name,
                         data=str(Path(data_file).resolve()) if data_file else None, labels=the_task.labels,
                         max_length=max_length, n_train=n_train, n_val=n_val, n_test=n_test,
                         val_fraction=val_fraction, sha256=the_task.sha256)
        hyper = dict(lr=lr, lr_ratio=lr_ratio if lr_ratio is not None else (
            spec.adapter.lr_ratio if spec.adapter else 1.0),
            head_lr_mult=head_lr_mult,
            group_lrs=[g["lr"] for g in groups], weight_decay=weight_decay, warmup=warmup,
            grad_clip=grad_clip, batch_size=batch_size, group_by_length=group_by_length, steps=total, **precision)

        def write_trajectory(directory):
            directory.mkdir()
            for s in sorted(snapshots):
                shutil.copy(partial / f"step_{s:08d}.safetensors", directory / f"step_{s:08d}.safetensors")

        # Both records below hold the digest of the weights, already written beside them (checkpoint.save writes
        # `files` after them): hashed once, since a full fine-tuning's weights are the whole model.
        weights_sha256 = functools.cache(checkpoint.weights_digest)

        def write_stats(file):
            # The completion record says what it completes, so a resumed study can check a finished run it skips.
            stats["weights_sha256"] = weights_sha256(file.parent)
            write_json(file, stats)

        files = {checkpoint.STATS: write_stats,
                 CONFIG: lambda p: write_text(p, yaml.safe_dump(config, sort_keys=False))}
        # The final per-example losses with the digest of the weights they are of, so bounds need not run the model.
        files[example_losses.EXAMPLE_LOSSES] = lambda p: example_losses.write_example_losses(
            p, evs, task_meta, weights_sha256(p.parent))
        if snapshots:
            files["trajectory"] = write_trajectory
        checkpoint.save(inner, out, base_model=model, base_model_hash=base_hash, task_type=kind.name,
                        overwrite=overwrite, files=files,
                        extra_meta=dict(link_boundaries=folds, best_link=kept_link, task=task_meta,
                                        training=hyper))
        shutil.rmtree(partial, ignore_errors=True)
    if trackers:
        log_scalars(accelerator, {f"final/{k}": v for k, v in stats.items()
                                  if k.endswith(("_loss", "_metric", "_gap")) and isinstance(v, (int, float))}, total)
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return stats


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


def _by_method(value, default):
    """'name v, ...' for the methods whose `value(method)` is not `default` (for --help)."""
    return ", ".join(f"{name} {value(m):g}" for name, m in METHODS.items() if value(m) != default)


def _parser():
    d = {name: p.default for name, p in inspect.signature(train).parameters.items()}  # what train() applies
    chained = [name for name, m in METHODS.items() if m.chain_length > 1]
    p = ArgumentParser(prog="python -m adapters.train", description=__doc__.split("\n\n")[0],
                       formatter_class=HelpFormatter, epilog="methods (--method):\n" + method_table())
    p.add_argument("--model", default=d["model"], help=f"offline model ({', '.join(models.OFFLINE_MODELS)}), "
                                                       "a transformers directory or a cached hub id")
    # --task, --data, --n-train/val/test, --val-fraction, --max-length: one definition for every command reading a task
    taskspec.add_task_arguments(p, defaults={k: d[k] for k in ("task", "val_fraction", "max_length")})
    p.add_argument("--method", default=d["method"], help="one of the methods below")
    p.add_argument("--rank", type=int, default=d["rank"], help="rank r of each link")
    p.add_argument("--alpha", type=float, default=d["alpha"], help="scale s = alpha / r")
    p.add_argument("--targets", nargs="+", help="module names, dotted suffixes, regexes or all-linear (default: "
                                                "the query and value projections of the model's family)")
    p.add_argument("--chain-length", type=int, help=f"links k of a chained method (default: the method's, "
                   f"{CHAIN_LENGTH} for {', '.join(chained)}; 1 for the others)")
    p.add_argument("--epochs", type=float, default=d["epochs"], help="passes over the training split")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs of the training split)")
    p.add_argument("--lr", type=float, help=f"default {DEFAULT_LR[False]:g} ({DEFAULT_LR[True]:g} for the methods "
                                            f"that train the pretrained weights: "
                                            f"{', '.join(n for n, m in METHODS.items() if m.trains_base)})")
    p.add_argument("--lr-ratio", type=float, help="lr_B / lr_A (default: the method's, "
                   f"{_by_method(lambda m: m.adapter.lr_ratio if m.adapter else 1.0, 1.0)}; 1 for the others)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW's")
    p.add_argument("--warmup", type=float, default=d["warmup"], help="warmup fraction of the run")
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="max gradient norm (0: no clipping)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch size")
    p.add_argument("--head-lr-mult", type=float, help="a new head's lr = this × lr (default: the method's, "
                   f"{_by_method(lambda m: m.head_lr_mult, 1.0)}; 1 for the others and for a pretrained head)")
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   default=d["group_by_length"], help="plain shuffled batches instead of batches of similar length")
    p.add_argument("--eval-every", type=int, help=f"steps between mid-run evaluations (default: {EVALS_PER_RUN} "
                                                  "per run)")
    p.add_argument("--eval-examples", type=int, default=d["eval_examples"],
                   help="validation examples each mid-run evaluation uses (the final one uses every split in full)")
    p.add_argument("--early-stopping", action="store_true",
                   help="stop after --patience evaluations without a lower validation loss (the cap: --max-steps or "
                        "--epochs); a chain converges link by link: each link stops on its own patience or at its "
                        "share of the cap, its best weights go on into the next link, and the last link ends the run")
    p.add_argument("--patience", type=int, default=d["patience"],
                   help="evaluations without an improvement before stopping")
    p.add_argument("--min-delta", type=float, default=d["min_delta"],
                   help="an improvement lowers the best validation loss by more than this")
    p.add_argument("--keep", choices=KEEP, help="weights tested and saved: best (the best validation evaluation's; "
                                                "the default with --early-stopping) or final (the default without)")
    p.add_argument("--seed", type=int, default=d["seed"], help="every random draw: selectors, head, data order, "
                                                               "dropout")
    p.add_argument("--out", default=d["out"], help="the checkpoint directory")
    p.add_argument("--overwrite", action="store_true", default=d["overwrite"],
                   help="replace a non-empty --out directory")
    p.add_argument("--save-trajectory", type=int, default=d["save_trajectory"], metavar="N",
                   help="N snapshots of trained params")
    p.add_argument("--save-every", type=int, help="write resumable state every N steps (to OUT.partial/; "
                                                  "default: never)")
    p.add_argument("--resume", action="store_true", default=d["resume"],
                   help="continue from OUT.partial/ if present")
    p.add_argument("--dropout", type=float, default=d["dropout"],
                   help="LoRA dropout p on the adapter path (PEFT lora_dropout)")
    p.add_argument("--report-to", default=d["report_to"], help="tensorboard, wandb, trackio, all or none: losses, "
                   "lr, validation metric and diagnostics at each evaluation, via accelerate's trackers")
    p.add_argument("--logging-dir", help="where trackers write (default: OUT.logs/)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION,
                   help="autocast for training (default: accelerate's, ACCELERATE_MIXED_PRECISION or no); "
                        "the final evaluation is fp32")
    return p


@cli
def main(argv=None):
    args = parse_args_with_config(_parser(), argv)  # --config FILE.yaml: its keys are flags; flags override it
    stats = train(**args)  # checks every argument before it writes anything
    summary = {k: stats[k] for k in ("n_train", "n_val", "n_test", "train_loss", "val_loss", "test_loss",
                                     "train_metric", "val_metric", "test_metric", "generalization_gap",
                                     "median_step_time_s")}
    k = resolve_chain_length(args["method"], args["chain_length"])  # as train() resolved it
    note = one_link_note(args["method"], k)
    print(json.dumps(dict(out=args["out"], method=args["method"], chain_length=k, **summary,
                          **({"note": note} if note else {}))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
