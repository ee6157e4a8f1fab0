"""Which examples a command evaluates a checkpoint on: the task it records, or the user's (--task / --data).

    class EvaluateConfig(DataChoice): ...                           # --task --data --n-train ... --max-length
    spec, the_task = checkpoint_data(CKPT, **task_options(config))  # refused if the model cannot take those examples

One definition of the data flags for every command that reads a task (adapters.train, adapters.evaluate,
analysis.landscape, analysis.hessian, bounds), so each means the same everywhere.
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import data, tasks
from .checkpoint import read_meta
from .errors import AdapterError
from .settings import AT_LEAST_1, FRACTION, NON_NEGATIVE, setting


MAX_LENGTH = 64  # tokens per example: adapters.train's default, and where a checkpoint records none
# The flags (and train()'s argument names) that say which examples a command reads and how they are cut.
TASK_OPTIONS = ("task", "data_file", "n_train", "n_val", "n_test", "val_fraction", "max_length")
DATA_GROUP = "data (default: the checkpoint's own task)"


TASKS_HELP = ("built-in task: movie-reviews, product-reviews, editorials, tweets (sentiment classification), "
              "movie-dialog (causal LM), fashion-mnist (images)")
DATA_HELP = ("your data: CSV/TSV/JSONL with text,label or prompt,completion columns (optional split), or an "
             "ImageFolder directory")
SIZE_HELP = "use the first N {} examples of the fixed split"
VAL_FRACTION_HELP = "share of the training split held out for validation when the data has none (0: none)"
MAX_LENGTH_HELP = "tokens per example, after truncation"
_OF = " (default: the checkpoint's)"


@dataclass(frozen=True)
class DataChoice:
    """The examples a command on a checkpoint reads (the flags of TASK_OPTIONS): each one left out keeps what the
    checkpoint records (a plain PEFT directory records no task: --task or --data names one, and --data's rows are
    then split as adapters.train splits them). A command's settings dataclass extends it."""
    task: Optional[str] = setting(None, TASKS_HELP + _OF, group=DATA_GROUP)
    data_file: Optional[str] = setting(None, DATA_HELP, flag="--data", group=DATA_GROUP)
    n_train: Optional[int] = setting(None, SIZE_HELP.format("training") + _OF, check=AT_LEAST_1, group=DATA_GROUP)
    n_val: Optional[int] = setting(None, SIZE_HELP.format("validation") + _OF, check=NON_NEGATIVE, group=DATA_GROUP)
    n_test: Optional[int] = setting(None, SIZE_HELP.format("test") + _OF, check=AT_LEAST_1, group=DATA_GROUP)
    val_fraction: Optional[float] = setting(None, f"{VAL_FRACTION_HELP} (default: the checkpoint's, else "
                                            f"{data.VAL_FRACTION})", check=FRACTION, group=DATA_GROUP)
    max_length: Optional[int] = setting(None, f"{MAX_LENGTH_HELP} (default: the checkpoint's, else {MAX_LENGTH})",
                                        check=AT_LEAST_1, group=DATA_GROUP)


def task_options(settings):
    """The TASK_OPTIONS of a settings object (or parsed arguments), as keywords for task_spec / checkpoint_batches."""
    return {k: getattr(settings, k) for k in TASK_OPTIONS}


def task_spec(path, **options):
    """What a command evaluates checkpoint `path` on, as adapters_meta.json's "task" records it (name, data,
    n_train, n_val, n_test, val_fraction, max_length): its recorded task, or the one `options` (TASK_OPTIONS) name
    with --task / --data, each size given replacing the recorded one."""
    return resolve_spec(read_meta(path).get("task") or {}, f"checkpoint {path}", **options)


def resolve_spec(recorded, what, task=None, data_file=None, n_train=None, n_val=None, n_test=None, val_fraction=None,
          max_length=None):
    sizes = {k: v for k, v in dict(n_train=n_train, n_val=n_val, n_test=n_test, val_fraction=val_fraction,
                                   max_length=max_length).items() if v is not None}
    for k, least in (("n_train", 1), ("n_val", 0), ("n_test", 1), ("max_length", 1)):
        if k in sizes and (isinstance(sizes[k], bool) or not isinstance(sizes[k], int) or sizes[k] < least):
            raise AdapterError(f"--{k.replace('_', '-')} must be an integer ≥ {least}, got {sizes[k]!r}")
    if task is not None or data_file is not None:
        if data_file is not None and not Path(data_file).exists():
            raise AdapterError(f"data file not found: {data_file}")
        spec = dict(name=task or data.MOVIE_REVIEWS, data=str(Path(data_file).resolve()) if data_file else None,
                    n_train=None, n_val=None, n_test=None, val_fraction=data.VAL_FRACTION,
                    max_length=recorded.get("max_length", MAX_LENGTH))
    elif recorded:
        spec = dict(recorded)
    else:
        raise AdapterError(f"{what} records no task (a plain PEFT directory): give --task NAME or --data FILE, the "
                           "data to evaluate it on")
    return {**spec, **sizes}


def load_spec(spec):
    """The Task of a task_spec, loaded exactly (same data, same split sizes and fraction)."""
    kwargs = {k: spec[k] for k in ("n_train", "n_val", "n_test", "val_fraction") if spec.get(k) is not None}
    return data.load_task(spec["name"], spec.get("data"), **kwargs)


def checkpoint_data(path, **options):
    """(task_spec with the loaded task's type and sha256, the Task) a checkpoint is evaluated on, refused when its
    examples are not what the model takes (another task type, another number of classes than its head)."""
    meta, spec = read_meta(path), task_spec(path, **options)
    the_task, kind = load_spec(spec), tasks.of_meta(meta)
    if the_task.type != kind.name:
        raise AdapterError(f"{the_task.source} is a {the_task.type} task; checkpoint {path} is a {kind.name} model")
    if kind.new_head and meta.get("num_labels") and len(the_task.labels) != meta["num_labels"]:
        raise AdapterError(f"{the_task.source} has {len(the_task.labels)} classes; the head of checkpoint {path} has "
                           f"{meta['num_labels']}")
    return dict(spec, name=the_task.name, type=the_task.type, sha256=the_task.sha256), the_task


def checkpoint_task(path, **options):
    """The Task of checkpoint_data."""
    return checkpoint_data(path, **options)[1]


def checkpoint_score(path):
    """The score function of the checkpoint's task type (what its loss is)."""
    return tasks.of_meta(read_meta(path)).score


def subset(rows, examples=None, seed=0):
    """The first `examples` rows of a seeded permutation (all rows, in order, when `examples` is None)."""
    if examples is None or examples >= len(rows):
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:examples]
    return [rows[i] for i in order.tolist()]


def examples_arg(text):
    """argparse type for --examples: a positive count, or "all" (None)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
