"""Every method of the registry, exact where it matters: second derivatives, reduced precision, dropout,
the selectors' windows, LoRA+'s ratio and LoRA's initialisation."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapters
from adapters.layers import AdaptedLinear, dropout_mask
from adapters.methods import METHODS, kaiming_a, random_window
from tests.conftest import tiny, tiny_batch

ALL_METHODS = list(METHODS)
ADAPTER_METHODS = [n for n, m in METHODS.items() if m.adapter is not None]
SELECTOR_METHODS = [n for n in ADAPTER_METHODS if METHODS[n].adapter.selector]


def chain_length(method):
    spec = METHODS[method].adapter
    return 2 if spec is not None and spec.chained else 1


@torch.no_grad()
def randomise_links(model_or_layer, seed=0):
    """Non-zero B in every link (folding one link for chained methods), so every term of the update is live."""
    g = torch.Generator().manual_seed(seed)
    layers = ([model_or_layer] if isinstance(model_or_layer, AdaptedLinear)
              else adapters.inject.adapted_layers(model_or_layer).values())
    for layer in layers:
        for link in range(layer.k):
            layer.B.add_(0.5 * torch.randn(layer.B.shape, generator=g, dtype=layer.B.dtype))
            if link < layer.k - 1:
                layer.next_link()


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# -- second derivatives -----------------------------------------------------------------------------

def _model_for_curvature(method):
    model = tiny("bert", attn_implementation="eager").double()
    adapters.apply(model, method, rank=2, alpha=4, chain_length=chain_length(method), seed=1)
    randomise_links(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def _grad(model, params, batch, create_graph=False):
    return torch.autograd.grad(model(**batch).loss, params, create_graph=create_graph)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_hessian_vector_products_are_exact_and_symmetric(method):
    """H v by double backward = central differences of the gradient (float64), and uᵀHv = vᵀHu.

    The selector layers' backward must itself be differentiable in x: otherwise the cross terms between
    a layer's B and every earlier trained tensor are lost (an asymmetric, wrong Hessian).
    """
    model, params = _model_for_curvature(method)
    batch = tiny_batch(n=3, t=6, seed=2)
    g = torch.Generator().manual_seed(3)
    u, v = ([torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params] for _ in range(2))
    norm = math.sqrt(sum(float((d * d).sum()) for d in v))
    v = [d / norm for d in v]  # a unit step direction, so eps is the step length

    def hvp(vec):
        grads = _grad(model, params, batch, create_graph=True)
        return torch.autograd.grad(grads, params, vec)

    Hv, Hu = hvp(v), hvp(u)
    eps = 1e-4

    @torch.no_grad()
    def shift(sign):
        for p, d in zip(params, v):
            p.add_(sign * eps * d)

    shift(+1)
    g_plus = _grad(model, params, batch)
    shift(-2)
    g_minus = _grad(model, params, batch)
    shift(+1)
    fd = torch.cat([(a - b).reshape(-1) / (2 * eps) for a, b in zip(g_plus, g_minus)])
    ad = torch.cat([h.reshape(-1) for h in Hv])
    assert rel_err(ad, fd) < 1e-6, method  # central differences: O(eps²) ≈ 1e-8 here
    uHv = sum((a * b).sum() for a, b in zip(u, Hv))
    vHu = sum((a * b).sum() for a, b in zip(v, Hu))
    assert abs(float(uHv - vHu)) <= 1e-10 * max(1.0, abs(float(uHv))), method


def test_selector_layer_hessian_equals_the_dense_formula():
    """On one layer, the full Hessian over (x, B) of a non-linear function of y matches the dense formula's."""
    torch.manual_seed(0)
    m, n, r = 7, 5, 3
    layer = AdaptedLinear(nn.Linear(m, n).double(), METHODS["c3la"].adapter, r, 6.0, chain_length=2)
    randomise_links(layer)
    W0, b, idx = layer.base.weight.detach(), layer.base.bias.detach(), layer.idx
    A = F.one_hot(idx, m).double()
    prev = (layer.B_prev @ F.one_hot(layer.A_prev, m).double()).detach()
    x0, B0 = torch.randn(2, m, dtype=torch.double), layer.B.detach().clone()

    def ours(x, B):
        with torch.no_grad():
            layer.B.copy_(B)
        layer.B.grad = None
        return torch.tanh(layer(x)).pow(2).sum()

    def dense(x, B):
        return torch.tanh(x @ W0.t() + b + x @ prev.t() + layer.scale * (x @ A.t()) @ B.t()).pow(2).sum()

    reference = torch.autograd.functional.hessian(dense, (x0, B0))
    # ours through the layer's own parameter: differentiate w.r.t. x and layer.B with double backward
    x = x0.clone().requires_grad_(True)
    with torch.no_grad():
        layer.B.copy_(B0)
    out = torch.tanh(layer(x)).pow(2).sum()
    gx, gB = torch.autograd.grad(out, (x, layer.B), create_graph=True)
    flat = torch.cat([gx.reshape(-1), gB.reshape(-1)])
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat[i], (x, layer.B), retain_graph=True)])
            for i in range(flat.numel())]
    H = torch.stack(rows)
    H_ref = torch.cat([torch.cat([reference[i][j].reshape(flat[:x.numel()].numel() if i == 0 else B0.numel(), -1)
                                  for j in range(2)], dim=1) for i in range(2)])
    torch.testing.assert_close(H, H_ref, rtol=1e-10, atol=1e-12)
    del ours


