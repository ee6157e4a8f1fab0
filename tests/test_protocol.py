"""The study's protocol: a validation split carved from train, each method's lr chosen on it (never on test),
every seed at that lr, runs and diagnostics as Ray tasks on a real local Ray instance."""
import json
import os
import time

import pytest
import torch

import adapters
from adapters import data, models
from adapters.train import train
from analysis import executor, study


# -- the validation split ---------------------------------------------------------------------------

def test_validation_is_carved_from_train_fixed_and_never_test():
    task = data.load_task()
    full_train = len(task.train) + len(task.val)
    assert len(task.val) == -(-full_train * 1 // 10)  # ceil(10 %) of the training split
    texts = [{t for t, _ in rows} for rows in (task.train, task.val, task.test)]
    assert not texts[0] & texts[1] and not texts[1] & texts[2] and not texts[0] & texts[2]
    again = data.load_task(n_train=100, n_val=50, n_test=10)
    assert again.val == task.val[:50] and again.train == task.train[:100] and again.test == task.test[:10]
    none = data.load_task(val_fraction=0.0)
    assert none.val == [] and none.test == task.test and none.train == task.train + task.val
    with pytest.raises(adapters.AdapterError, match="val_fraction"):
        data.load_task(val_fraction=1.0)


def test_a_files_own_validation_split_wins(tmp_path):
    rows = [dict(text=f"t{i}", label=i % 2, split=("validation" if i < 4 else "test" if i < 8 else "train"))
            for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = data.load_task(data=str(path))
    assert sorted(t for t, _ in task.val) == ["t0", "t1", "t2", "t3"] and len(task.train) == 12


def test_length_grouped_batches_pad_less_and_cover_every_example_once():
    lengths = [int(x) for x in torch.randint(5, 50, (500,), generator=torch.Generator().manual_seed(0))]
    batches = data.length_grouped_batches(lengths, 16, torch.Generator().manual_seed(1))
    assert sorted(i for b in batches for i in b) == list(range(500)) and batches.batch_size == 16
    shuffled = torch.randperm(500, generator=torch.Generator().manual_seed(1)).tolist()
    plain = [shuffled[k:k + 16] for k in range(0, 500, 16)]
    padded = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    assert padded(batches) < 0.8 * padded(plain)
    assert batches != data.length_grouped_batches(lengths, 16, torch.Generator().manual_seed(2))  # seeded


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(models.tiny_model_dir(tmp_path_factory.mktemp("model") / "bert", "bert"))


SMALL = dict(rank=4, alpha=8, max_steps=6, n_train=48, n_val=24, n_test=16, batch_size=8, max_length=32,
             eval_every=3, progress=False)


def test_training_records_validation_and_evaluates_it_mid_run(tmp_path, tiny_model):
    stats = train(model=tiny_model, method="cla", out=tmp_path / "c", eval_examples=24, **SMALL)
    assert stats["n_val"] == 24 and stats["val_accuracy"] == stats["val_metric"]
    assert [h["step"] for h in stats["history"]] == [3, 6]
    # the last mid-run evaluation is the validation split itself, with the final weights
    assert stats["history"][-1]["val_loss"] == pytest.approx(stats["val_loss"], rel=1e-6)
    assert "test_loss" not in stats["history"][-1] and "eval_loss" not in stats["history"][-1]
    meta = adapters.read_meta(tmp_path / "c")
    assert meta["task"]["n_val"] == 24 and meta["training"]["head_lr_mult"] == 1.0


def test_head_lr_multiplier_is_applied_and_recorded(tmp_path, tiny_model):
    stats = train(model=tiny_model, method="head", out=tmp_path / "h", lr=1e-3, **SMALL)
    meta = adapters.read_meta(tmp_path / "h")
    assert meta["training"]["head_lr_mult"] == 10.0 and meta["training"]["group_lrs"] == [pytest.approx(1e-2)]
    train(model=tiny_model, method="head", out=tmp_path / "h1", lr=1e-3, head_lr_mult=1.0, **SMALL)
    assert adapters.read_meta(tmp_path / "h1")["training"]["group_lrs"] == [pytest.approx(1e-3)]
    assert stats["val_loss"] != json.loads((tmp_path / "h1" / "training_stats.json").read_text())["val_loss"]


# -- choosing the learning rate ---------------------------------------------------------------------

def _fake_run(runs, method, lr, seed, val_metric, val_loss, test_metric):
    out = study.run_dir(runs, method, seed, lr)
    out.mkdir(parents=True)
    (out / "training_stats.json").write_text(json.dumps(dict(
        metric="accuracy", val_metric=val_metric, val_loss=val_loss, test_metric=test_metric)))


def test_lr_is_chosen_on_validation_never_on_test(tmp_path):
    grid = [1e-3, 3e-3, 1e-2]
    # test would pick 1e-2, validation loss 1e-3, validation accuracy 3e-3 (1e-3 ties on accuracy, loses on loss)
    for lr, vm, vl, tm in ((1e-3, 0.7, 0.50, 0.6), (3e-3, 0.7, 0.40, 0.7), (1e-2, 0.6, 0.45, 0.9)):
        _fake_run(tmp_path, "cla", lr, 0, vm, vl, tm)
    chosen = study.select_lr(tmp_path, "cla", grid, 0, "val_metric")
    assert chosen["lr"] == 3e-3 and chosen["by"] == "val_metric" and not chosen["at_edge"]
    assert chosen["scores"] == {"0.001": 0.7, "0.003": 0.7, "0.01": 0.6}
    assert study.select_lr(tmp_path, "cla", grid, 0, "val_loss")["lr"] == 3e-3
    _fake_run(tmp_path, "lora", 1e-3, 0, 0.9, 0.2, 0.5)
    _fake_run(tmp_path, "lora", 3e-3, 0, 0.8, 0.3, 0.9)
    assert study.select_lr(tmp_path, "lora", [1e-3, 3e-3], 0, "val_metric")["at_edge"]


def test_default_grids_follow_what_each_method_trains():
    kinds = {m: study.trains(m) for m in study.DEFAULT_METHODS}
    assert kinds["fft"] == "full" and kinds["head"] == "head" and kinds["lora"] == kinds["cola"] == "A and B"
    assert kinds["lora_plus"] == "A and B, LoRA+"
    assert {kinds[m] for m in ("asym", "rac", "cla", "rcla", "c3la", "rc3la")} == {"B"}
    assert all(len(g) >= 3 and g == sorted(g) for g in study.LR_GRIDS.values())


# -- the sweep on Ray -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _weights(run):
    from safetensors.torch import load_file
    return load_file(str(run / "adapter_model.safetensors"))


def test_ray_sweep_equals_the_serial_one_and_resumes_without_redoing_runs(tmp_path, tiny_model, local_ray):
    kwargs = dict(methods=["cla", "lora"], seeds=[0, 1], budget="tiny", model=tiny_model, lr_grid=[3e-3, 3e-2],
                  diagnostics=(), progress=False)
    on_ray = study.sweep(runs=tmp_path / "ray", executor="ray", **kwargs)
    serial = study.sweep(runs=tmp_path / "serial", executor="serial", **kwargs)
    selection = json.loads((tmp_path / "ray" / study.SELECTION_FILE).read_text())
    assert selection["executor"]["executor"] == "ray" and selection["executor"]["cpus_per_run"] == 1
    for method in ("cla", "lora"):
        lr = selection["methods"][method]["lr"]
        assert lr in (3e-3, 3e-2) and selection["methods"][method]["grid"] == [3e-3, 3e-2]
        assert [os.path.basename(r) for r in on_ray[method]] == [f"{method}-lr{lr:g}-s{s}" for s in (0, 1)]
        assert selection["methods"][method]["runs"] == [f"{method}-lr{lr:g}-s{s}" for s in (0, 1)]  # relative
        for a, b in zip(on_ray[method], serial[method]):
            wa, wb = _weights(tmp_path / "ray" / os.path.basename(a)), _weights(tmp_path / "serial" / os.path.basename(b))
            for k in wa:
                torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)  # 1 thread per run vs the default
    # two lrs for seed 0 and the chosen lr for seed 1: five runs per method... no more, no fewer
    assert sorted(p.name for p in (tmp_path / "ray").iterdir() if p.is_dir()) == sorted(
        [f"{m}-lr{lr:g}-s0" for m in ("cla", "lora") for lr in (3e-3, 3e-2)]
        + [f"{m}-lr{selection['methods'][m]['lr']:g}-s1" for m in ("cla", "lora")])
    stamps = {p.name: (p / "training_stats.json").stat().st_mtime_ns for p in (tmp_path / "ray").iterdir() if p.is_dir()}
    study.sweep(runs=tmp_path / "ray", executor="ray", **kwargs)  # everything is done: nothing is redone
    assert stamps == {p.name: (p / "training_stats.json").stat().st_mtime_ns
                      for p in (tmp_path / "ray").iterdir() if p.is_dir()}


def _dies_once(marker):
    """A job whose worker process dies the first time (as under the OOM killer), then succeeds."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return os.getpid()


def test_ray_retries_a_job_whose_worker_died(tmp_path, local_ray):
    pool = executor.RayExecutor(cpus_per_run=1)
    assert isinstance(pool.map(_dies_once, [(str(tmp_path / "marker"),)], progress=False)[0], int)
    assert pool.settings()["max_retries"] >= 1


@pytest.mark.parametrize("argv,message", [
    (["--lr-grid", "1e-3", "-1"], "--lr-grid needs positive learning rates"),
    (["--address", "127.0.0.1:9"], "cannot reach a Ray cluster at 127.0.0.1:9"),
    (["--address", "not an address"], "--address must be"),
    (["--executor", "serial", "--address", "auto"], "--address needs the ray executor"),
])
def test_bad_study_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        study.main(["--runs", str(tmp_path / "r"), "--no-report", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert time.monotonic() - start < 30  # an unreachable cluster fails fast


def test_a_runs_directory_of_another_study_is_refused(tmp_path, tiny_model, capsys):
    kwargs = dict(methods=["cla"], budget="tiny", model=tiny_model, lr_grid=[1e-2], diagnostics=(),
                  executor="serial", progress=False)
    study.sweep(runs=tmp_path / "r", **kwargs)
    with pytest.raises(adapters.AdapterError, match="holds a study with other settings .*lr_grids"):
        study.sweep(runs=tmp_path / "r", **{**kwargs, "lr_grid": [1e-3]})


# -- the paper's claims, as the report decides them -------------------------------------------------

def test_claims_use_welch_intervals_and_the_reports_own_aggregates():
    from scipy import stats
    from analysis import report
    acc = {"lora": [0.80, 0.79, 0.81], "cla": [0.70, 0.72, 0.69], "c3la": [0.78, 0.79, 0.80]}
    intr = {"c3la": [5.0, 6.0, 7.0], "cla": [9.0, 8.0, 10.0]}
    table = {m: {"test_metric": report.aggregate(v), "intruders": report.aggregate(intr[m]) if m in intr else None}
             for m, v in acc.items()}
    found = {c["claim"]: c for c in report.claims(table, [])}
    cla = found["cla within 3% test accuracy of lora"]
    welch = stats.ttest_ind(acc["lora"], acc["cla"], equal_var=False).confidence_interval(0.95)
    assert cla["diff"] == pytest.approx(0.0967, abs=1e-4) and not cla["holds"]
    assert cla["ci"] == pytest.approx([welch.low, welch.high])
    assert found["c3la within 3% test accuracy of lora"]["holds"]
    more = found["c3la vs cla: more intruders"]
    assert more["diff"] == pytest.approx(-3.0) and not more["holds"]
    two_seeds = {m: {"test_metric": report.aggregate(v[:2])} for m, v in acc.items()}
    assert all(c["ci"] is None for c in report.claims(two_seeds, []))  # no interval below three seeds
