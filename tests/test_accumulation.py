"""Gradient accumulation in a stock Trainer with adapters.callback attached (issue 21, item 8).

transformers 5.x lets a model whose forward takes **kwargs scale its own loss for accumulation; BERT's classifier
does not, so without the task's loss its logged loss and clipped gradient norm come out × the accumulation steps.
With the callback attached, 2 micro-batches of 4 give the loss, gradient norm and gradients of 1 batch of 8.
"""
import json
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import adapters
from adapters import callback, data, models, tasks
from adapters.errors import AdapterError

FAMILIES = {"classifier": ("bert", "movie-reviews"), "causal-lm": ("llama", "movie-dialog")}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny models without dropout: micro-batches and the whole batch then compute the same function."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family in ("bert", "llama"):
        path = Path(models.tiny_model_dir(root / family, family))
        config = json.loads((path / "config.json").read_text())
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attention_dropout=0.0)
        (path / "config.json").write_text(json.dumps(config))
        dirs[family] = str(path)
    return dirs


class Gradients(TrainerCallback):
    """The trained tensors' gradients as the optimizer gets them (clipping is off: max_grad_norm=1e9)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _step(tmp_path, tiny_dirs, family, accumulation, attach=True, **trainer_kwargs):
    """One optimizer step over the same 8 examples: (logged loss, logged grad norm, gradients)."""
    model_family, task_name = FAMILIES[family]
    task = data.load_task(task_name, n_train=8, n_val=1, n_test=4)
    kind = tasks.TASK_TYPES["classification" if family == "classifier" else "causal-lm"]
    net = models.load_model(tiny_dirs[model_family], 2, seed=0, auto_class=kind.auto_class)
    adapters.apply(net, "lora", rank=4, alpha=8, seed=0, head=kind.trained_head(net, adapters.get_method("lora")))
    args = TrainingArguments(str(tmp_path / f"{family}-{accumulation}"), max_steps=1,
                             per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation,
                             learning_rate=1e-3, max_grad_norm=1e9, logging_steps=1, report_to="none",
                             save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, remove_unused_columns=False,
                             train_sampling_strategy="sequential")
    trainer = Trainer(net, args, train_dataset=task.train, data_collator=kind.collate(models.load_processor(
        tiny_dirs[model_family]), 32), **trainer_kwargs)
    grads = Gradients()
    trainer.add_callback(grads)
    if attach:
        callback.AdaptersCallback.attach(trainer, save=False)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    return log["loss"], log["grad_norm"], grads.grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_accumulated_micro_batches_give_the_loss_and_gradients_of_the_whole_batch(tmp_path, tiny_dirs, family):
    loss, norm, grads = _step(tmp_path, tiny_dirs, family, 1)
    loss2, norm2, grads2 = _step(tmp_path, tiny_dirs, family, 2)
    if family == "causal-lm":  # the two halves score different numbers of tokens: a mean of means would differ
        task = data.load_task("movie-dialog", n_train=8, n_val=1, n_test=4)
        collate = tasks.TASK_TYPES["causal-lm"].collate(models.load_processor(tiny_dirs["llama"]), 32)
        halves = [(collate(task.train[i:i + 4])["labels"][:, 1:] != -100).sum().item() for i in (0, 4)]
        assert halves[0] != halves[1]
    assert loss2 == pytest.approx(loss, rel=1e-5) and norm2 == pytest.approx(norm, rel=1e-5)
    assert grads.keys() == grads2.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-4, atol=1e-9, msg=name)


def test_the_loss_is_the_task_loss_adapters_train_uses(tmp_path, tiny_dirs):
    from adapters import evaluate
    net = models.load_model(tiny_dirs["bert"], 2, seed=0)
    adapters.apply(net, "cla", rank=4, alpha=8, seed=0)
    args = TrainingArguments(str(tmp_path / "t"), report_to="none", use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(net, args)
    callback.AdaptersCallback.attach(trainer, save=False)
    assert isinstance(trainer.compute_loss_func, callback.TaskLoss)
    task = data.load_task(n_train=8, n_val=1, n_test=4)
    batch = tasks.CLASSIFICATION.encode(models.load_processor(tiny_dirs["bert"]), task.train, 32)
    with torch.no_grad():
        ours = trainer.compute_loss(net.eval(), dict(batch))
        sums, units, _ = evaluate.batch_scores(net, batch)
    assert ours.item() == pytest.approx((sums.sum() / units.sum()).item(), rel=1e-6)


def test_a_trainer_with_its_own_loss_keeps_it(tmp_path, tiny_dirs):
    def mine(outputs, labels, num_items_in_batch=None):
        return outputs.logits.sum()
    net = adapters.apply(models.load_model(tiny_dirs["bert"], 2, seed=0), "cla", rank=4, alpha=8, seed=0)
    args = TrainingArguments(str(tmp_path / "t"), report_to="none", use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(net, args, compute_loss_func=mine)
    callback.AdaptersCallback.attach(trainer, save=False)
    assert trainer.compute_loss_func is mine
    smoothing = Trainer(net, TrainingArguments(str(tmp_path / "s"), report_to="none", use_cpu=True,
                                               label_smoothing_factor=0.1))
    callback.AdaptersCallback.attach(smoothing, save=False)  # its LabelSmoother divides by num_items_in_batch
    assert smoothing.compute_loss_func is None


def test_accumulation_without_attach_is_refused(tmp_path, tiny_dirs):
    with pytest.raises(AdapterError, match="gradient accumulation needs the task's loss .* AdaptersCallback.attach"):
        trainer_kwargs = dict(callbacks=[callback.AdaptersCallback(save=False)])
        _step(tmp_path, tiny_dirs, "classifier", 2, attach=False, **trainer_kwargs)


DDP_STEP = """
import json, sys
from transformers import Trainer, TrainingArguments
import adapters
from adapters import callback, data, models, tasks
model_dir, out = sys.argv[1], sys.argv[2]
task = data.load_task(n_train=8, n_val=1, n_test=4)
net = adapters.apply(models.load_model(model_dir, 2, seed=0), "lora", rank=4, alpha=8, seed=0)
args = TrainingArguments(out, max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, max_grad_norm=1e9,
                         logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                         seed=0, remove_unused_columns=False, train_sampling_strategy="sequential",
                         ddp_broadcast_buffers=False)