# -- reduced precision ------------------------------------------------------------------------------

PRECISIONS = {  # name -> (how the layer runs, relative tolerance of outputs and gradients vs float32)
    "bf16-autocast": 2e-2, "fp16-autocast": 4e-3, "bf16-weights": 2e-2, "fp16-weights": 4e-3,
}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _dense_reference(layer, x, g):
    """The dense formula in float32: y = x W0ᵀ + b + x A_prevᵀ B_prevᵀ + s (x Aᵀ) Bᵀ, with autograd grads."""
    n, m = layer.shape
    x = x.detach().clone().requires_grad_(True)
    B = layer.current_B().detach().clone().requires_grad_(True)
    A = (F.one_hot(layer.idx, m).float() if layer.spec.selector
         else layer.A.detach().clone().requires_grad_(layer.A.requires_grad))
    A_prev = F.one_hot(layer.A_prev, m).float() if layer.spec.selector else layer.A_prev
    y = F.linear(x, layer.base_weight().detach(), layer.base.bias) + (x @ A_prev.t()) @ layer.B_prev.t() \
        + layer.scale * (x @ A.t()) @ B.t()
    y.backward(g)
    return y.detach(), x.grad, B.grad, A.grad if A.requires_grad else None


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_layer_under_reduced_precision_matches_the_dense_formula(method, precision):
    torch.manual_seed(0)
    m, n, r = 64, 48, 8
    layer = AdaptedLinear(nn.Linear(m, n), METHODS[method].adapter, r, 16.0, chain_length=chain_length(method))
    randomise_links(layer)
    x, g = torch.randn(4, 10, m), torch.randn(4, 10, n)
    y_ref, gx_ref, gB_ref, gA_ref = _dense_reference(layer, x, g)
    half, how = HALF[precision[:4]], precision[5:]
    if how == "weights":
        run, x_in = copy.deepcopy(layer).to(half), x.to(half).requires_grad_(True)
        ctx = torch.autocast("cpu", enabled=False)
    else:
        run, x_in, ctx = layer, x.clone().requires_grad_(True), torch.autocast("cpu", dtype=half)
    with ctx:
        y = run(x_in)
    y.backward(g.to(y.dtype))
    tol = PRECISIONS[precision]
    assert y.dtype == half
    assert rel_err(y, y_ref) < tol and rel_err(x_in.grad, gx_ref) < tol, precision
    assert run.B.grad.dtype == run.B.dtype and rel_err(run.B.grad, gB_ref) < tol
    if gA_ref is not None:
        assert rel_err(run.A.grad, gA_ref) < tol


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_trains_a_step_under_bf16_autocast(method):
    """The paper trains in bf16: a training step under autocast, as accelerate runs it, for every method."""
    model = tiny("bert").train()
    adapters.apply(model, method, rank=4, alpha=8, chain_length=chain_length(method))
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(adapters.param_groups(model, 1e-2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**tiny_batch()).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in model.named_parameters() if n in params and not torch.equal(p, params[n])]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters())


# -- dropout ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", SELECTOR_METHODS)
def test_dropout_is_the_same_on_the_gather_and_dense_paths(method):
    torch.manual_seed(0)
    m, n, r, p = 40, 24, 4, 0.3
    layer = AdaptedLinear(nn.Linear(m, n), METHODS[method].adapter, r, 8.0, chain_length=chain_length(method),
                          dropout=p).train()
    randomise_links(layer)
    x = torch.randn(3, 5, m)
    torch.manual_seed(7)
    y = layer(x)
    y.sum().backward()
    torch.manual_seed(7)
    mask = dropout_mask(x, p)
    B = layer.current_B().detach().clone().requires_grad_(True)
    prev = (x @ F.one_hot(layer.A_prev, m).float().t()) @ layer.B_prev.t()
    y_ref = layer.base(x) + prev + layer.scale * ((x * mask) @ F.one_hot(layer.idx, m).float().t()) @ B.t()
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.B.grad, B.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.eval()(x), layer.base(x) + prev + layer._low_rank(x, layer.idx, layer.current_B(),
                                                                                 layer.scale))  # eval: no dropout


