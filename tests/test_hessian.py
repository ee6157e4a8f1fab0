"""analysis.hessian and analysis.lanczos: checked against dense Hessians and pyhessian."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from analysis import hessian as hs
from analysis import lanczos
from adapters.evaluate import forward_logits
from tests.test_landscape import MLP, _as_fft, _has, assert_flags_are_the_fields, train_tiny


def sym(n, eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ U.T


# ---- the estimators on explicit matrices --------------------------------------------------

def test_lanczos_top_k_matches_eigvalsh_including_close_and_negative_eigenvalues():
    eigs = torch.cat([torch.tensor([5.0, 4.99, 4.0, 3.5, -6.0], dtype=torch.float64),
                      torch.linspace(-1, 1, 195, dtype=torch.float64)])
    A = sym(200, eigs)
    r = lanczos.top_eigenvalues(lambda v: A @ v, 200, k=4, max_iter=200, tol=1e-10, seed=0)
    assert r["converged"]
    np.testing.assert_allclose(r["eigenvalues"], [5.0, 4.99, 4.0, 3.5], rtol=1e-8)
    assert r["lambda_min"] == pytest.approx(-6.0, rel=1e-6)  # the most negative one, from the same run


def test_hutchinson_is_exact_for_a_diagonal_and_unbiased_otherwise():
    d = torch.linspace(-2, 7, 64, dtype=torch.float64)
    r = lanczos.hutchinson(lambda v: d * v, 64, samples=5, seed=3)
    assert r["trace"] == pytest.approx(float(d.sum()), rel=1e-12) and r["stderr"] == pytest.approx(0, abs=1e-9)
    A = sym(64, torch.linspace(0, 3, 64), seed=1)
    r = lanczos.hutchinson(lambda v: A @ v, 64, samples=400, seed=3)
    assert abs(r["trace"] - float(torch.trace(A))) < 4 * r["stderr"]


def test_hutchpp_is_exact_when_the_sketch_spans_the_space():
    A = sym(30, torch.linspace(-1, 4, 30), seed=2)
    r = lanczos.hutchpp(lambda v: A @ v, 30, matvecs=3 * 30, seed=0)
    assert r["trace"] == pytest.approx(float(torch.trace(A)), rel=1e-10)
    # With a low-rank-dominated spectrum a small sketch already nails the trace.
    B = sym(200, torch.cat([torch.tensor([50.0, 40, 30]), 1e-3 * torch.ones(197)]), seed=4)
    r = lanczos.hutchpp(lambda v: B @ v, 200, matvecs=30, seed=0)
    assert r["trace"] == pytest.approx(float(torch.trace(B)), rel=1e-3)


def test_slq_nodes_weights_and_quadrature_moments():
    eigs = torch.linspace(-1, 3, 40)
    A = sym(40, eigs, seed=5)
    full = lanczos.slq(lambda v: A @ v, 40, steps=40, runs=1, seed=1)
    np.testing.assert_allclose(sorted(full["nodes"][0]), eigs.numpy(), atol=1e-9)
    assert sum(full["weights"][0]) == pytest.approx(1.0)
    # Gauss quadrature with m nodes is exact for degree < 2m: Σ τ θᵖ = vᵀ Aᵖ v / vᵀv.
    m = 6
    r = lanczos.slq(lambda v: A @ v, 40, steps=m, runs=1, seed=2)
    v = lanczos.rademacher(40, torch.Generator().manual_seed(2), torch.zeros(1, dtype=torch.float64))
    v = v / v.norm()
    for p in range(2 * m):
        quad = sum(t * th ** p for th, t in zip(r["nodes"][0], r["weights"][0]))
        assert quad == pytest.approx(float(v @ torch.linalg.matrix_power(A, p) @ v), rel=1e-8, abs=1e-10)
    t, phi, sigma = lanczos.slq_density(full["nodes"], full["weights"], sigma=0.05)
    assert np.trapezoid(phi, t) == pytest.approx(1.0, abs=1e-3)


# ---- Hessian-vector products of real models ---------------------------------------------

def dense_hessian(model, named, batches):
    """The exact Hessian of the mean per-example loss, by torch.autograd.functional.hessian."""
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    count = sum(len(b["labels"]) for b in batches)

    def loss(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        total = 0
        for b in batches:
            logits = forward_logits(lambda **kw: functional_call(model, params, args=(), kwargs=kw), b)
            total = total + F.cross_entropy(logits, b["labels"], reduction="sum")
        return total / count

    return torch.autograd.functional.hessian(loss, theta0, vectorize=True)


def mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = MLP(d=4, h=6, c=3).double().eval()
    X, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    batches = [{"x": X[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 30, 8)]
    return model, X, y, batches


def test_mlp_hessian_matches_autograd_functional_hessian():
    model, _, _, batches = mlp_problem()
    named = list(model.named_parameters())
    H = dense_hessian(model, named, batches)
    op = hs.HessianOperator(model, [p for _, p in named], batches)
    v = torch.randn(op.n, dtype=torch.float64)
    torch.testing.assert_close(op(v), H @ v, rtol=1e-9, atol=1e-12)
    cached = hs.HessianOperator(model, [p for _, p in named], batches, cache_graph=True)
    for _ in range(2):  # the kept graph serves repeated products
        torch.testing.assert_close(cached(v), H @ v, rtol=1e-9, atol=1e-12)
    exact = torch.linalg.eigvalsh(H).flip(0)
    r = hs.spectrum(op, top_k=5, trace=True, trace_method="hutch++", trace_samples=3 * op.n, tol=1e-8,
                    progress=False)
    np.testing.assert_allclose(r["eigenvalues"], exact[:5].numpy(), rtol=1e-3)
    assert abs(r["eigenvalues"][0] - float(exact[0])) <= 1e-6 * abs(float(exact[0]))
    assert r["trace"] == pytest.approx(float(torch.trace(H)), rel=1e-3)
    # Hutchinson: every sample is exactly vᵀHv for the recorded Rademacher draw.
    h = hs.spectrum(op, top_k=0, trace=True, trace_samples=6, seed=4, progress=False)
    gen = torch.Generator().manual_seed(5)  # trace seed = seed + 1
    for s in h["trace_estimator"]["samples"]:
        w = lanczos.rademacher(op.n, gen, torch.zeros(1, dtype=torch.float64))
        assert s == pytest.approx(float(w @ H @ w), rel=1e-9)
    assert all(torch.equal(a, b) for a, b in zip([p for _, p in named], [p for _, p in named]))
    assert all(p.grad is None for _, p in named)  # HVPs never touch .grad


def test_tiny_bert_lora_hessian_matches_dense(tiny_bert):
    import adapters
    from tests.conftest import tiny_batch
    model = adapters.apply(tiny_bert, "lora", rank=2, alpha=4, seed=0)
    model.set_attn_implementation("eager")  # SDPA has no double backward on CPU
    model = model.double().eval()
    with torch.no_grad():  # a non-zero update, so the Hessian is not that of B = 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    batches = [tiny_batch(4, 6, seed=0), tiny_batch(3, 6, seed=1)]
    # One adapted layer's A and B plus the head (194 scalars): a dense Hessian stays cheap.
    named = [(n, p) for n, p in model.named_parameters()
             if p.requires_grad and ("layer.1.attention.self.query" in n or n.startswith("classifier"))]
    H = dense_hessian(model, named, batches)
    op = hs.HessianOperator(model, [p for _, p in named], batches)
    exact = torch.linalg.eigvalsh(H).flip(0)
    r = hs.spectrum(op, top_k=3, trace=True, trace_samples=3, tol=1e-6, seed=0, progress=False)
    np.testing.assert_allclose(r["eigenvalues"], exact[:3].numpy(), rtol=1e-3)
    gen = torch.Generator().manual_seed(1)
    for s in r["trace_estimator"]["samples"]:  # each Hutchinson sample is exactly vᵀHv
        w = lanczos.rademacher(op.n, gen, torch.zeros(1, dtype=torch.float64))
        assert s == pytest.approx(float(w @ H @ w), rel=1e-9)


def test_agrees_with_pyhessian_eigenvalues_and_trace():
    from pyhessian import hessian as PyHessian
    model, X, y, batches = mlp_problem(seed=1)
    model = model.float()
    batches = [{"x": X.float(), "labels": y}]
    op = hs.HessianOperator(model, list(model.parameters()), batches)
    ours = hs.spectrum(op, top_k=1, trace=True, trace_samples=400, tol=1e-8, progress=False)
    torch.manual_seed(0)
    peer = PyHessian(model, nn.CrossEntropyLoss(), data=(X.float(), y), cuda=False)
    top, _ = peer.eigenvalues(maxIter=500, tol=1e-7, top_n=1)
    vhv = peer.trace(maxIter=400, tol=0.0)  # tol 0: keep all 400 samples
    assert ours["eigenvalues"][0] == pytest.approx(top[0], rel=1e-3)
    peer_se = np.std(vhv, ddof=1) / np.sqrt(len(vhv))
    assert abs(ours["trace"] - np.mean(vhv)) < 4 * np.hypot(ours["trace_stderr"], peer_se)


# ---- the CLI on a real checkpoint ----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not (_has("adapters.evaluate") and _has("adapters.train")):
        pytest.skip("the training CLI adapters.train / adapters.evaluate (issue 3) is not in the tree")
    return train_tiny(tmp_path_factory.mktemp("trained"), snapshots=0)


def test_cli_on_a_checkpoint(trained, tmp_path, capsys):
    import adapters
    from adapters.evaluate import checkpoint_batches, evaluate
    from adapters import settings
    out = tmp_path / "h"
    assert hs.main([str(trained), "--top-k", "2", "--trace", "--trace-samples", "4", "--density", "--density-steps",
                    "6", "--density-runs", "2", "--examples", "8", "--tol", "1e-5", "--out", str(out),
                    "--formats", "svg,md", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "| 1 |" in lines[3] and lines[-1] == f"wrote {out / 'hessian.json'} and 1 figure files"
    saved = json.loads((out / "hessian.json").read_text())
    assert saved["eigenvalues"] == sorted(saved["eigenvalues"], reverse=True) and len(saved["eigenvalues"]) == 3 - 1
    assert {"trace", "trace_stderr", "density", "settings", "lanczos"} <= set(saved)
    assert sorted(p.name for p in out.iterdir()) == ["hessian.json", "hessian_density.svg"]  # figures: svg only
    # exactly the settings that shape the numbers (results=True), and what they were
    config = hs.HessianConfig(top_k=2, trace=True, trace_samples=4, density=True, density_steps=6, density_runs=2,
                              examples=8, tol=1e-5)
    assert list(saved["settings"]) == [f.name for f in settings.fields(config) if f.metadata["results"]]
    assert saved["settings"] == settings.shaping(config)
    assert not {"out", "device", "progress", "formats", "cache_graph"} & set(saved["settings"])
    # Wiring: the same examples, the trained scalars of the checkpoint as trained (scale s back in), eval mode.
    from analysis import spaces
    model = adapters.load(trained, attn_implementation="eager")
    spaces.as_trained(model, adapters.read_meta(trained))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    batches = checkpoint_batches(trained, "train", 8, 32, 0)
    assert saved["loss"] == pytest.approx(evaluate(model, batches)["loss"], rel=1e-6)
    assert saved["parameters"] == sum(p.numel() for _, p in named) and saved["examples"] == 8
    op = hs.HessianOperator(model, [p for _, p in named], batches)
    top = lanczos.top_eigenvalues(op, op.n, 2, tol=1e-5, seed=0)
    np.testing.assert_allclose(saved["eigenvalues"], top["eigenvalues"], rtol=1e-5)


def test_every_setting_is_a_flag_and_a_config_key(tmp_path):
    assert_flags_are_the_fields(hs, hs.HessianConfig, ["ckpt"], tmp_path, {
        "top-k": ("0", 0), "trace": (None, True), "density": (None, True), "space": ("all", "all"),
        "parametrization": ("folded", "folded"), "examples": ("all", "all"), "split": ("test", "test"),
        "seed": ("3", 3), "max-iter": ("7", 7), "tol": ("0.01", 0.01), "trace-method": ("hutch++", "hutch++"),
        "sigma": ("0.5", 0.5), "cache-graph": (None, True), "out": ("o", "o"), "device": ("cpu", "cpu"),
        "no-progress": (None, True), "formats": ("pdf", "pdf"), "task": ("tweets", "tweets"), "n-test": ("4", 4),
        "val-fraction": ("0.2", 0.2)})


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "nothing to compute"),
    (["--trace", "--trace-samples", "1"], "--trace-samples must be ≥ 2 for a standard error, got 1"),
    (["--trace", "--trace-method", "hutch++", "--trace-samples", "5"], "--trace-samples must be ≥ 6"),
    (["--top-k", "-1"], "top_k must be >= 0, got -1"),
    (["--tol", "0"], "tol must be > 0, got 0.0"),
    (["--max-iter", "0"], "max_iter must be >= 1"),
    (["--sigma", "-1"], "sigma must be > 0"),
    (["--val-fraction", "1"], "val_fraction must be in [0, 1)"),
])
def test_bad_input_exit_2(tmp_path, capsys, args, message):
    assert hs.main([str(tmp_path), *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_exit_2(tmp_path, capsys):
    assert hs.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---- the parametrisation and the space ------------------------------------------------------

def _frozen_head_cla(trained, path, c=1.0):
    """A cLA checkpoint on the tiny BERT of `trained` whose head is frozen, so its trainable space is B alone.

    Saved as our checkpoints are (B' = s·B, PEFT scaling 1); with c ≠ 1 the same update is saved with part of
    the scale left in the PEFT config instead (lora_alpha = c·r, B'/c in the file): another folding."""
    import shutil
    import adapters
    from adapters import models
    from safetensors.torch import load_file, save_file
    meta = adapters.read_meta(trained)
    first = path.with_name(path.name + "-ours")
    if not first.exists():
        model = models.load_model(meta["base_model"], 2, seed=0)
        h = adapters.weights_hash(model, exclude=[])  # the head is frozen: part of the base
        adapters.apply(model, "cla", rank=2, alpha=8, head=[])
        with torch.no_grad():
            for layer in adapters.inject.adapted_layers(model).values():
                layer.B.copy_(0.5 * torch.randn(layer.B.shape, generator=torch.Generator().manual_seed(1)))
        adapters.save(model, first, base_model=meta["base_model"], base_model_hash=h,
                      extra_meta=dict(task=meta["task"]))
    if c == 1.0:
        return first
    shutil.copytree(first, path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["lora_alpha"] = c * config["r"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file({k: v / c if ".lora_B." in k else v for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    return path


def test_hessian_is_taken_as_trained_whatever_the_folding(trained, tmp_path):
    """L(B') = L(s·B), so along the trained B the curvature is s² times that along the stored B' = s·B."""
    import adapters
    ours, other = _frozen_head_cla(trained, tmp_path / "a"), _frozen_head_cla(trained, tmp_path / "b", c=2.5)
    s = adapters.read_meta(ours)["scale"]
    assert s == 4.0
    kw = dict(top_k=1, examples=8, tol=1e-7, max_iter=100, progress=False)
    a = hs.run(ours, out=tmp_path / "ha", **kw)
    b = hs.run(other, out=tmp_path / "hb", **kw)
    folded = hs.run(ours, out=tmp_path / "hf", parametrization="folded", **kw)
    assert a["lanczos"]["converged"] and b["lanczos"]["converged"] and folded["lanczos"]["converged"]
    assert a["parameters"] == 2 * 2 * 32 * 2  # B alone: 4 adapted matrices of n = 32, r = 2
    assert a["eigenvalues"][0] == pytest.approx(b["eigenvalues"][0], rel=1e-5)
    assert a["eigenvalues"][0] == pytest.approx(s ** 2 * folded["eigenvalues"][0], rel=1e-5)
    assert a["loss"] == pytest.approx(folded["loss"], rel=1e-6)  # the same model, reparametrised
    saved = json.loads((tmp_path / "ha" / "hessian.json").read_text())
    assert saved["parametrization"]["name"] == "trained" and saved["parametrization"]["scale"] == s
    assert json.loads((tmp_path / "hf" / "hessian.json").read_text())["parametrization"]["name"] == "folded"


def test_effective_space_is_one_space_for_every_method(trained, tmp_path):
    """A LoRA run and a full fine-tune with the same weights W0 + ΔW: the same curvature in the effective space,
    very different spaces (and numbers) when each takes its own trainable scalars."""
    fft = _as_fft(trained, tmp_path / "fft")
    kw = dict(top_k=1, examples=8, tol=1e-6, max_iter=100, progress=False)
    lora, full = (hs.run(c, out=tmp_path / f"h{i}", space="effective", **kw) for i, c in enumerate((trained, fft)))
    assert lora["matrices"] == full["matrices"] and len(lora["matrices"]) == 4  # query, value of 2 layers
    assert lora["parameters"] == full["parameters"] == 4 * 32 * 32
    assert lora["parametrization"]["name"] == "effective" and lora["lanczos"]["converged"]
    assert lora["eigenvalues"][0] == pytest.approx(full["eigenvalues"][0], rel=1e-4)
    own = hs.run(fft, out=tmp_path / "own", **kw)
    assert own["parameters"] > 10 * lora["parameters"]
