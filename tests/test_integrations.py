"""adapters.callback: a stock transformers Trainer trains every method, saves our checkpoints, resumes a chain
mid-run, logs a monitor's values (analysis.monitor) to TensorBoard; accelerate trackers; --config FILE.yaml."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Trainer, TrainerCallback, TrainingArguments

import adapters
from adapters import callback, data, models, tracking
from adapters.config import parse_args_with_config
from adapters.errors import AdapterError, ArgumentParser
from adapters.train import train
from analysis import monitor

RANK, STEPS, BATCH, MAX_LENGTH, LR = 4, 9, 8, 32, 1e-2
TASK = dict(n_train=48, n_val=8, n_test=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny BERT with MiniLM's tokenizer and no dropout: no random draw during training, so the Trainer and
    adapters.train see exactly the same computation whatever each does with the global RNG."""
    path = Path(models.tiny_model_dir(tmp_path_factory.mktemp("models") / "bert", "bert"))
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def task():
    return data.load_task(**TASK)


def _model(tiny_dir, method="c3la", chain_length=None, **kw):
    net = models.load_model(tiny_dir, 2, seed=0, **kw)
    chained = adapters.get_method(method).adapter is not None and adapters.get_method(method).adapter.chained
    settings = dict(rank=RANK, alpha=2 * RANK) if adapters.get_method(method).adapter else {}
    return adapters.apply(net, method, chain_length=chain_length or (3 if chained else 1), seed=0, **settings)


def _collate(tokenizer):
    """(text, label) rows -> a batch padded to its longest row, as adapters.train batches classification data."""
    def collate(rows):
        texts, labels = zip(*rows)
        enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor(labels))
    return collate


def _epoch_order(rows, epochs):
    """The rows in adapters.train's order without length grouping (a DataLoader shuffled by the generator seeded
    seed·1_000_003 + epoch, seed 0), epoch after epoch: the Trainer reads them in sequence."""
    loaders = [torch.utils.data.DataLoader(range(len(rows)), batch_size=BATCH, shuffle=True,
                                           generator=torch.Generator().manual_seed(e)) for e in range(epochs)]
    return [rows[i] for loader in loaders for batch in loader for i in batch.tolist()]


def _trainer(tiny_dir, task, out, model=None, *, max_steps=STEPS, attach=None, eval_dataset=None, **args):
    model = model if model is not None else _model(tiny_dir)
    settings = dict(max_steps=max_steps, per_device_train_batch_size=BATCH, learning_rate=LR, warmup_steps=0,
                    lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch",
                    train_sampling_strategy="sequential", remove_unused_columns=False, report_to="none",
                    save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0)
    targs = TrainingArguments(str(out), **{**settings, **args})
    trainer = Trainer(model, targs, train_dataset=_epoch_order(task.train, 2), eval_dataset=eval_dataset,
                      data_collator=_collate(models.load_tokenizer(tiny_dir)),
                      optimizer_cls_and_kwargs=callback.optimizer(targs))
    callback.AdaptersCallback.attach(trainer, **(attach or {}))
    return trainer


def _weights(model):
    return {**{f"{n}.delta": d for n, d in adapters.delta_weights(model).items()},
            **{n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("classifier.")}}


