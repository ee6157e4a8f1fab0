"""Early stopping: the run stops when validation stops improving, tests and saves the best evaluation's weights, and
records how it ended; a chain converges link by link and keeps the best evaluation of any link."""
import json

import pytest
import torch
from safetensors.torch import load_file

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


def _chain(tmp_path, tiny_model, name, **kw):
    """A c3la chain of k = 3 links, by default over a cap of 18 steps (each link at most 6), watched link by link."""
    settings = dict(model=tiny_model, method="c3la", chain_length=3, early_stopping=True,
                    **{**SMALL, "max_steps": 18, **kw})
    return train(out=tmp_path / name, **settings), settings


def _link_columns(path):
    """Per adapted layer, whether each link's B (c3la: columns j·r … j·r + r − 1 of the merged B) is nonzero."""
    r = SMALL["rank"]
    return {name: [bool(B[:, j * r:(j + 1) * r].abs().sum() > 0) for j in range(B.shape[1] // r)]
            for name, (B, A) in adapters.lowrank_factors(path).items()}


def test_a_chain_keeps_the_best_evaluation_of_a_later_link(tmp_path, tiny_model):
    # lr 0.1: link 1 gets worse after its first step and stops there (patience 1); link 2, on fresh columns from
    # link 1's best, improves on it by more than min_delta; link 3 does not (its best is not 2.5e-3 below link 2's).
    stats, _ = _chain(tmp_path, tiny_model, "a", patience=1, min_delta=2.5e-3, lr=1e-1)
    links = stats["links"]
    assert [(l["start"], l["end"], l["ended"]) for l in links] == [(0, 2, "patience"), (2, 4, "patience"),
                                                                 (4, 6, "patience")]
    assert stats["best_link"] == 2 and stats["best_step"] == 3 == links[1]["best_step"] and stats["kept_step"] == 3
    best = {h["step"]: h["val_loss"] for h in stats["history"]}[3]
    assert stats["best_val_loss"] == best == links[1]["best_val_loss"]
    assert stats["val_loss"] == pytest.approx(best, rel=1e-5)  # the recorded evaluation is of the best weights
    assert _val_loss(tmp_path / "a") == pytest.approx(best, rel=1e-5)  # and so is the checkpoint
    meta = adapters.read_meta(tmp_path / "a")
    assert meta["best_link"] == 2 and meta["link_boundaries"] == [2, 4] and meta["chain_length"] == 3
    # the kept weights hold links 1 and 2; link 3, trained and dropped with the weights after step 3, is B = 0
    assert all(trained == [True, True, False] for trained in _link_columns(tmp_path / "a").values())


def test_a_chain_whose_later_links_do_not_help_keeps_link_one(tmp_path, tiny_model):
    # min_delta larger than any change: each link improves on its own best once (its first evaluation), then stops
    # after `patience` more, long before its cap of 6 steps; nothing after step 1 beats the run's best.
    stats, _ = _chain(tmp_path, tiny_model, "b", patience=2, min_delta=10.0, save_trajectory=18)
    assert [(l["link"], l["start"], l["end"], l["steps"], l["best_step"], l["ended"]) for l in stats["links"]] == [
        (1, 0, 3, 3, 1, "patience"), (2, 3, 6, 3, 4, "patience"), (3, 6, 9, 3, 7, "patience")]
    assert (stats["best_step"], stats["best_link"], stats["stopped_at"], stats["cap_steps"]) == (1, 1, 9, 18)
    assert stats["converged"] is True
    meta = adapters.read_meta(tmp_path / "b")
    assert meta["best_link"] == 1 and meta["link_boundaries"] == [3, 6]  # the folds made, not the shares (6, 12)
    assert _val_loss(tmp_path / "b") == pytest.approx(stats["history"][0]["val_loss"], rel=1e-5)
    # ΔW is link 1's update at step 1 alone: links 2 and 3 have B = 0 ...
    assert all(trained == [True, False, False] for trained in _link_columns(tmp_path / "b").values())
    step = {s: load_file(str(tmp_path / "b" / "trajectory" / f"step_{s:08d}.safetensors")) for s in (1, 3)}
    for name, (B, A) in adapters.lowrank_factors(tmp_path / "b").items():
        torch.testing.assert_close(B, step[1][f"{name}.B"], rtol=1e-6, atol=1e-7)  # ... and link 1's B is step 1's
    # link 1 stopped after step 3 and went on into link 2 with its best weights (step 1's, head included)
    assert step[3].keys() == step[1].keys() and all(torch.equal(step[3][k], step[1][k]) for k in step[1])


def test_a_link_stops_on_its_own_patience_not_at_its_cap(tmp_path, tiny_model):
    # patience 1, evaluations every 2 steps from each link's start: every link ends after its second evaluation
    # (its first one that does not improve), at 4 steps, not at its cap of 8.
    stats, _ = _chain(tmp_path, tiny_model, "c", patience=1, min_delta=10.0, max_steps=24, eval_every=2)
    assert [(l["start"], l["end"], l["ended"]) for l in stats["links"]] == [(0, 4, "patience"), (4, 8, "patience"),
                                                                          (8, 12, "patience")]
    assert [h["step"] for h in stats["history"]] == [2, 4, 6, 8, 10, 12] and stats["stopped_at"] == 12
    assert adapters.read_meta(tmp_path / "c")["link_boundaries"] == [4, 8]


def test_a_links_evaluations_count_from_its_start_and_come_at_its_end(tmp_path, tiny_model):
    # Caps of 5 steps (15 / 3), evaluations every 2 steps: each link is evaluated 2 and 4 steps after its start and
    # at its cap; no link stops early (patience 100), so the links end at the shares.
    stats, _ = _chain(tmp_path, tiny_model, "e", patience=100, max_steps=15, eval_every=2, lr=1e-3)
    assert [h["step"] for h in stats["history"]] == [2, 4, 5, 7, 9, 10, 12, 14, 15]
    assert [(l["start"], l["end"], l["ended"]) for l in stats["links"]] == [(0, 5, "cap"), (5, 10, "cap"),
                                                                          (10, 15, "cap")]
    assert adapters.read_meta(tmp_path / "e")["link_boundaries"] == [5, 10]


def test_without_early_stopping_a_chain_keeps_the_best_evaluation_of_any_link(tmp_path, tiny_model):
    # Links end at the fixed shares (after steps 2 and 4) and nothing stops; keep="best" looks at every evaluation.
    stats = train(model=tiny_model, method="c3la", chain_length=3, out=tmp_path / "k", max_steps=6, keep="best",
                  min_delta=10.0, **SMALL)
    assert [(l["end"], l["ended"]) for l in stats["links"]] == [(2, "cap"), (4, "cap"), (6, "cap")]
    assert stats["stopped_at"] == 6 and len(stats["history"]) == 6
    assert (stats["best_step"], stats["best_link"], stats["kept_step"]) == (1, 1, 1)  # nothing beats step 1 by 10
    meta = adapters.read_meta(tmp_path / "k")
    assert meta["link_boundaries"] == [2, 4] and meta["best_link"] == 1
    assert _val_loss(tmp_path / "k") == pytest.approx(stats["history"][0]["val_loss"], rel=1e-5) == stats["val_loss"]
    assert all(trained == [True, False, False] for trained in _link_columns(tmp_path / "k").values())


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


def test_a_resumed_link_by_link_chain_equals_the_uninterrupted_one(tmp_path, tiny_model):
    # Links end on patience after steps 5, 8 and 11 (their shares would end them after 8 and 16), the best (step 3)
    # in link 1. The state saved after step 6 is mid link 2: one early fold made (none by the shares), link 2's own
    # best so far (step 6) and the run's best (step 3, link 1) held.
    kw = dict(patience=2, min_delta=1e-3, lr=1e-1, save_every=2, max_steps=24)
    whole, settings = _chain(tmp_path, tiny_model, "whole", **kw)
    assert [(l["end"], l["ended"]) for l in whole["links"]] == [(5, "patience"), (8, "patience"), (11, "patience")]
    assert (whole["best_step"], whole["best_link"]) == (3, 1)

    def interrupt(step):
        if step == 7:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(out=tmp_path / "part", on_step=interrupt, **settings)
    assert torch.load(tmp_path / "part.partial" / "state.pt", weights_only=False)["folds"] == [5]
    resumed = train(out=tmp_path / "part", resume=True, **settings)
    for key in ("best_step", "stopped_at", "best_link", "links", "history", "converged", "val_loss", "test_loss"):
        assert resumed[key] == whole[key], key
    for name in ("adapters_meta.json", "adapter_model.safetensors", "example_losses.safetensors"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
