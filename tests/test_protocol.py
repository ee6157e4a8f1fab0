"""The study's protocol: a validation split carved from train, each method's lr chosen on it (never on test),
every seed at that lr, runs and diagnostics as Ray tasks on a real local Ray instance."""
import json
import os
import time

import numpy as np
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
    kinds = {m: study.trains(m) for m in study.METHOD_SETS["paper"]}
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
    kwargs = dict(methods=["cla", "lora"], seeds=[1, 2], budget="tiny", model=tiny_model, lr_grid=[3e-3, 3e-2],
                  diagnostics=(), progress=False)
    on_ray = study.sweep(runs=tmp_path / "ray", executor="ray", **kwargs)
    serial = study.sweep(runs=tmp_path / "serial", executor="serial", **kwargs)
    selection = json.loads((tmp_path / "ray" / study.SELECTION_FILE).read_text())
    assert selection["executor"]["executor"] == "ray" and selection["executor"]["cpus_per_run"] == 1
    for method in ("cla", "lora"):
        lr = selection["methods"][method]["lr"]
        grid, added = selection["methods"][method]["grid"], selection["methods"][method]["extensions"]
        assert lr in grid and sorted([3e-3, 3e-2] + [e["lr"] for e in added]) == grid  # the grid, extended at edges
        assert [os.path.basename(r) for r in on_ray[method]] == [f"{method}-lr{lr:g}-s{s}" for s in (1, 2)]
        assert selection["methods"][method]["runs"] == [f"{method}-lr{lr:g}-s{s}" for s in (1, 2)]  # relative
        for a, b in zip(on_ray[method], serial[method]):
            wa = _weights(tmp_path / "ray" / os.path.basename(a))
            wb = _weights(tmp_path / "serial" / os.path.basename(b))
            for k in wa:
                torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)  # 1 thread per run vs the default
    # every lr of the (extended) grid for the selection seed 0 and the chosen lr for seeds 1, 2: no more runs, no fewer
    assert sorted(p.name for p in (tmp_path / "ray").iterdir() if p.is_dir()) == sorted(
        [f"{m}-lr{lr:g}-s0" for m in ("cla", "lora") for lr in selection["methods"][m]["grid"]]
        + [f"{m}-lr{selection['methods'][m]['lr']:g}-s{s}" for m in ("cla", "lora") for s in (1, 2)])
    stamps = {p.name: (p / "training_stats.json").stat().st_mtime_ns for p in (tmp_path / "ray").iterdir()
              if p.is_dir()}
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
    assert study.main(["--runs", str(tmp_path / "r"), "--no-report", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert time.monotonic() - start < 30  # an unreachable cluster fails fast


def test_a_runs_directory_of_another_study_is_refused(tmp_path, tiny_model, capsys):
    kwargs = dict(methods=["cla"], budget="tiny", model=tiny_model, lr_grid=[1e-2], diagnostics=(),
                  executor="serial", progress=False)
    study.sweep(runs=tmp_path / "r", **kwargs)
    with pytest.raises(adapters.AdapterError, match="holds a study with other settings .*lr_grids"):
        study.sweep(runs=tmp_path / "r", **{**kwargs, "lr_grid": [1e-3]})


# -- the paper's claims, as the report decides them -------------------------------------------------

def _record(method, seed, acc, *, intruders=None, converged=True, steps=100, pairing=None, outcomes=None):
    """A final run's record as analysis.records.collect makes it, with only what the claims read."""
    stats = dict(test_metric=acc, generalization_gap=0.1, stopped_at=steps, best_link=1,
                 pairing=pairing or dict(split_sha256="split", head_init_sha256=f"head{seed}",
                                         data_order_sha256=f"order{seed}", seed=seed))
    return dict(path=f"runs/{method}-s{seed}", method=method, seed=seed, stats=stats, converged=converged,
                outcomes=outcomes, intruders={"mean_intruders": intruders} if intruders is not None else None,
                bounds={"mi_bound": 1.0}, landscape=None, hessian=None, landscape_trainable=None,
                hessian_trainable=None)


ACC = {"lora": [0.80, 0.79, 0.81], "asym": [0.78, 0.80, 0.79], "cla": [0.70, 0.695, 0.705],
       "rac": [0.795, 0.80, 0.805], "c3la": [0.792, 0.80, 0.81]}


def _records(acc=ACC, intruders=None, **kw):
    intruders = intruders or {}
    return [_record(m, s, v, intruders=intruders.get(m, [None] * 3)[i], **kw)
            for m, values in acc.items() for i, (s, v) in enumerate(zip((1, 2, 3), values))]


def test_claims_are_paired_by_seed_and_decided_within_their_family_on_holm():
    from scipy import stats as sp
    from analysis import claims
    from bounds import stats
    found = {c["claim"]: c for c in claims.claims(_records(intruders={"c3la": [5.0, 6.0, 7.0],
                                                                        "cla": [9.0, 10.1, 10.9]}))}
    # the paper's pairs: cla with its parameter-matched asym and with lora; c3la with rac and with lora
    accuracy = [c for c in found.values() if c["family"] == "accuracy"]
    assert sorted(c["claim"] for c in accuracy) == sorted(
        f"{m} within 3 points of {b} (test accuracy)" for m, b in
        (("cla", "asym"), ("cla", "lora"), ("c3la", "rac"), ("c3la", "lora")))
    cla = found["cla within 3 points of lora (test accuracy)"]
    assert (cla["first"], cla["second"], cla["seeds"]) == ("cla", "lora", [1, 2, 3])
    assert cla["diff"] == pytest.approx(np.mean(ACC["cla"]) - np.mean(ACC["lora"]))  # negative: cla is below lora
    paired90 = sp.ttest_rel(ACC["cla"], ACC["lora"]).confidence_interval(0.90)
    assert cla["ci"] == pytest.approx([paired90.low, paired90.high])  # paired by seed, not Welch
    assert cla["p_noninferior"] == pytest.approx(
        sp.ttest_rel(np.add(ACC["cla"], 0.03), ACC["lora"], alternative="greater").pvalue)
    # Holm within the accuracy family, on each of its p's; every verdict from the adjusted ones
    for key in ("p_noninferior", "p_equivalent", "p_worse"):
        assert [c[f"{key}_holm"] for c in accuracy] == pytest.approx(stats.holm([c[key] for c in accuracy]))
    assert cla["p"] == cla["p_noninferior"] and cla["family_size"] == 4
    assert cla["verdict"] == "worse by more than the margin" and cla["p_worse_holm"] < 0.05
    assert found["c3la within 3 points of rac (test accuracy)"]["verdict"] in ("equivalent", "non-inferior")
    more = found["c3la vs cla: more intruders"]
    assert more["family"] == "direction" and more["diff"] == pytest.approx(-4.0)
    assert more["p"] == pytest.approx(sp.ttest_rel([5.0, 6.0, 7.0], [9.0, 10.1, 10.9]).pvalue)
    assert more["verdict"] == "fails" and more["lengths"]["c3la"]["steps"] == [100, 100, 100]
    assert {c["family"] for c in found.values()} == {"accuracy", "direction"}
    two_seeds = [r for r in _records() if r["seed"] != 3]
    assert {c["verdict"] for c in claims.claims(two_seeds)} == {"undecided"}  # no interval below three seeds


def test_a_raw_p_below_alpha_is_undecided_when_holm_says_so():
    from analysis import claims
    # cla vs asym alone is non-inferior at its raw p (0.02 < 0.05); beside three other claims Holm multiplies it
    acc = {"asym": [0.80, 0.78, 0.82], "cla": [0.797, 0.769, 0.825], "lora": [0.95, 0.90, 0.99],
           "rac": [0.80, 0.70, 0.90], "c3la": [0.80, 0.71, 0.88]}
    found = {c["claim"]: c for c in claims.claims(_records(acc))}
    c = found["cla within 3 points of asym (test accuracy)"]
    assert c["p_noninferior"] < 0.05 <= c["p_holm"] and c["verdict"] == "undecided"


def test_runs_of_one_seed_that_do_not_share_their_data_order_are_not_paired():
    from analysis import claims
    records = _records()
    records[0]["stats"]["pairing"]["data_order_sha256"] = "another order"  # lora, seed 1
    with pytest.raises(adapters.AdapterError, match="seed 1: .* differ in data_order_sha256"):
        claims.claims(records)


def test_per_example_outcomes_add_the_test_sets_error_to_the_interval():
    from analysis import claims
    rng = np.random.default_rng(0)
    hard = rng.random(200) < 0.25  # the same hard examples for every method and seed

    def outcomes(acc, seed):
        correct = (~hard & (np.random.default_rng(seed).random(200) < acc / 0.75)).astype(float)
        return dict(correct=correct, losses=np.zeros(200), units=np.ones(200))
    records = []
    for m, values in ACC.items():
        for s, v in zip((1, 2, 3), values):
            r = _record(m, s, 0.0, outcomes=outcomes(v, s * 7 + len(m)))
            r["stats"]["test_metric"] = float(r["outcomes"]["correct"].mean())
            records.append(r)
    c = next(c for c in claims.claims(records, n_boot=500) if c["claim"].startswith("cla within 3 points of lora"))
    assert c["examples_paired"] and c["n_examples"] == 200 and c["se_examples"] > 0
    assert c["se"] ** 2 == pytest.approx(c["se_seeds"] ** 2 + c["se_examples"] ** 2)
    seeds_only = claims.claims([dict(r, outcomes=None) for r in records], n_boot=500)
    c0 = next(c for c in seeds_only if c["claim"].startswith("cla within 3 points of lora"))
    # more error (the test set's), though not always a wider interval: the example part adds degrees of freedom
    assert c0["se"] == pytest.approx(c["se_seeds"]) and c0["se"] < c["se"] and not c0["examples_paired"]


def test_the_selection_seed_is_never_a_final_seed(tmp_path, capsys):
    assert study.main(["--runs", str(tmp_path / "r"), "--budget", "tiny", "--methods", "cla", "--no-report",
                       "--select-seed", "1", "--seeds", "1", "2"]) == 2
    assert "--select-seed 1 is one of --seeds" in capsys.readouterr().err
    assert study.BUDGETS["default"]["select_seed"] not in study.BUDGETS["default"]["seeds"]
    assert study.expand_methods(["central"]) == study.DEFAULT_METHODS
    assert len(study.expand_methods(["paper", "lora"])) == 11


# -- an lr search that contains its optimum ----------------------------------------------------------

def _peaked_training(optimum):
    """A stand-in for training: validation accuracy peaks at lr = optimum (log scale), written as a run would."""
    import math

    def fake(runs, method, lr, seed, common):
        out = study.run_dir(runs, method, seed, lr)
        out.mkdir(parents=True, exist_ok=True)
        score = 0.9 - 0.1 * math.log10(lr / optimum) ** 2
        (out / "training_stats.json").write_text(json.dumps(dict(
            metric="accuracy", val_metric=score, val_loss=1 - score, test_metric=0.5)))
        return str(out), None  # as _train_job: the run, and why it was trained again (never here)
    return fake


def test_grid_steps_follow_the_grids_own_factor():
    assert study.grid_step([1e-3, 3e-3, 1e-2], "up") == pytest.approx(0.033)
    assert study.grid_step([1e-3, 3e-3, 1e-2], "down") == pytest.approx(3.3e-4)
    assert study.grid_step([2e-5, 5e-5, 1e-4], "up") == pytest.approx(2e-4)


@pytest.mark.parametrize("optimum,chosen,added", [
    (0.1, 0.11, [0.033, 0.11, 0.37]),   # beyond the top: three steps up, the choice is interior
    (1e-4, 1.1e-4, [3.3e-4, 1.1e-4, 3.7e-5]),  # below the bottom
    (3e-3, 3e-3, []),                   # inside: nothing added
])
def test_a_choice_at_the_edge_extends_the_grid_until_it_is_interior(tmp_path, monkeypatch, optimum, chosen, added):
    monkeypatch.setattr(study, "_train_job", _peaked_training(optimum))
    pool = executor.SerialExecutor()
    common = dict(model="m")
    sel = study.search(pool, tmp_path, ["cla"], {"cla": [1e-3, 3e-3, 1e-2]}, 0, common, "val_metric",
                       progress=False)["cla"]
    assert sel["lr"] == pytest.approx(chosen) and not sel["at_edge"] and sel["bound_reached"] is None
    assert [e["lr"] for e in sel["extensions"]] == pytest.approx(added)
    assert sel["grid"] == sorted(sel["grid"]) and len(sel["grid"]) == 3 + len(added)
    assert sel["bound"]["max_extensions_per_side"] == study.MAX_EXTENSIONS


def test_the_grid_extension_stops_at_its_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "_train_job", _peaked_training(10.0))
    sel = study.search(executor.SerialExecutor(), tmp_path, ["cla"], {"cla": [1e-3, 3e-3, 1e-2]}, 0, {},
                       "val_metric", max_extensions=2, progress=False)["cla"]
    assert [e["lr"] for e in sel["extensions"]] == pytest.approx([0.033, 0.11])  # two steps, no third
    assert sel["lr"] == pytest.approx(0.11) and sel["at_edge"] and sel["bound_reached"] == "2 extensions up"
    capped = study.search(executor.SerialExecutor(), tmp_path / "b", ["cla"], {"cla": [0.1, 0.3, 0.9]}, 0, {},
                          "val_metric", progress=False)["cla"]
    assert capped["extensions"] == [] and "outside [1e-06, 1]" in capped["bound_reached"]  # 2.7 > the lr bound


def test_the_sweep_records_its_extensions_in_lr_selection(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "_train_job", _peaked_training(0.05))
    study.sweep(runs=tmp_path, methods=["cla"], seeds=[1, 2], budget="tiny", lr_grid=[1e-3, 3e-3, 1e-2],
                diagnostics=(), executor="serial", progress=False)
    saved = json.loads((tmp_path / study.SELECTION_FILE).read_text())["methods"]["cla"]
    assert saved["lr"] == pytest.approx(0.033)
    assert [e["lr"] for e in saved["extensions"]] == pytest.approx([0.033, 0.11])
    assert saved["runs"] == ["cla-lr0.033-s1", "cla-lr0.033-s2"]


# -- user data and errors inside Ray ----------------------------------------------------------------

def test_the_budgets_sizes_are_upper_limits_stated_once(tmp_path, tiny_model, capsys):
    rows = [dict(text=f"review number {i} {'good' if i % 2 else 'bad'}", label=i % 2) for i in range(60)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    study.sweep(runs=tmp_path / "r", methods=["cla"], budget="tiny", model=tiny_model, data_file=str(path),
                lr_grid=[1e-2], diagnostics=(), executor="serial", progress=False, n_test=500)
    err = capsys.readouterr().err
    assert err.count("data: mine has") == 1 and "are upper limits" in err
    meta = adapters.read_meta(tmp_path / "r" / "cla-lr0.01-s0")
    assert meta["task"]["n_test"] < 500  # what the data has


def _fails_with(message):
    raise adapters.AdapterError(message)


def _crashes():
    return 1 / 0


def test_an_error_inside_a_ray_task_is_one_line(tmp_path, local_ray, capsys):
    pool = executor.RayExecutor(cpus_per_run=1)
    with pytest.raises(adapters.AdapterError) as e:
        pool.map(_fails_with, [("n_val=500 is out of range: mine has 240 val examples",)], progress=False)
    assert str(e.value) == "n_val=500 is out of range: mine has 240 val examples"
    with pytest.raises(adapters.AdapterError) as e:
        pool.map(_crashes, [()], desc="train", progress=False)
    text = str(e.value)
    assert "\n" not in text and "\x1b" not in text and "ZeroDivisionError: division by zero" in text
    assert "Traceback" not in text


def test_a_study_error_inside_ray_reaches_the_user_as_one_line(tmp_path, tiny_model, local_ray, capsys,
                                                               monkeypatch):
    # an error only a run finds (its arguments passed every check before Ray started)
    monkeypatch.setattr(study, "_train_job", lambda *a: _fails_with("cannot hold chain_length=3 links"))
    assert study.main(["--runs", str(tmp_path / "r"), "--budget", "tiny", "--methods", "cla", "--lr-grid", "1e-2",
                       "--model", tiny_model, "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: cannot hold chain_length=3 links"
    assert not any("Traceback" in line or "\x1b" in line for line in err)


@pytest.mark.parametrize("argv,message", [
    (["--n-val", "0"], "n_val must be >= 1"),
    (["--patience", "0"], "patience must be >= 1"),
    (["--data", "nowhere.csv"], "nowhere.csv"),
])
def test_argument_and_data_problems_are_found_before_ray_starts(tmp_path, capsys, monkeypatch, argv, message):
    import analysis.executor
    monkeypatch.setattr(analysis.executor, "RayExecutor", None)  # starting Ray would fail the test
    assert study.main(["--runs", str(tmp_path / "r"), "--budget", "tiny", "--methods", "cla", "--no-report",
                       *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


class _Simulated(executor._Executor):
    """The executors' job loop on a virtual clock: `slots` jobs at a time, each taking one time unit; records every
    job's (method, lr, seed, start)."""

    def __init__(self, slots):
        self.slots, self.now, self.starts = slots, 0, []

    def _slots(self):
        return self.slots

    def _submit(self, fn, args):
        self.starts.append((args.method, args.lr, args.seed, self.now))
        return (self.now + 1, len(self.starts))  # (finish time, a unique handle)

    def _next_done(self, running, desc):
        handle = min(running)  # the first to finish (ties: the first submitted)
        self.now = handle[0]
        _, fn, args = running[handle]
        return handle, fn(*args)


def test_the_study_has_no_barrier_a_methods_follow_ups_start_when_its_own_runs_are_done(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "_train_job", _peaked_training(0.05))  # cla's optimum beyond its grid
    pool = _Simulated(slots=2)
    monkeypatch.setattr(executor.time, "perf_counter", lambda: pool.now)  # the executor's clock: the virtual one
    grids = {"cla": [1e-3, 3e-3, 1e-2], "lora": [1e-2, 3e-2, 1e-1]}  # lora's optimum 0.05: inside its grid
    sel = study.search(pool, tmp_path, ["cla", "lora"], grids, 0, {}, "val_metric", progress=False,
                       final=lambda m, lr: [(study.SEED, study._train_job, study.Run(tmp_path, m, lr, s, {}))
                                            for s in (1, 2)])
    assert sel["lora"]["lr"] == 3e-2 and sel["cla"]["lr"] == pytest.approx(0.033)
    start = {(m, round(lr, 6), s): t for m, lr, s, t in pool.starts}
    assert len(start) == 3 + 2 + 3 + 2 + 2  # cla: grid, 2 extensions, 2 seeds; lora: grid, 2 seeds
    # cla's grid ends at t = 2: its extension goes first, before lora's queued grid runs; the next one at once
    assert start[("cla", 0.033, 0)] == 2 and start[("cla", 0.11, 0)] == 3
    # no slot idles while a job is waiting: 12 jobs on 2 slots end at t = 6 (rounds with a barrier: t = 7)
    assert max(start.values()) + 1 == 6
    assert pool.busy() == dict(jobs=12, slots=2, wall_s=6, busy_s=12, utilisation=1.0)  # what the study records


@pytest.mark.parametrize("optimum,extensions", [(3e-3, 0), (0.05, 2)])
def test_the_progress_bar_knows_its_total_from_the_start(tmp_path, monkeypatch, optimum, extensions):
    totals = []

    class Bar:  # tqdm's part the executor uses, recording the total it shows at the start and at each step
        def __init__(self, total, **kw):
            self.total, self.n, self.postfix = total, 0, None
            totals.append(total)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def update(self, k):
            self.n += k
            totals.append(self.total)

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text
    monkeypatch.setattr(executor, "tqdm", Bar)
    monkeypatch.setattr(study, "_train_job", _peaked_training(optimum))
    monkeypatch.setattr(study, "_reference_job", lambda *a: None)
    study.sweep(runs=tmp_path, methods=["cla"], seeds=[1, 2], budget="tiny", lr_grid=[1e-3, 3e-3, 1e-2],
                diagnostics=(), executor="serial", progress=True)
    # 3 grid runs + 2 final runs + the reference, known before the first job; an extension adds itself
    assert totals[0] == 6 and totals[-1] == 6 + extensions and totals == sorted(totals)


def test_the_eta_comes_from_each_kinds_measured_times():
    plan = executor.Plan({"train:cla": 4, "diagnose:spectral": 2})
    timeline = [("train:cla", 0.0, 10.0, 2), ("train:cla", 0.0, 30.0, 2)]
    plan.done("train:cla"), plan.done("train:cla")
    # 2 cla runs left at their mean 20 s; the diagnostics not yet timed: a lower bound, saying so
    assert plan.eta(timeline, slots=2) == (pytest.approx(2 * 20 / 2), ["diagnose"])
    timeline.append(("diagnose:spectral", 30.0, 32.0, 2))
    plan.done("diagnose:spectral")
    assert plan.eta(timeline, slots=2) == (pytest.approx((2 * 20 + 1 * 2) / 2), [])
    plan.add("train:lora")  # a kind not timed yet, of a family that is: the family's mean
    assert plan.eta(timeline, slots=2) == (pytest.approx((3 * 20 + 1 * 2) / 2), [])
    assert executor.Plan({"x": 1}).eta([], 1) is None