# ------------------------------------------------------------------ (a) c3la in a stock Trainer = adapters.train
def test_trainer_trains_c3la_on_the_three_windows_exactly_as_adapters_train(tiny_dir, task, tmp_path):
    trainer = _trainer(tiny_dir, task, tmp_path / "hf")
    trainer.train()
    ours = _weights(trainer.model)
    for name, dW in adapters.delta_weights(trainer.model).items():
        touched = dW.abs().sum(0) > 0
        assert touched[:3 * RANK].all() and not touched[3 * RANK:].any(), name  # windows 0..r-1, r..2r-1, 2r..3r-1

    train(model=tiny_dir, method="c3la", rank=RANK, alpha=2 * RANK, chain_length=3, max_steps=STEPS, lr=LR,
          warmup=0.0, grad_clip=1.0, batch_size=BATCH, max_length=MAX_LENGTH, seed=0, group_by_length=False,
          out=tmp_path / "ref", progress=False, eval_every=STEPS, **TASK)
    ref = _weights(adapters.load(tmp_path / "ref"))
    assert adapters.read_meta(tmp_path / "ref")["link_boundaries"] == trainer.callback_handler.callbacks[-1].boundaries
    assert ref.keys() == ours.keys()
    # Same seed, data order, schedule (warmup 0: both are lr·(T − s)/T), clipping and AdamW kernel. On this stack the
    # weights come out bit for bit equal; the tolerance (1e-5 relative) allows what is legitimately not fixed
    # between two loops: the order of float reductions (a loss normalised as sum / count instead of a mean, the grad
    # norm's summation order, BLAS threads), whose ~1e-7 roundings 9 Adam steps carry along (the Trainer's default
    # fused AdamW, another kernel, lands 2e-6 relative away). A missed fold or optimizer reset moves them by > 1e-2.
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------ (b) every method: our checkpoint at save
@pytest.mark.parametrize("method", list(adapters.METHODS))
def test_every_method_trains_and_the_trainer_checkpoint_loads_with_the_same_logits(tiny_dir, task, tmp_path, method):
    model = _model(tiny_dir, method, chain_length=2 if adapters.get_method(method).adapter and
                   adapters.get_method(method).adapter.chained else None)
    trainer = _trainer(tiny_dir, task, tmp_path, model, max_steps=2, save_strategy="steps", save_steps=2,
                       learning_rate=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    batch = {k: v for k, v in _collate(models.load_tokenizer(tiny_dir))(task.test).items()
             if k != "labels"}
    with torch.no_grad():
        expected = model.eval()(**batch).logits
        for path in (tmp_path / "checkpoint-2" / "adapters", tmp_path / "adapters"):
            assert adapters.read_meta(path)["method"] == method
            torch.testing.assert_close(adapters.load(path)(**batch).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["c3la", "head"])
def test_a_causal_lm_trainer_checkpoint_is_a_causal_lm_checkpoint(tmp_path, method):
    """The callback's checkpoint of a causal LM records its task type: adapters.load rebuilds a causal LM (with its
    own, pretrained lm_head in the base hash) and gives the trained model's logits."""
    from adapters.tasks import TASK_TYPES
    lm = TASK_TYPES["causal-lm"]
    path = models.tiny_model_dir(tmp_path / "llama", "llama")
    model = models.load_model(path, auto_class=lm.auto_class)
    adapters.apply(model, method, **(dict(rank=RANK, alpha=2 * RANK, chain_length=3) if method == "c3la" else {}))
    tok = models.load_processor(path)
    rows = data.load_task("movie-dialog", n_train=16).train
    targs = TrainingArguments(str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                              remove_unused_columns=False, report_to="none", save_strategy="no", use_cpu=True,
                              disable_tqdm=True)
    trainer = Trainer(model, targs, train_dataset=rows, data_collator=lm.collate(tok, MAX_LENGTH),
                      optimizer_cls_and_kwargs=callback.optimizer(targs))
    callback.AdaptersCallback.attach(trainer)
    trainer.train()
    out = tmp_path / "out" / "adapters"
    assert adapters.read_meta(out)["task_type"] == "causal-lm" and adapters.read_meta(out)["head"] == (
        ["lm_head"] if method == "head" else [])
    batch = {k: v for k, v in lm.encode(tok, rows[:4], MAX_LENGTH).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(adapters.load(out)(**batch).logits, model.eval()(**batch).logits,
                                   rtol=1e-5, atol=1e-6)


def test_links_end_at_optimizer_steps_under_gradient_accumulation_and_bf16_autocast(tiny_dir, task, tmp_path):
    trainer = _trainer(tiny_dir, task, tmp_path, max_steps=3, per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, bf16=True, attach=dict(monitor=monitor.Diagnostics()))
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.callback_handler.callbacks[-1].boundaries == [1, 2]
    for name, layer in adapters.inject.adapted_layers(trainer.model).items():
        touched = layer.delta_weight().abs().sum(0) > 0
        assert layer.link == 2 and touched[:3 * RANK].all() and not touched[3 * RANK:].any(), name
    assert [h["adapters/trained_scalars"] for h in trainer.state.log_history if "adapters/trained_scalars" in h] == \
        [1090, 1602, 1602]
    batch = {k: v for k, v in _collate(models.load_tokenizer(tiny_dir))(task.test).items() if k != "labels"}
    fp32 = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()  # autocast off
    with torch.no_grad():  # the final checkpoint holds the fp32 master weights
        torch.testing.assert_close(adapters.load(tmp_path / "adapters")(**batch).logits, fp32(**batch).logits,
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ (c) LoRA+ groups in the Trainer's optimizer
def test_lora_plus_groups_go_through_the_trainers_own_optimizer_and_scheduler(tiny_dir, task, tmp_path):
    model = _model(tiny_dir, "lora_plus")
    trainer = _trainer(tiny_dir, task, tmp_path, model, max_steps=6, optim="adamw_torch_fused")
    trainer.train()
    inner = trainer.optimizer.optimizer  # accelerate's wrapper around the optimizer create_optimizer built
    assert type(inner) is torch.optim.AdamW and inner.defaults["fused"]  # args.optim's optimizer, not a substitute
    b_ids = {id(layer.B) for layer in adapters.inject.adapted_layers(model).values()}
    a_ids = {id(layer.A) for layer in adapters.inject.adapted_layers(model).values()}
    group_b = next(g for g in inner.param_groups if {id(p) for p in g["params"]} == b_ids)
    group_a = next(g for g in inner.param_groups if {id(p) for p in g["params"]} == a_ids)
    assert group_b["initial_lr"] == pytest.approx(16 * LR) and group_a["initial_lr"] == pytest.approx(LR)
    # After 6 of 6 steps the linear schedule is at 0 for every group; one step earlier it was at 1/6.
    assert group_b["lr"] == group_a["lr"] == 0.0
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged[-1] == pytest.approx(LR / 6)  # the Trainer logs group 0 (A's): it was scaled too


# ------------------------------------------------------------------ (d) diagnostics in TensorBoard
def test_diagnostics_reach_tensorboard_through_report_to(tiny_dir, task, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from bounds.mi import mi_bound

    model = _model(tiny_dir, attn_implementation="eager")  # Lanczos needs double backward: eager attention
    batches = [_collate(models.load_tokenizer(tiny_dir))(task.train[:16])]
    trainer = _trainer(tiny_dir, task, tmp_path, model, max_steps=6, report_to=["tensorboard"], logging_steps=2,
                       eval_strategy="steps", eval_steps=3, eval_dataset=task.val,
                       attach=dict(monitor=monitor.Diagnostics(lanczos_every=2, lanczos_batches=batches,
                                                               lanczos_steps=4)))
    trainer.train()
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layers = list(adapters.inject.adapted_layers(model))
    for kind in ("intruders", "delta_norm", "stable_rank"):
        assert {f"train/adapters/{kind}/{name}" for name in layers} <= tags
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if "/adapters/" in t}
    # logged at the training logs (steps 2, 4, 6) and the evaluation of step 3 (the one of step 6 shares its step);
    # the scalar count grows by one link of B's (4 layers × r·n = 128) at each boundary (steps 2 and 4)
    assert scalars["train/adapters/trained_scalars"] == [(2, 1090), (3, 1090), (4, 1602), (6, 1602)]
    n = len(trainer.train_dataset)
    assert scalars["train/adapters/mi_bound"][-1][1] == pytest.approx(mi_bound(1602, n, 1.0, 32), rel=1e-6)
    assert [s for s, _ in scalars["train/adapters/lambda_max"]] == [2, 4, 6]  # the costly one every 2 steps
    assert all(math.isfinite(v) and v > 0 for _, v in scalars["train/adapters/lambda_max"])
    final = monitor.diagnostics(model, n_examples=n)  # the last logged values are those of the final weights
    assert scalars["train/adapters/intruders_total"][-1] == (6, final["adapters/intruders_total"])
    assert scalars[f"train/adapters/delta_norm/{layers[0]}"][-1][1] == pytest.approx(
        final[f"adapters/delta_norm/{layers[0]}"], rel=1e-6)


def test_accelerate_trackers_log_the_same_diagnostics(tiny_dir, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert tracking.tracker_names("none") == [] and tracking.tracker_names(["tensorboard"]) == ["tensorboard"]
    assert "tensorboard" in tracking.tracker_names("all")
    with pytest.raises(AdapterError, match="unknown --report-to 'tensorbored'"):
        tracking.tracker_names("tensorbored")
    model = _model(tiny_dir)
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True, log_with=tracking.tracker_names("tensorboard"), project_dir=str(tmp_path))
    accelerator.init_trackers("run", config=tracking.tracker_config(dict(method="c3la", targets=None, rank=4)))
    values = monitor.Diagnostics(["intruders", "mi_bound"], n_examples=48)(model, 0)
    tracking.log_scalars(accelerator, values, step=0)
    accelerator.end_training()
    AcceleratorState._reset_state()
    acc = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert set(values) <= set(acc.Tags()["scalars"])
    assert acc.Scalars("adapters/trained_scalars")[0].value == values["adapters/trained_scalars"] == 578


# ------------------------------------------------------------------ (e) resume mid-chain
@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, task, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer = _trainer(tiny_dir, task, out, save_strategy="steps", save_steps=2)
    trainer.train()
    return out, _weights(trainer.model)


@pytest.mark.parametrize("step", [4, 6])  # inside link 2 of 3; right after the second boundary (the fold is saved)
def test_a_trainer_resumed_mid_chain_ends_where_the_uninterrupted_run_ends(tiny_dir, task, tmp_path, uninterrupted,
                                                                          step):
    full, expected = uninterrupted
    meta = adapters.read_meta(full / f"checkpoint-{step}" / "adapters")
    assert [len(links) for links in meta["selectors"].values()] == [1 + sum(b <= step for b in (3, 6))] * 4
    trainer = _trainer(tiny_dir, task, tmp_path, save_strategy="steps", save_steps=2)  # a fresh model, at link 1
    trainer.train(resume_from_checkpoint=str(full / f"checkpoint-{step}"))
    got = _weights(trainer.model)
    for name in expected:  # the same steps from the same state: only the load's float32 round trip in between
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_chain_state_loads_at_any_link_and_a_wrong_link_is_refused(tiny_dir, task, tmp_path):
    model = _model(tiny_dir)
    adapters.next_link(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = callback.resumable(_model(tiny_dir))
    fresh.load_state_dict(state)  # link 1 -> 2 by replay
    assert all(layer.link == 1 for layer in adapters.inject.adapted_layers(fresh).values())
    adapters.next_link(model)
    callback.resumable(model).load_state_dict(state)  # link 3 -> 2: an earlier evaluation's (load_best_model_at_end)
    assert all(layer.link == 1 for layer in adapters.inject.adapted_layers(model).values())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    adapters.next_link(model)
    trainer = _trainer(tiny_dir, task, tmp_path, model)  # a model already at link 3 for a run starting at step 0
    with pytest.raises(AdapterError, match="at link 3 but step 0"):
        trainer.train()


def test_given_link_boundaries_are_used_and_bad_ones_refused(tiny_dir, task, tmp_path):
    trainer = _trainer(tiny_dir, task, tmp_path, max_steps=5, attach=dict(boundaries=[1, 4], save=False))
    folds = []
    trainer.add_callback(type("Record", (TrainerCallback,), {"on_step_end": lambda self, args, state, control, model,
                              **kw: folds.append(next(iter(adapters.inject.adapted_layers(model).values())).link)})())
    trainer.train()
    assert folds == [1, 1, 1, 2, 2]
    for bad in ([4, 1], [1], [0, 2], [2, 5]):
        trainer = _trainer(tiny_dir, task, tmp_path, max_steps=5, attach=dict(boundaries=bad, save=False))
        with pytest.raises(AdapterError, match="boundaries must be 2 increasing steps in 1..4"):
            trainer.train()


# ------------------------------------------------------------------ (f) --config FILE.yaml
def _parser():
    p = ArgumentParser(prog="toy")
    p.add_argument("--method", default="cla", choices=list(adapters.METHODS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float)
    p.add_argument("--targets", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--chain-length", type=int, default=1)
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false")
    p.add_argument("--out", default="ckpt")
    return p


def test_a_config_file_and_the_same_flags_give_the_same_run_and_flags_override_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: c3la\nrank: 8\nlr: 1e-3\nchain-length: 3\ntargets: [query, value]\nseeds: 1\n"
                      "no_group_by_length: true\nout: runs/a\n")
    flags = ["--method", "c3la", "--rank", "8", "--lr", "1e-3", "--chain-length", "3", "--targets", "query", "value",
             "--seeds", "1", "--no-group-by-length", "--out", "runs/a"]
    from_file = parse_args_with_config(_parser(), ["--config", str(config)])
    assert from_file == parse_args_with_config(_parser(), flags) == vars(_parser().parse_args(flags))
    assert from_file["lr"] == 1e-3 and from_file["group_by_length"] is False and from_file["seeds"] == [1]
    over = parse_args_with_config(_parser(), ["--rank", "2", f"--config={config}", "--seeds", "3", "4"])
    assert over == {**from_file, "rank": 2, "seeds": [3, 4]}
    parser = _parser()
    parse_args_with_config(parser, ["--config", str(config)])
    assert parser.parse_args([]).rank == 16  # the parser's own defaults are left as they were
    resolved = tmp_path / "resolved.yaml"  # the resolved config, as a run writes it, is a config file again
    resolved.write_text(yaml.safe_dump(over))
    assert parse_args_with_config(_parser(), ["--config", str(resolved)]) == over


@pytest.mark.parametrize("text, message", [
    ("rank: 8\nwarmpu: 0.1\n", "unknown key 'warmpu'"),
    ("rank: eight\n", "key 'rank': expected int, got 'eight'"),
    ("rank: 2.5\n", "key 'rank': expected int"),
    ("method: nope\n", "key 'method': 'nope' is not one of"),
    ("no-group-by-length: 1\n", "key 'no-group-by-length': expected true or false"),
    ("out: no\n", "key 'out': expected a string, got False"),
    ("- rank\n", "expected a mapping"),
])
def test_a_bad_config_key_is_one_line_naming_the_key(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(AdapterError, match=message) as e:
        parse_args_with_config(_parser(), ["--config", str(config)])
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the CLIs: adapters.train and analysis.study
TRAIN_FLAGS = ["--method", "c3la", "--chain-length", "3", "--rank", "4", "--alpha", "8", "--max-steps", "6",
               "--n-train", "32", "--n-val", "8", "--n-test", "8", "--batch-size", "8", "--max-length", "24"]


def test_adapters_train_config_file_equals_its_flags_and_writes_the_resolved_config(tiny_dir, tmp_path, capsys):
    from adapters.train import main
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_dir, "method": "c3la", "chain-length": 3, "rank": 4, "alpha": 8,
                                      "max_steps": 6, "n_train": 32, "n_val": 8, "n_test": 8, "batch_size": 8,
                                      "max_length": 24, "lr": 0.5}))
    assert main(["--model", tiny_dir, *TRAIN_FLAGS, "--lr", "1e-2", "--out", str(tmp_path / "flags")]) == 0
    assert main(["--config", str(config), "--lr", "1e-2", "--out", str(tmp_path / "file")]) == 0  # the flag wins
    a, b = (tmp_path / d / "adapter_model.safetensors" for d in ("flags", "file"))
    assert a.read_bytes() == b.read_bytes()
    resolved = yaml.safe_load((tmp_path / "file" / "config.yaml").read_text())
    assert resolved["lr"] == 1e-2 and resolved["chain_length"] == 3 and "out" not in resolved  # what it computes
    # The resolved config reruns the run: it holds exactly the settings that shape a run, each a flag of the CLI.
    from adapters.settings import shaping
    from adapters.train import TrainConfig, parser
    assert list(resolved) == list(shaping(TrainConfig()))
    assert set(resolved) <= {a.dest for a in parser()._actions}
    assert main(["--config", str(tmp_path / "file" / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == a.read_bytes()
    capsys.readouterr()
    config.write_text("rnak: 4\n")
    assert main(["--config", str(config)]) == 2 and "unknown key 'rnak'" in capsys.readouterr().err


def test_a_config_yaml_written_before_the_settings_dataclass_still_runs_and_is_written_again_as_it_was(tiny_dir,
                                                                                                      tmp_path):
    """tests/data/config_written_before_settings.yaml is the config.yaml a run wrote before training's settings
    became a dataclass (an early-stopped c3la with dropout; its model was a path on that machine, so --model gives
    the tiny model here). It runs, as the same settings given as flags run, and the run writes it again key for key."""
    from adapters.train import main
    old = Path(__file__).parent / "data" / "config_written_before_settings.yaml"
    values = yaml.safe_load(old.read_text())
    flags = ["--method", "c3la", "--rank", "4", "--alpha", "8", "--chain-length", "3", "--max-steps", "8",
             "--lr", "0.01", "--batch-size", "8", "--max-length", "24", "--seed", "1", "--n-train", "48",
             "--n-val", "16", "--n-test", "16", "--eval-every", "2", "--dropout", "0.1", "--early-stopping",
             "--patience", "1", "--keep", "best"]
    assert main(["--config", str(old), "--model", tiny_dir, "--out", str(tmp_path / "old"), "--no-progress"]) == 0
    assert main([*flags, "--model", tiny_dir, "--out", str(tmp_path / "flags"), "--no-progress"]) == 0
    weights = [(tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("old", "flags")]
    assert weights[0] == weights[1]
    again = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    assert list(again) == list(values) and {**again, "model": values["model"]} == values


def test_adapters_train_reports_to_tensorboard(tiny_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from adapters.train import main
    out = tmp_path / "run"
    assert main(["--model", tiny_dir, *TRAIN_FLAGS, "--eval-every", "2", "--out", str(out),
                 "--report-to", "tensorboard"]) == 0
    acc = EventAccumulator(str(tmp_path / "run.logs" / "run"))  # the run's scalars (hparams go in subfolders)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layers = adapters.read_meta(out)["targets"]
    assert {"train_loss_running", "val_loss", "val_accuracy", "adapters/mi_bound"} <= tags
    assert {f"adapters/intruders/{name}" for name in layers} <= tags
    assert [e.step for e in acc.Scalars("val_loss")] == [2, 4, 6]
    stats = adapters.read_stats(out)
    assert [e.value for e in acc.Scalars("val_loss")] == pytest.approx([h["val_loss"] for h in stats["history"]])
    # The scalars trained so far grow by one link at each boundary (after steps 2 and 4, before that step's log).
    counts = adapters.read_meta(out)["parameters"]
    scalars = [e.value for e in acc.Scalars("adapters/trained_scalars")]
    assert scalars == [counts["total"] - counts["adapter"] / 3, counts["total"], counts["total"]]


def test_study_config_file(tmp_path, monkeypatch):
    from analysis import study
    seen = {}
    monkeypatch.setattr(study, "sweep", lambda **kw: seen.update(kw) or {})
    config = tmp_path / "study.yaml"
    config.write_text("methods: [cla, c3la]\nbudget: tiny\nseeds: [3]\nexecutor: serial\nlr-grid: [0.01]\n")
    assert study.main(["--config", str(config), "--runs", str(tmp_path / "runs"), "--no-report"]) == 0
    assert seen["methods"] == ["cla", "c3la"] and seen["seeds"] == [3] and seen["lr_grid"] == [0.01]
    resolved = yaml.safe_load((tmp_path / "runs" / "config.yaml").read_text())
    assert resolved["budget"] == "tiny" and resolved["runs"] == str(tmp_path / "runs")
    # the resolved config.yaml is a config file again: the same study from it alone
    first = dict(seen)
    seen.clear()
    assert study.main(["--config", str(tmp_path / "runs" / "config.yaml")]) == 0
    assert seen == first
