"""transformers' EarlyStoppingCallback beside adapters.callback.AdaptersCallback: the Trainer stops, loads the best
evaluation's weights (for a chain, from an earlier link too), and our checkpoint holds exactly those weights."""
import pytest
import torch
from transformers import EarlyStoppingCallback

import adapters
from tests.test_integrations import _model, _trainer, task, tiny_dir  # noqa: F401 (fixtures)

STEPS = 9


def _stopping_trainer(tiny_dir, task, out, method, lr):
    trainer = _trainer(tiny_dir, task, out, _model(tiny_dir, method), max_steps=STEPS, eval_dataset=task.val,
                       eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, learning_rate=lr,
                       load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=2))
    return trainer


def _eval_losses(trainer):
    return {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}


@pytest.mark.parametrize("method,lr", [("cla", 0.3), ("c3la", 0.3)])
def test_early_stopping_callback_stops_and_our_checkpoint_is_the_best_evaluation(tiny_dir, task, tmp_path, method, lr):
    trainer = _stopping_trainer(tiny_dir, task, tmp_path, method, lr)
    trainer.train()
    losses = _eval_losses(trainer)
    best_step = min(losses, key=losses.get)
    assert trainer.state.global_step < STEPS  # stopped early
    assert trainer.state.best_metric == pytest.approx(losses[best_step])
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses[best_step], rel=1e-5)  # the best weights
    assert losses[max(losses)] != pytest.approx(losses[best_step], rel=1e-3)  # the last weights were others
    out = tmp_path / "adapters"
    loaded, trained = adapters.delta_weights(adapters.load(out)), adapters.delta_weights(trainer.model)
    assert loaded.keys() == trained.keys()
    for name in loaded:  # our checkpoint holds exactly those weights
        torch.testing.assert_close(loaded[name], trained[name], rtol=1e-5, atol=1e-7)
    meta = adapters.read_meta(out)
    boundaries = trainer.callback_handler.callbacks[-2].boundaries if method == "c3la" else []
    assert meta["link_boundaries"] == [b for b in boundaries if b <= best_step]
