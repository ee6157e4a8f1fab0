"""Early stopping: the run stops when validation stops improving, tests and saves the best evaluation's weights, and
records how it ended; a chained run trains every link and keeps the best evaluation of its last."""
import json

import pytest

import adapters
from adapters import models
from adapters.evaluate import checkpoint_batches, evaluate
from adapters.taskspec import checkpoint_score
from adapters.stopping import EarlyStopping
from adapters.train import train

SMALL = dict(rank=4, alpha=8, n_train=48, n_val=24, n_test=16, batch_size=8, max_length=32, eval_every=1,
             eval_examples=24, lr=3e-2, progress=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(models.tiny_model_dir(tmp_path_factory.mktemp("model") / "bert", "bert"))


def _val_loss(path):
    """The validation loss of the checkpoint as a fresh load evaluates it (fp32, eval mode, full split)."""
    return evaluate(adapters.load(path), checkpoint_batches(path, "val", batch_size=16), checkpoint_score(path))["loss"]


def test_watcher_counts_evaluations_without_an_improvement():
    import torch
    model = torch.nn.Linear(2, 1)
    stop = EarlyStopping(patience=2, min_delta=0.1)
    assert [stop.update(s, loss, model) for s, loss in enumerate([1.0, 0.95, 0.85, 0.84, 0.83], 1)] == [
        False, False, False, False, True]  # 0.95 is not 0.1 below 1.0; 0.85 is; then two without
    assert stop.best_step == 3 and stop.best_loss == 0.85 and stop.converged()
    still = EarlyStopping(patience=5)
    for s, loss in enumerate([1.0, 0.9, 0.8], 1):
        still.update(s, loss, model)
    assert still.converged() is False  # the last evaluation was the best: still improving at the cap


def test_early_stopping_restores_the_best_weights(tmp_path, tiny_model):
    # min_delta larger than any change: only the first evaluation improves, so the run stops after `patience` more
    stats = train(model=tiny_model, method="cla", out=tmp_path / "c", max_steps=12, early_stopping=True, patience=2,
                  min_delta=10.0, **SMALL)
    assert (stats["best_step"], stats["stopped_at"], stats["steps"], stats["cap_steps"]) == (1, 3, 3, 12)
    assert stats["kept"] == "best" and stats["kept_step"] == 1 and stats["converged"] is True
    best = stats["history"][0]["val_loss"]
    assert stats["history"][-1]["val_loss"] != pytest.approx(best, rel=1e-4)  # the last weights are other weights
    assert stats["val_loss"] == pytest.approx(best, rel=1e-5)  # the recorded evaluation is of the best weights
    assert _val_loss(tmp_path / "c") == pytest.approx(best, rel=1e-5)  # and so is the checkpoint
    final = train(model=tiny_model, method="cla", out=tmp_path / "f", max_steps=12, early_stopping=True, patience=2,
                  min_delta=10.0, keep="final", **SMALL)
    assert final["kept"] == "final" and final["val_loss"] == pytest.approx(final["history"][-1]["val_loss"], rel=1e-5)
    config = (tmp_path / "c" / "config.yaml").read_text()
    assert "early_stopping: true" in config and "keep: best" in config


def test_a_run_at_its_cap_still_improving_is_not_converged(tmp_path, tiny_model):
    stats = train(model=tiny_model, method="cla", out=tmp_path / "c", max_steps=3, early_stopping=True,
                  patience=50, min_delta=0.0, **{**SMALL, "lr": 1e-3})
    losses = [h["val_loss"] for h in stats["history"]]
    assert stats["stopped_at"] == 3 and losses == sorted(losses, reverse=True)  # every evaluation improved
    assert stats["converged"] is False and stats["best_step"] == 3


def test_a_chained_run_trains_every_link_and_keeps_the_best_of_its_last(tmp_path, tiny_model):
    # k = 3 over a cap of 6 steps: links end after steps 2 and 4. Stopping watches the last link only (steps 5, 6):
    # were links 1-2 watched too, the best evaluation (step 1 here, with this large min_delta nothing later counts as
    # better) would keep link 1 alone, c3la's twin cla.
    stats = train(model=tiny_model, method="c3la", chain_length=3, out=tmp_path / "k", max_steps=6,
                  early_stopping=True, patience=1, min_delta=10.0, **SMALL)
    assert stats["best_step"] == 5 and stats["stopped_at"] == 6 and len(stats["history"]) == 6
    meta = adapters.read_meta(tmp_path / "k")
    assert meta["chain_length"] == 3 and meta["link_boundaries"] == [2, 4]
    model = adapters.load(tmp_path / "k")
    for name, layer in adapters.inject.adapted_layers(model).items():
        touched = layer.delta_weight().abs().sum(0) > 0  # c3la's link j trains input columns j·r … j·r + r − 1
        assert touched[:3 * SMALL["rank"]].all(), name
    # the kept weights are step 5's (the last link's best), not the final step's
    best = stats["history"][4]["val_loss"]
    assert stats["history"][-1]["val_loss"] != pytest.approx(best, rel=1e-5)
    assert _val_loss(tmp_path / "k") == pytest.approx(best, rel=1e-5) == stats["val_loss"]


def test_early_stopping_needs_a_validation_split(tmp_path, tiny_model):
    with pytest.raises(adapters.AdapterError, match="need a validation split"):
        train(model=tiny_model, method="cla", out=tmp_path / "x", max_steps=2, early_stopping=True, val_fraction=0.0,
              **{k: v for k, v in SMALL.items() if k != "n_val"})
    with pytest.raises(adapters.AdapterError, match="keep must be one of best, final"):
        train(model=tiny_model, method="cla", out=tmp_path / "y", max_steps=2, keep="worst", **SMALL)
    with pytest.raises(adapters.AdapterError, match="patience must be >= 1"):
        train(model=tiny_model, method="cla", out=tmp_path / "z", max_steps=2, patience=0, **SMALL)


def test_a_resumed_early_stopped_run_equals_the_uninterrupted_one(tmp_path, tiny_model):
    kw = dict(model=tiny_model, method="cla", max_steps=8, early_stopping=True, patience=2, min_delta=0.0,
              save_every=2, **{**SMALL, "lr": 1e-1})
    whole = train(out=tmp_path / "whole", **kw)

    def interrupt(step):
        if step == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(out=tmp_path / "part", on_step=interrupt, **kw)
    resumed = train(out=tmp_path / "part", resume=True, **kw)
    for key in ("best_step", "stopped_at", "converged", "val_loss"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key
    assert json.loads((tmp_path / "part" / "training_stats.json").read_text())["kept"] == "best"