trainer = Trainer(net, args, train_dataset=task.train, data_collator=tasks.CLASSIFICATION.collate(
    models.load_processor(model_dir), 32))
callback.AdaptersCallback.attach(trainer, save=False)
trainer.train()
if trainer.is_world_process_zero():
    log = next(h for h in trainer.state.log_history if "loss" in h)
    (__import__("pathlib").Path(out) / "log.json").write_text(json.dumps(log))
# Leave together: a rank exiting while gloo's threads still run can abort ("terminate called without an active
# exception", SIGABRT), which a loaded machine makes likely.
import torch.distributed as dist
dist.barrier()
dist.destroy_process_group()
"""


def test_two_processes_give_the_loss_and_gradient_norm_of_one(tmp_path, tiny_dirs):
    """DDP: each process's share of the batch is scaled by the units of the whole batch (the Trainer's
    average_tokens_across_devices), so 2 processes × 4 examples log what 1 × 8 does (without the task's loss, a
    classifier's would be × 2)."""
    from tests.test_train import _torchrun
    loss, norm, _ = _step(tmp_path, tiny_dirs, "classifier", 1)
    (tmp_path / "step.py").write_text(DDP_STEP)
    run = _torchrun([str(tmp_path / "step.py"), tiny_dirs["bert"], str(tmp_path / "ddp")], Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    log = json.loads((tmp_path / "ddp" / "log.json").read_text())
    assert log["loss"] == pytest.approx(loss, rel=1e-5) and log["grad_norm"] == pytest.approx(norm, rel=1e-5)
