"""analysis.landscape and analysis.directions: values checked against brute force and loss-landscapes."""
import copy
import importlib.util
import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from adapters.errors import AdapterError
from adapters.io import Journal
from analysis import directions as dirs
from analysis import landscape as ls


class MLP(nn.Module):
    def __init__(self, d=5, h=8, c=3):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, c)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def mlp_and_data(seed=0, n=24, batch=5):
    torch.manual_seed(seed)
    model = MLP().eval()
    X, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    batches = [{"x": X[i:i + batch], "labels": y[i:i + batch]} for i in range(0, n, batch)]
    return model, X, y, batches


def full_loss(model, X, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(X), y))


# ---- directions ----------------------------------------------------------------------------

def test_filter_normalisation_rows_match_weight_rows_and_1d_zeroed():
    model = nn.Sequential(nn.Linear(6, 4), nn.Conv2d(3, 5, 3), nn.LayerNorm(7))
    torch.manual_seed(0)
    weights = [p.detach().uniform_(0.5, 1.5) * torch.sign(torch.randn_like(p)) for p in model.parameters()]
    d = dirs.random_direction(weights, seed=3)
    for w, di in zip(weights, d):
        if w.dim() >= 2:
            rows_w = w.detach().reshape(w.shape[0], -1).norm(dim=1)
            rows_d = di.reshape(di.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(rows_d, rows_w, rtol=1e-5, atol=1e-7)
        else:
            assert torch.count_nonzero(di) == 0  # biases and norms are zeroed by default
    # Kept 1-D tensors are normalised as one filter (whole vector), not element by element.
    d1 = dirs.random_direction(weights, seed=3, include_1d=True)
    for w, di in zip(weights, d1):
        if w.dim() == 1:
            assert abs(float(di.norm()) - float(w.norm())) < 1e-5 * max(1.0, float(w.norm()))
            assert len(torch.unique(di.abs() / w.abs().clamp_min(1e-12))) > 1  # not |d_i| = |θ_i|


def test_directions_are_seeded_and_zero_mean():
    w = torch.randn(400, 300)
    a, b, c = (dirs.random_direction([w], s)[0] for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Rescaling a row by a positive factor keeps its sign symmetry: the row-normalised entries
    # have mean 0 (sd 1/sqrt(N) per entry after dividing by the row scale).
    z = a / w.norm(dim=1, keepdim=True) * np.sqrt(w.shape[1])
    assert abs(float(z.mean())) < 4 / np.sqrt(z.numel())
    assert float((a > 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_pca_recovers_the_trajectory_plane_and_path_ends_at_centre():
    g = torch.Generator().manual_seed(0)
    n = 500
    center = torch.randn(n, generator=g, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=torch.float64))
    t = torch.linspace(0, 1, 12, dtype=torch.float64)
    a, b = 3 * (1 - t) ** 2, 2 * torch.sin(3 * t) * (1 - t)  # a curved path ending at (0, 0)
    snaps = [center + a[e] * U[:, 0] + b[e] * U[:, 1] for e in range(len(t))]
    D, info = dirs.pca_directions(snaps, center)
    basis = torch.stack([d.double() / d.double().norm() for d in D], 1)
    # span(D) = span(U): the principal angles are 0, i.e. the singular values of Uᵀ basis are 1.
    s = torch.linalg.svdvals(U.T @ basis)
    assert torch.allclose(s, torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert sum(info["explained_variance_ratio"]) == pytest.approx(1.0, abs=1e-9)
    xy, resid = dirs.project(snaps, center, D)
    assert np.allclose(xy[-1], 0, atol=1e-6)  # the last snapshot is θ*
    assert max(resid) < 1e-5  # the path lies in the plane
    assert np.abs(xy).max(0) == pytest.approx([1, 1], abs=1e-6)  # the trajectory spans [-1, 1]
    assert xy[0, 0] < 0 and xy[0, 1] <= 0  # starts on the negative side
    # Reconstruct the snapshots from the projected coordinates.
    rec = center + torch.stack([d.double() for d in D], 1) @ torch.tensor(xy[3])
    assert torch.allclose(rec, snaps[3], atol=1e-5)


def test_project_is_least_squares_for_non_orthogonal_directions():
    g = torch.Generator().manual_seed(1)
    d1, d2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    d2 = d2 + 0.7 * d1  # far from orthogonal: plain dot products would be wrong
    center = torch.randn(50, generator=g)
    p = center + 0.3 * d1 - 1.2 * d2
    xy, resid = dirs.project([p], center, [d1, d2])
    assert xy[0] == pytest.approx([0.3, -1.2], abs=1e-5) and resid[0] < 1e-6


# ---- the grid ------------------------------------------------------------------------------

def brute_force(model, X, y, weights_names, D, coords):
    """f(α, β) by building each perturbed model from scratch."""
    out = np.empty([len(c) for c in coords])
    for idx in np.ndindex(*out.shape):
        m = copy.deepcopy(model)
        with torch.no_grad():
            params = dict(m.named_parameters())
            for k, name in enumerate(weights_names):
                params[name].add_(sum(coords[a][idx[a]] * D[a][k] for a in range(len(coords))))
        out[idx] = full_loss(m, X, y)
    return out


def test_grid_matches_brute_force_and_restores_parameters_exactly():
    model, X, y, batches = mlp_and_data()
    named = ls.space_parameters(model, "all")
    weights = [p for _, p in named]
    before = [p.detach().clone() for p in weights]
    D = [dirs.random_direction(weights, s, include_1d=True) for s in (0, 1)]
    coords = [ls.grid_coords(5, 0.8)] * 2
    got = ls.landscape_grid(model, weights, D, {"train": batches}, coords, progress=False)["train"]
    want = brute_force(model, X, y, [n for n, _ in named], D, coords)
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
    assert got["loss"][2, 2] == full_loss(model, X, y) or abs(got["loss"][2, 2] - full_loss(model, X, y)) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(before, weights))  # bit-for-bit restore
    # Accuracy at the centre is the model's accuracy.
    with torch.no_grad():
        acc = float((model(X).argmax(1) == y).float().mean())
    assert got["accuracy"][2, 2] == pytest.approx(acc)


def test_segment_matches_loss_landscapes_linear_interpolation():
    from loss_landscapes import linear_interpolation
    from loss_landscapes.metrics import Loss
    model, X, y, batches = mlp_and_data(seed=1)
    torch.manual_seed(5)
    other = MLP().eval()
    weights = [p for _, p in ls.space_parameters(model, "all")]
    delta = [q.detach() - p.detach() for p, q in zip(weights, other.parameters())]
    steps = 10
    coords = [ls.grid_coords(2 * steps + 1, 1.0)]  # t = k/steps, k = -steps..steps
    ours = ls.landscape_grid(model, weights, [delta], {"train": batches}, coords, progress=False)["train"]["loss"]
    peer = linear_interpolation(copy.deepcopy(model), copy.deepcopy(other), Loss(nn.CrossEntropyLoss(), X, y),
                                steps=steps, deepcopy_model=True)  # evaluates t = 1/steps … 1
    np.testing.assert_allclose(ours[steps + 1:], peer, rtol=1e-5)
    assert ours[-1] == pytest.approx(full_loss(other, X, y), rel=1e-5)  # α = 1 is the other model


def test_sharpness_on_a_known_quadratic():
    coords = [ls.grid_coords(21, 2.0)] * 2
    A, B = np.meshgrid(coords[0], coords[1], indexing="ij")
    f = 1.0 + 3.0 * A ** 2 + 0.5 * B ** 2  # f'' = 6 along α, 1 along β
    sh = ls.sharpness(coords, f)
    assert sh["curvature_at_center"] == pytest.approx([6.0, 1.0], rel=1e-9)
    assert [r["radius"] for r in sh["loss_rise"]] == pytest.approx([0.2 * k for k in range(1, 11)], rel=1e-12)
    for r in sh["loss_rise"]:
        rho = r["radius"]
        # The square ring max(|a|, |b|) = ρ: on its sides a = ±ρ (b over the grid in [-ρ, ρ]) or b = ±ρ.
        ring = [f[i, j] - 1 for i in range(21) for j in range(21)
                if abs(max(abs(coords[0][i]), abs(coords[1][j])) - rho) < 1e-9]
        assert r["points"] == len(ring) == 8 * round(rho / 0.2)
        assert r["mean_rise"] == pytest.approx(np.mean(ring), rel=1e-12)
        assert r["max_rise"] == pytest.approx(3 * rho ** 2 + 0.5 * rho ** 2, rel=1e-12)  # the ring's corners
    sh1 = ls.sharpness([coords[0]], 1 + 2 * np.asarray(coords[0]) ** 2)
    assert sh1["curvature_at_center"][0] == pytest.approx(4.0)
    assert sh1["loss_rise"][-1]["mean_rise"] == pytest.approx(2 * 4.0)  # ±ρ = ±2 are grid points
    assert sh1["loss_rise"][-1]["max_rise"] == pytest.approx(2 * 4.0)


@pytest.mark.parametrize("dims, grid", [(1, 3), (1, 7), (2, 3), (2, 9)])
def test_every_loss_rise_is_read_off_grid_points_and_max_is_at_least_mean(dims, grid):
    """The issue-21 case (dims 1, grid 3) reported max_rise 0 below an interpolated mean_rise at radii off the
    grid: every radius is a grid point, and each statistic is the raw grid's, on grids of any shape."""
    rng = np.random.default_rng(grid + dims)
    coords = [ls.grid_coords(grid, 0.5)] * dims
    loss = rng.random((grid,) * dims) * 3
    c = (grid - 1) // 2
    rises = ls.sharpness(coords, loss)["loss_rise"]
    assert [r["radius"] for r in rises] == [coords[0][c + k] for k in range(1, c + 1)]
    for k, r in enumerate(rises, 1):
        idx = [i for i in np.ndindex(*loss.shape) if max(abs(a - c) for a in i) <= k]
        ring = [loss[i] for i in idx if max(abs(a - c) for a in i) == k]
        assert r["mean_rise"] == pytest.approx(np.mean(ring) - loss[(c,) * dims], rel=1e-12, abs=1e-12)
        assert r["max_rise"] == pytest.approx(max(loss[i] for i in idx) - loss[(c,) * dims], rel=1e-12, abs=1e-12)
        assert r["max_rise"] >= r["mean_rise"]


class Flaky(MLP):
    """An MLP whose forward fails after `budget` calls (an interrupted run)."""
    budget = None
    calls = 0

    def forward(self, x):
        Flaky.calls += 1
        if Flaky.budget is not None and Flaky.calls > Flaky.budget:
            raise KeyboardInterrupt
        return super().forward(x)


def test_interrupted_grid_resumes_where_it_stopped(tmp_path):
    torch.manual_seed(0)
    model = Flaky().eval()
    _, X, y, batches = mlp_and_data()  # 5 batches per point
    weights = list(model.parameters())
    before = [p.detach().clone() for p in weights]
    D = [dirs.random_direction(weights, s) for s in (0, 1)]
    coords = [ls.grid_coords(5, 1.0)] * 2
    fp = {"test": 1}
    full = ls.landscape_grid(model, weights, D, {"train": batches}, coords, progress=False)["train"]["loss"]
    Flaky.calls, Flaky.budget = 0, 5 * 9 + 2  # dies during the 10th point
    with pytest.raises(KeyboardInterrupt):
        ls.landscape_grid(model, weights, D, {"train": batches}, coords, out_dir=tmp_path, fingerprint=fp,
                          save_every=4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, weights))  # restored even on interruption
    assert len(Journal(ls.journal_file(tmp_path), fp).done()) == 9  # 2 fsyncs of 4, and the 9th flushed
    Flaky.calls, Flaky.budget = 0, None
    again = ls.landscape_grid(model, weights, D, {"train": batches}, coords, out_dir=tmp_path, fingerprint=fp,
                              progress=False)["train"]["loss"]
    assert Flaky.calls == 5 * (25 - 9)  # only the missing points were evaluated
    np.testing.assert_array_equal(again, full)
    with pytest.raises(AdapterError, match="other settings"):
        ls.landscape_grid(model, weights, D, {"train": batches}, coords, out_dir=tmp_path,
                          fingerprint={"test": 2}, progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank, world, port, out_dir, result_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, _, _, batches = mlp_and_data()
        weights = list(model.parameters())
        D = [dirs.random_direction(weights, s) for s in (0, 1)]
        coords = [ls.grid_coords(5, 1.0)] * 2
        res = ls.landscape_grid(model, weights, D, {"train": batches}, coords, out_dir=out_dir,
                                fingerprint={"k": 1}, progress=False)["train"]
        if rank == 0:
            np.save(result_file, np.stack([res["loss"], res["accuracy"]]))
    finally:
        dist.destroy_process_group()


def _two_processes(out_dir, result_file):
    mp.start_processes(_sharded_worker, args=(2, _free_port(), str(out_dir), str(result_file)), nprocs=2,
                       join=True, start_method="spawn")
    return np.load(result_file)


def _rank_points(out_dir):
    return [set(Journal(ls.journal_file(out_dir, r, 2), {"k": 1}).done()) for r in (0, 1)]


def _own_keys(rank, n=25):
    """The points rank r of 2 evaluates: tasks k with k % 2 == r, in product order over the 5×5 grid."""
    return {f"train:{k // 5},{k % 5}" for k in range(n) if k % 2 == rank}


def test_two_processes_produce_the_same_grid_as_one(tmp_path):
    model, _, _, batches = mlp_and_data()
    weights = list(model.parameters())
    D = [dirs.random_direction(weights, s) for s in (0, 1)]
    coords = [ls.grid_coords(5, 1.0)] * 2
    one = ls.landscape_grid(model, weights, D, {"train": batches}, coords, progress=False)["train"]
    two = _two_processes(tmp_path / "shards", tmp_path / "two.npy")
    np.testing.assert_allclose(two[0], one["loss"], rtol=1e-6)
    np.testing.assert_array_equal(two[1], one["accuracy"])
    # Each rank evaluated and saved exactly its own share of the 25 points, whatever the timing: a rank never
    # re-saves points it read from the other rank's file.
    assert _rank_points(tmp_path / "shards") == [_own_keys(0), _own_keys(1)]


def test_two_processes_resuming_keep_each_partial_to_its_own_points(tmp_path):
    shards = tmp_path / "shards"
    first = _two_processes(shards, tmp_path / "first.npy")
    # Rank 1's file is gone (say it never saved): on the rerun rank 1 reads rank 0's 12 points to skip them,
    # and must still write only its own 13.
    ls.journal_file(shards, 1, 2).unlink()
    again = _two_processes(shards, tmp_path / "again.npy")
    np.testing.assert_array_equal(again, first)
    assert _rank_points(shards) == [_own_keys(0), _own_keys(1)]


def test_transformers_dict_batches_and_model_output(tiny_bert):
    from tests.conftest import tiny_batch
    b1, b2 = tiny_batch(4, 7, seed=0), tiny_batch(3, 7, seed=1)
    weights = [p for _, p in ls.space_parameters(tiny_bert, "all")]
    D = [dirs.random_direction(weights, 0)]
    coords = [ls.grid_coords(3, 0.5)]
    got = ls.landscape_grid(tiny_bert, weights, D, {"train": [b1, b2]}, coords, progress=False)["train"]["loss"]
    # Centre: the model's own loss (HF computes the batch mean; combine the two batches by count).
    with torch.no_grad():
        l1 = float(tiny_bert(**b1).loss) * 4
        l2 = float(tiny_bert(**b2).loss) * 3
    assert got[1] == pytest.approx((l1 + l2) / 7, rel=1e-5)
    assert got[0] != got[1]


# ---- checkpoints and the CLI ---------------------------------------------------------------

def make_ckpt(root, name="ckpt", seed=0, base=None, base_seed=0):
    """A tiny-BERT LoRA checkpoint with a non-zero update (adapters.save), for CLI tests."""
    import adapters
    from adapters import models
    base = base or models.tiny_model_dir(root / f"base{base_seed}", "bert", seed=base_seed)
    model = models.load_model(base, 2)
    h = adapters.weights_hash(model)
    model = adapters.apply(model, "lora", rank=2, alpha=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    adapters.save(model, root / name, base_model=str(base), base_model_hash=h)
    return root / name, base


def _as_fft(ckpt, path):
    """The fine-tuned model of LoRA checkpoint `ckpt`, merged (W0 + ΔW) and saved as a full fine-tuning run."""
    import adapters
    from adapters import models
    from analysis import spaces
    meta = adapters.read_meta(ckpt)
    merged = adapters.load(ckpt)
    spaces.merge(merged)
    model = models.load_model(meta["base_model"], 2, seed=0)
    h = adapters.weights_hash(model)
    adapters.apply(model, "fft")
    model.load_state_dict(merged.state_dict())
    adapters.save(model, path, base_model=meta["base_model"], base_model_hash=h, extra_meta=dict(task=meta["task"]))
    return path


def _has(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def assert_flags_are_the_fields(module, config_cls, positional, tmp_path, given):
    """Every field of `config_cls` is a flag of module.parser() (dest: the field's name, default: the field's
    default), and a --config FILE.yaml with the keys of `given` gives the config that the same flags give.

    given: {flag without --: (its value on the command line, None for a switch; its value in the YAML file)}."""
    import yaml
    from adapters import command, settings
    p = module.parser()
    for f in settings.fields(config_cls):
        action = p._option_string_actions[settings.option(f)]
        assert (action.dest, action.default) == (f.name, settings.default(f)), f.name
    assert command.parse(module.parser(), config_cls, positional)[0] == config_cls()
    argv = [a for k, (v, _) in given.items() for a in [f"--{k}"] + ([] if v is None else [v])]
    by_flags, rest = command.parse(module.parser(), config_cls, positional + argv)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({k: y for k, (_, y) in given.items()}))
    by_file, rest_file = command.parse(module.parser(), config_cls, positional + ["--config",
                                                                                 str(tmp_path / "config.yaml")])
    assert by_file == by_flags and rest_file == rest
    changed = [f.name for f in settings.fields(config_cls) if getattr(by_flags, f.name) != settings.default(f)]
    assert len(changed) == len(given), changed  # every key set a setting of its own


def test_every_setting_is_a_flag_and_a_config_key(tmp_path):
    assert_flags_are_the_fields(ls, ls.LandscapeConfig, ["ckpt"], tmp_path, {
        "dims": ("1", 1), "directions": ("to:other", "to:other"), "space": ("effective", "effective"),
        "matrices": ("query", ["query"]), "grid": ("5", 5), "range": ("0.5", 0.5), "examples": ("all", "all"),
        "batch-size": ("4", 4), "include-1d": (None, True), "fresh": (None, True), "save-every": ("3", 3),
        "no-progress": (None, True), "formats": ("svg", "svg"), "data": ("d.csv", "d.csv"), "n-train": ("8", 8),
        "max-length": ("16", 16)})


@pytest.mark.parametrize("args, message", [
    (["--grid", "1"], "grid must be odd and >= 3, so the checkpoint itself is the centre point, got 1"),
    (["--grid", "4"], "grid must be odd and >= 3"),
    (["--range", "0"], "range must be > 0, got 0.0"),
    (["--range", "-1"], "range must be > 0"),
    (["--examples", "0"], "examples must be >= 1"),
    (["--n-train", "0"], "n_train must be >= 1"),
    (["--dims", "3"], "argument --dims: invalid choice"),
    (["--directions", "sideways"], "--directions must be"),
    (["--dims", "2", "--directions", "to:x"], "use --dims 1"),
    (["--directions", "pca", "--space", "effective"], "--directions pca needs --space trainable or all"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, args, message):
    assert ls.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_pca_without_trajectory_and_segment_to_another_base_exit_2(tmp_path, capsys):
    ckpt, base = make_ckpt(tmp_path)
    assert ls.main([str(ckpt), "--directions", "pca", "--out", str(tmp_path / "o1")]) == 2
    assert "trajectory snapshots" in capsys.readouterr().err
    other, _ = make_ckpt(tmp_path, "other", base_seed=1)  # a different pretrained body
    assert ls.main([str(ckpt), "--dims", "1", "--directions", f"to:{other}", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "another base model" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def train_tiny(root, method="lora", steps=4, snapshots=4, lr=0.05):
    """A real (tiny) training run through adapters.train: checkpoint with stats and trajectory."""
    from adapters import models
    from adapters.train import train
    base = models.tiny_model_dir(root / "base", "bert")
    ckpt = root / f"ckpt_{method}"
    train(model=str(base), method=method, rank=2, alpha=4, max_steps=steps, n_train=24, n_val=8, n_test=16,
          batch_size=8, lr=lr, out=str(ckpt), save_trajectory=snapshots, progress=False)
    return ckpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not (_has("adapters.evaluate") and _has("adapters.train")):
        pytest.skip("the training CLI adapters.train / adapters.evaluate (issue 3) is not in the tree")
    return train_tiny(tmp_path_factory.mktemp("trained"))


def test_cli_writes_landscape_json_into_out_and_records_the_results_settings(trained, tmp_path, capsys):
    from adapters import settings
    out = tmp_path / "land"
    assert ls.main([str(trained), "--dims", "1", "--grid", "3", "--examples", "8", "--out", str(out), "--formats",
                    "svg", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["landscape.json", "landscape_1d.svg"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"wrote {out / 'landscape.json'} and 1 figure files"
    saved = json.loads((out / "landscape.json").read_text())
    # exactly the settings that shape the numbers (results=True), and what they were
    config = ls.LandscapeConfig(dims=1, grid=3, examples=8)
    assert list(saved["settings"]) == [f.name for f in settings.fields(config) if f.metadata["results"]]
    assert saved["settings"] == settings.shaping(config)
    assert not {"out", "device", "progress", "formats", "fresh", "save_every"} & set(saved["settings"])
    assert saved["figures"] == [str(out / "landscape_1d.svg")]


def test_grid_centre_equals_the_checkpoint_loss_in_training_stats(trained, tmp_path):
    import adapters
    stats = adapters.read_stats(trained)
    r = ls.run(trained, dims=1, grid=3, split="test", examples=None, out=tmp_path / "l1", progress=False,
               formats=("png",))
    # dims=1 evaluates both splits: the centre of each curve is that split's loss of the final weights.
    assert r["center_loss"] == pytest.approx(stats["test_loss"], rel=1e-5, abs=1e-7)
    assert r["curves"]["train"]["loss"][1] == pytest.approx(stats["train_loss"], rel=1e-5, abs=1e-7)
    assert r["curves"]["test"]["accuracy"][1] == pytest.approx(stats["test_metric"])
    assert (tmp_path / "l1" / "landscape_1d.png").exists()
    r2 = ls.run(trained, dims=2, grid=3, range=0.5, split="train", examples=None, out=tmp_path / "l2",
                progress=False, formats=("png",))
    assert r2["center_loss"] == pytest.approx(stats["train_loss"], rel=1e-5, abs=1e-7)
    saved = json.loads((tmp_path / "l2" / "landscape.json").read_text())
    assert [d["seed"] for d in saved["directions"]] == [0, 1]
    assert saved["directions"][0]["normalisation"] == "filter" and saved["settings"]["grid"] == 3
    assert len(saved["loss"]) == 3 and len(saved["loss"][0]) == 3


def test_pca_landscape_on_a_real_trajectory_ends_at_the_centre(trained, tmp_path):
    r = ls.run(trained, dims=2, directions="pca", grid=3, range=1.2, examples=8, batch_size=4,
               out=tmp_path / "land", progress=False, formats=("png",))
    traj = np.asarray(r["trajectory"]["coords"])
    assert len(traj) == 4 and np.allclose(traj[-1], 0, atol=1e-6)  # the last snapshot is θ*
    assert np.abs(traj).max(0) == pytest.approx([1, 1], abs=1e-6)
    assert r["trajectory"]["steps"] == sorted(r["trajectory"]["steps"])
    assert (tmp_path / "land" / "landscape_contour.png").exists()
    assert (tmp_path / "land" / "landscape_surface.png").exists()
    assert not list((tmp_path / "land").glob("landscape.partial*"))


def test_segment_to_itself_is_flat_and_to_a_sibling_ends_at_its_loss(trained, tmp_path):
    import adapters
    from adapters.evaluate import checkpoint_batches, evaluate
    from adapters.train import train
    sibling = tmp_path / "sibling"
    base = adapters.read_meta(trained)["base_model"]
    train(model=base, method="lora", rank=2, alpha=4, max_steps=2, n_train=24, n_val=8, n_test=16, batch_size=8,
          lr=0.05, seed=1, out=str(sibling), progress=False)
    r = ls.run(trained, dims=1, directions=f"to:{sibling}", grid=5, examples=None, out=tmp_path / "seg",
               progress=False, formats=("png",))
    want = evaluate(adapters.load(sibling), checkpoint_batches(sibling, "train"))["loss"]
    assert r["loss"][-1] == pytest.approx(want, rel=1e-5)  # α = 1 is the sibling checkpoint


def test_segment_between_runs_with_different_frozen_selectors_ends_at_ckpt2(trained, tmp_path):
    """rcla seeds 0 and 1 select other columns: moving B alone would keep seed 0's selectors all the way."""
    import adapters
    from adapters.evaluate import checkpoint_batches, evaluate
    from adapters.train import train
    base = adapters.read_meta(trained)["base_model"]
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"rcla{seed}")
        train(model=base, method="rcla", rank=2, alpha=4, max_steps=2, n_train=24, n_val=8, n_test=16, batch_size=8,
              lr=0.05, seed=seed, out=str(runs[-1]), progress=False)
    assert adapters.read_meta(runs[0])["selectors"] != adapters.read_meta(runs[1])["selectors"]
    r = ls.run(runs[0], dims=1, directions=f"to:{runs[1]}", grid=3, examples=None, out=tmp_path / "seg",
               progress=False, formats=("png",))
    loss = {k: evaluate(adapters.load(c), checkpoint_batches(c, "train"))["loss"] for k, c in zip((0, 1), runs)}
    assert r["loss"][1] == pytest.approx(loss[0], rel=1e-5)
    assert r["loss"][-1] == pytest.approx(loss[1], rel=1e-5)  # α = 1 is CKPT2 itself
    assert r["parametrization"]["name"] == "merged" and r["settings"]["space"] == "all"


def test_effective_space_landscape_is_the_same_for_every_method_with_the_same_weights(trained, tmp_path):
    """Along random directions normalised against W0, a LoRA run and a full fine-tune with the same W0 + ΔW
    give the same curve: one space, one set of directions. In their own trainable spaces they do not."""
    fft = _as_fft(trained, tmp_path / "fft")
    kw = dict(dims=1, grid=5, examples=16, progress=False, formats=("png",))
    a, b = (ls.run(c, space="effective", out=tmp_path / f"e{i}", **kw) for i, c in enumerate((trained, fft)))
    assert a["matrices"] == b["matrices"] and a["space_parameters"] == b["space_parameters"] == 4 * 32 * 32
    assert a["directions"][0]["norm"] == pytest.approx(b["directions"][0]["norm"], rel=1e-6)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert a["directions"][0]["filter_reference"] == "W0" and a["parametrization"]["name"] == "effective"
    # Filter-normalised against W0: every row of the direction has its W0 row's norm, so ‖δ‖ = ‖W0‖_F.
    import adapters
    base = adapters.load_base(trained)
    w0 = torch.cat([base.get_submodule(n).weight.detach().reshape(-1) for n in a["matrices"]])
    assert a["directions"][0]["norm"] == pytest.approx(float(w0.norm()), rel=1e-6)
    query = ls.run(trained, space="effective", matrices=["query"], out=tmp_path / "q", **kw)
    assert query["matrices"] == [n for n in a["matrices"] if n.endswith("query")] and len(query["matrices"]) == 2
    own = [ls.run(c, out=tmp_path / f"t{i}", **kw) for i, c in enumerate((trained, fft))]
    assert own[0]["space_parameters"] * 10 < own[1]["space_parameters"]
    assert not np.allclose(own[0]["loss"], own[1]["loss"], rtol=1e-3)