def test_lora_dropout_matches_peft():
    import peft
    ours, theirs = tiny("bert"), tiny("bert")
    adapters.apply(ours, "lora", rank=4, alpha=8, seed=3, dropout=0.3)
    targets = adapters.resolve_targets(theirs)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         lora_dropout=0.3, modules_to_save=["classifier"]))
    layers = dict(ours.named_modules())
    with torch.no_grad():
        for name in targets:
            B = torch.randn_like(layers[name].B)
            layers[name].B.copy_(B)
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layers[name].A)
            peft_layer.lora_B["default"].weight.copy_(B)
        theirs.base_model.model.classifier.modules_to_save["default"].load_state_dict(ours.classifier.state_dict())
    ours.train(), theirs.train()
    batch = tiny_batch()
    torch.manual_seed(11)
    a = ours(**batch).logits
    torch.manual_seed(11)
    b = theirs(**batch).logits
    torch.manual_seed(12)
    c = ours(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c)  # the masks really are random


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_no_dropout_draws_no_random_numbers(method):
    """dropout=0 (the default) leaves the RNG untouched, so runs without dropout are as before."""
    layer = AdaptedLinear(nn.Linear(16, 8), METHODS[method].adapter, 2, 4.0).train()
    state = torch.get_rng_state()
    layer(torch.ones(2, 16))
    assert torch.equal(torch.get_rng_state(), state)


# -- the selectors' windows -------------------------------------------------------------------------

@pytest.mark.parametrize("m,r", [(40, 16), (384, 16), (32, 16), (10, 3), (50, 7)])
def test_rc3la_windows_cover_min_kr_m_distinct_columns(m, r):
    n_windows = -(-m // r)
    for seed in range(12):
        windows = [random_window(m, r, j, seed).tolist() for j in range(2 * n_windows + 1)]
        for k in range(1, len(windows) + 1):
            covered = {c for w in windows[:k] for c in w}
            assert len(covered) == min(k * r, m), (m, r, seed, k)
        assert all(len(set(w)) == r and all(0 <= c < m for c in w) for w in windows)


def test_rc3la_windows_are_random_seeded_and_without_replacement():
    m, r = 384, 16  # MiniLM's hidden size: 24 disjoint windows
    orders = [[random_window(m, r, j, seed)[0].item() // r for j in range(m // r)] for seed in range(20)]
    assert all(sorted(o) == list(range(m // r)) for o in orders)  # each cycle: every window exactly once
    assert len({tuple(o) for o in orders}) == 20  # a different order per seed
    assert len({o[0] for o in orders}) >= 8  # the first window itself is random, not always window 0
    assert orders[3] == [random_window(m, r, j, 3)[0].item() // r for j in range(m // r)]  # seeded


@pytest.mark.parametrize("seed", range(6))
def test_rc3la_update_covers_kr_columns_when_r_does_not_divide_m(seed):
    layer = AdaptedLinear(nn.Linear(40, 8), METHODS["rc3la"].adapter, 16, 16.0, chain_length=2,
                          seed=adapters.methods.layer_seed(seed, "layer"))
    randomise_links(layer)
    assert int((layer.delta_weight().abs().sum(0) > 0).sum()) == 32


# -- LoRA+ and LoRA's initialisation ----------------------------------------------------------------

EXPECTED_LR_RATIO = {"lora_plus": 16.0}  # docs/METHODS.md: lr_B = λ·lr_A with λ = 16; every other method: 1
EXPECTED_HEAD_LR_MULT = {"fft": 10.0, "head": 10.0}  # the paper: the head at 10× lr under fft and head-only


@pytest.mark.parametrize("method", ALL_METHODS)
def test_param_groups_give_b_its_lr_ratio_and_the_head_its_multiplier(method):
    model = adapters.apply(tiny("bert"), method, rank=4, alpha=8, chain_length=chain_length(method))
    lr = 1e-3
    kind = {id(layer.B): "B" for layer in adapters.inject.adapted_layers(model).values()}
    kind.update({id(p): "head" for p in model.classifier.parameters()})
    expected = {"B": lr * EXPECTED_LR_RATIO.get(method, 1.0), "head": lr * EXPECTED_HEAD_LR_MULT.get(method, 1.0),
                "rest": lr}
    groups = adapters.param_groups(model, lr)
    for group in groups:
        kinds = {kind.get(id(p), "rest") for p in group["params"]}
        assert len(kinds) == 1  # B factors, the head and everything else are never mixed in one group
        assert group["lr"] == pytest.approx(expected[kinds.pop()], rel=1e-12)
    overridden = adapters.param_groups(model, lr, head_lr_mult=3.0)
    assert any(g["lr"] == pytest.approx(3 * lr) for g in overridden)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable


def test_lora_a_init_is_peft_kaiming_uniform():
    """U(−1/√m, 1/√m): kaiming_uniform(a=√5) as PEFT draws it, checked against PEFT's own A."""
    import peft
    m, r = 512, 64
    ours = kaiming_a(m, r, 0, seed=0)
    peft_model = peft.get_peft_model(nn.Sequential(nn.Linear(m, 8)), peft.LoraConfig(r=r, target_modules=["0"]))
    theirs = peft_model.base_model.model[0].lora_A["default"].weight.detach()
    bound = 1 / math.sqrt(m)
    for A in (ours, theirs):
        assert A.abs().max() <= bound and A.abs().max() > 0.999 * bound
        assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # uniform, not normal
        assert A.mean().abs() < 0.01 * bound
    assert not torch.equal(ours, kaiming_a(m, r, 1, seed=0))  # a fresh draw per link
