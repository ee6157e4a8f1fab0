"""Paired runs: the same seed gives every method the same split, head initialisation and data order (recorded as
training_stats' `pairing`), and every run records its per-example test outcomes (example_outcomes)."""
import numpy as np
import pytest
import torch

import adapters
import adapters.train as training
from adapters import data, example_losses, models, pairing, tasks
from adapters.example_losses import example_outcomes
from adapters.train import train

TINY = dict(rank=4, alpha=8, max_steps=2, n_train=24, n_val=8, n_test=8, batch_size=8, max_length=32, progress=False)
DIGESTS = ("split_sha256", "head_init_sha256", "data_order_sha256")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: str(models.tiny_model_dir(root / f, f)) for f in ("bert", "llama")}


def _pairing(tmp_path, model, method, seed, name=None, **kw):
    chained = adapters.get_method(method).chain_length > 1
    stats = train(model=model, method=method, seed=seed, out=tmp_path / (name or f"{method}-{seed}"),
                  **{**TINY, **({"chain_length": 2} if chained else {}), **kw})
    return stats["pairing"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dirs):
    """cla's digests with seed 0: every other method with seed 0 must give the same."""
    return _pairing(tmp_path_factory.mktemp("reference"), tiny_dirs["bert"], "cla", 0)


@pytest.mark.parametrize("method", list(adapters.METHODS))
def test_the_same_seed_gives_every_method_the_same_split_head_and_data_order(tmp_path, tiny_dirs, reference, method):
    same = _pairing(tmp_path, tiny_dirs["bert"], method, 0)
    assert same == reference and same["seed"] == 0
    assert all(isinstance(same[k], str) and len(same[k]) == 64 for k in DIGESTS)
    other = _pairing(tmp_path, tiny_dirs["bert"], method, 1)
    assert other["split_sha256"] == reference["split_sha256"]  # the split never depends on the seed
    assert other["head_init_sha256"] != reference["head_init_sha256"]
    assert other["data_order_sha256"] != reference["data_order_sha256"]


def test_a_causal_lm_has_no_new_head_to_pair(tmp_path, tiny_dirs):
    digests = _pairing(tmp_path, tiny_dirs["llama"], "cla", 0, task="movie-dialog", max_length=24)
    assert digests["head_init_sha256"] is None and digests["data_order_sha256"] and digests["split_sha256"]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_the_recorded_data_order_is_the_order_training_takes(tmp_path, tiny_dirs, monkeypatch, group_by_length):
    taken, recorded = [], []
    loss, order = training._loss, pairing.order_digest  # the originals the spies call

    def spy_loss(accelerator, net, batch, kind):
        taken.append(batch["input_ids"].clone())  # what each training step is given, in order
        return loss(accelerator, net, batch, kind)

    def spy_order(batches):
        recorded.extend([list(b) for b in batches])  # what the digest is of
        return order(recorded)
    monkeypatch.setattr(training, "_loss", spy_loss)
    monkeypatch.setattr(pairing, "order_digest", spy_order)
    settings = {**TINY, "max_steps": 3}  # one epoch: 24 examples in batches of 8
    train(model=tiny_dirs["bert"], method="cla", out=tmp_path / "o", group_by_length=group_by_length, **settings)
    task = data.load_task("movie-reviews", n_train=24, n_val=8, n_test=8)
    collate = tasks.CLASSIFICATION.collate(models.load_processor(tiny_dirs["bert"]), settings["max_length"])
    assert len(recorded) == len(taken) == 3 and sorted(i for b in recorded for i in b) == list(range(24))
    for indices, input_ids in zip(recorded, taken):
        assert torch.equal(collate([task.train[i] for i in indices])["input_ids"], input_ids)


def test_every_run_records_its_per_example_test_outcomes(tmp_path, tiny_dirs):
    out = tmp_path / "c"
    stats = train(model=tiny_dirs["bert"], method="cla", out=out, **TINY)
    test = example_outcomes(out)
    assert set(test) == {"losses", "units", "correct"} and all(v.dtype == np.float64 for v in test.values())
    assert len(test["losses"]) == stats["n_test"] and set(test["correct"].tolist()) <= {0.0, 1.0}
    assert test["correct"].sum() / test["units"].sum() == pytest.approx(stats["test_metric"], abs=1e-12)
    assert (test["losses"] * test["units"]).sum() / test["units"].sum() == pytest.approx(stats["test_loss"], rel=1e-9)
    train_split = example_outcomes(out, "train")
    assert train_split["correct"].sum() / train_split["units"].sum() == pytest.approx(stats["train_metric"])
    # a causal LM counts its correctly predicted completion tokens
    lm = tmp_path / "lm"
    lm_stats = train(model=tiny_dirs["llama"], method="cla", out=lm, task="movie-dialog", **{**TINY, "max_length": 24})
    lm_test = example_outcomes(lm)
    assert lm_test["units"].sum() == lm_stats["test_units"] and (lm_test["correct"] <= lm_test["units"]).all()


def test_example_outcomes_refuses_what_is_not_this_checkpoints_record(tmp_path, tiny_dirs):
    out = tmp_path / "c"
    train(model=tiny_dirs["bert"], method="cla", out=out, **TINY)
    with pytest.raises(adapters.AdapterError, match="has no 'dev' split"):
        example_outcomes(out, "dev")
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # the weights file altered after training
    with pytest.raises(adapters.AdapterError, match="of other weights") as refused:
        example_outcomes(out)
    assert str(out / example_losses.EXAMPLE_LOSSES) in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(adapters.AdapterError, match="no per-example outcomes"):
        example_outcomes(tmp_path / "nowhere")
    (out / example_losses.EXAMPLE_LOSSES).write_bytes(b"not safetensors")
    with pytest.raises(adapters.AdapterError, match="unreadable"):
        example_outcomes(out)


def test_example_outcomes_of_an_older_run_ask_for_retraining(tmp_path, tiny_dirs):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    out = tmp_path / "c"
    train(model=tiny_dirs["bert"], method="cla", out=out, **TINY)
    file = out / example_losses.EXAMPLE_LOSSES
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in load_file(str(file)).items() if not k.endswith(".correct")}, str(file), metadata)
    with pytest.raises(adapters.AdapterError, match="retrain"):
        example_outcomes(out)
    losses, why = example_losses.recorded_losses(out, adapters.read_meta(out)["task"])  # still read as before
    assert losses is not None, why
