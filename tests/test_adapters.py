"""The methods of docs/METHODS.md, proven from outputs, gradients and weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapters
from adapters.layers import dense_linear, gather_linear
from adapters.methods import METHODS
from tests.conftest import tiny, tiny_batch

ADAPTER_METHODS = [n for n, m in METHODS.items() if m.adapter is not None]
CHAINED = [n for n, m in METHODS.items() if m.adapter is not None and m.adapter.chained]


def train_steps(model, steps=3, lr=1e-2, optimizer=None, seed=0, on_step=None):
    """A few AdamW steps (no weight decay) on fixed tiny batches; returns the optimizer."""
    opt = optimizer or torch.optim.AdamW(adapters.param_groups(model, lr), weight_decay=0.0)
    for step in range(steps):
        loss = model(**tiny_batch(seed=seed + step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step:
            on_step(step)
    return opt


# -- the sparse path --------------------------------------------------------------------------------

def test_gather_is_bit_identical_to_dense_selector_matmul():
    """Same op for op: x @ onehot(idx)ᵀ is exactly x[..., idx], then the same matmul, scale and autograd formulas."""
    torch.manual_seed(0)
    m, n, r, s = 48, 20, 6, 2.5
    idx = torch.randperm(m)[:r]
    A = F.one_hot(idx, m).float()
    x = torch.randn(3, 11, m, requires_grad=True)
    B1 = torch.randn(n, r, requires_grad=True)
    B2 = B1.detach().clone().requires_grad_(True)
    y_sparse = gather_linear(x, idx, B1, s)
    y_dense = dense_linear(x, A, B2, s)
    assert torch.equal(y_sparse, y_dense)
    g = torch.randn_like(y_dense)
    (gx_sparse,) = torch.autograd.grad(y_sparse, x, g, retain_graph=True)
    (gx_dense,) = torch.autograd.grad(y_dense, x, g, retain_graph=True)
    y_sparse.backward(g)
    y_dense.backward(g)
    assert torch.equal(B1.grad, B2.grad)
    torch.testing.assert_close(gx_sparse, gx_dense, rtol=0, atol=1e-6)
    # and both equal the closed form dB = s · gᵀ x[..., idx]
    torch.testing.assert_close(B1.grad, s * g.reshape(-1, n).t() @ x.detach()[..., idx].reshape(-1, r))


@pytest.mark.parametrize("method,link", [("cla", 0), ("c3la", 2), ("paca", 0)])
def test_fused_selector_layer_matches_the_dense_formula(method, link):
    """The layer's one-node path (frozen base + folded links + gather) against base(x) + Σ dense links."""
    torch.manual_seed(0)
    m, n, r, s = 40, 24, 4, 2.0
    base = nn.Linear(m, n)
    layer = adapters.layers.AdaptedLinear(base, METHODS[method].adapter, r, r * s, chain_length=3)
    for _ in range(link):
        with torch.no_grad():
            layer.B.normal_()
        layer.next_link()
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 5, m, requires_grad=True)
    y = layer(x)
    B_ref = layer.current_B().detach().clone().requires_grad_(True)
    A_ref = F.one_hot(layer.idx, m).float()
    x_ref = x.detach().clone().requires_grad_(True)
    prev = dense_linear(x_ref, F.one_hot(layer.A_prev, m).float(), layer.B_prev) if link else 0
    y_ref = base(x_ref) + prev + dense_linear(x_ref, A_ref, B_ref, layer.scale)
    assert torch.equal(y, y_ref) if link == 0 else torch.allclose(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    # dB: the fused node's own s·gᵀ x[..., idx] against autograd's matmul backward: the same sum, possibly in
    # another BLAS kernel order, so a float32 tolerance (not bitwise; see the module docstring of layers.py).
    torch.testing.assert_close(layer.B.grad, B_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def _saved_bytes(fn):
    """Bytes of every tensor autograd saves for backward while running fn (each storage once)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


SELECTOR_METHODS = [n for n, m in METHODS.items() if m.adapter is not None and m.adapter.selector]


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("method", SELECTOR_METHODS)
def test_selector_layer_forward_saves_r_over_m_of_the_input(method, dropout):
    """The path forward really takes (fused node, dropout, folded links) keeps r of the m input columns."""
    torch.manual_seed(0)
    m, n, r = 256, 64, 8
    k = 3 if METHODS[method].adapter.chained else 1
    layer = adapters.layers.AdaptedLinear(nn.Linear(m, n), METHODS[method].adapter, r, 16, chain_length=k,
                                          dropout=dropout).train()
    for _ in range(k - 1):
        layer.next_link()  # folded links run too
    x = torch.randn(16, 32, m, requires_grad=True)
    seen = {}

    def pack(t):
        if t.shape[:-1] == x.shape[:-1]:  # activations (batch × tokens × features), not W0, B or selectors
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    x_bytes = x.numel() * 4
    # x[..., idx] for dB, and with dropout the r gathered columns of its mask: never x itself.
    assert sum(seen.values()) == x_bytes * r // m * (2 if dropout else 1)
    assert max(seen.values()) == x_bytes * r // m


def test_lora_keeps_the_full_input_where_cla_keeps_r_columns():
    """The baseline the saving is measured against: LoRA's dA needs all of x."""
    torch.manual_seed(0)
    m, n, r = 256, 64, 8
    x = torch.randn(16, 32, m, requires_grad=True)
    layer = adapters.layers.AdaptedLinear(nn.Linear(m, n), METHODS["lora"].adapter, r, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(x)
    assert x.numel() in saved


# -- equivalences -----------------------------------------------------------------------------------

def test_our_lora_equals_peft_lora_outputs_and_gradients():
    import peft
    ours, theirs = tiny("bert"), tiny("bert")
    adapters.apply(ours, "lora", rank=4, alpha=8, seed=3)
    targets = adapters.resolve_targets(theirs)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         lora_dropout=0.0, modules_to_save=["classifier"]))
    layers = dict(ours.named_modules())
    torch.manual_seed(1)
    with torch.no_grad():
        for name in targets:
            B = torch.randn_like(layers[name].B)  # non-zero B so the gradient of A is non-trivial
            layers[name].B.copy_(B)
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layers[name].A)
            peft_layer.lora_B["default"].weight.copy_(B)
        theirs.base_model.model.classifier.modules_to_save["default"].load_state_dict(ours.classifier.state_dict())
    batch = tiny_batch()
    out_ours, out_theirs = ours(**batch), theirs(**batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=0, atol=1e-6)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name in targets:
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layers[name].A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layers[name].B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)


def test_dpaca_and_cla_have_identical_trajectories_under_adam():
    cla, dpaca = tiny("bert"), tiny("bert")
    adapters.apply(cla, "cla", rank=4, alpha=8)
    adapters.apply(dpaca, "dpaca", rank=4, alpha=8)
    train_steps(cla, steps=5)
    train_steps(dpaca, steps=5)
    W_cla, W_dpaca = adapters.delta_weights(cla), adapters.delta_weights(dpaca)
    base = adapters.base_weights(cla)
    for name in W_cla:
        assert W_cla[name].abs().sum() > 0
        torch.testing.assert_close(W_cla[name], W_dpaca[name], rtol=1e-4, atol=1e-6)
        # dPaCA's weight columns are s·P: compare the actual weights, not only the update.
        layer = dict(dpaca.named_modules())[name]
        torch.testing.assert_close(layer.scale * layer.B.detach(), base[name][:, :4] + W_cla[name][:, :4],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chained,twin", [("cola", "lora"), ("rac", "asym"), ("c3la", "cla")])
def test_chain_length_one_is_the_non_chained_twin(chained, twin):
    a, b = tiny("bert"), tiny("bert")
    adapters.apply(a, chained, rank=4, alpha=8, chain_length=1, seed=5)
    adapters.apply(b, twin, rank=4, alpha=8, seed=5)
    train_steps(a)
    train_steps(b)
    da, db = adapters.delta_weights(a), adapters.delta_weights(b)
    assert all(torch.equal(da[n], db[n]) for n in da)
    assert adapters.trained_parameters(a) == adapters.trained_parameters(b)


def test_rc3la_with_one_link_is_a_random_window():
    model = adapters.apply(tiny("bert"), "rc3la", rank=4, alpha=8, chain_length=1, seed=1)
    for cols in adapters.selectors(model).values():
        (c,) = cols
        assert c[0] % 4 == 0 and c == list(range(c[0], c[0] + 4))


# -- chaining, from the weights ---------------------------------------------------------------------

def _run_chain(method, k, steps_per_link=2, **kw):
    model = adapters.apply(tiny("bert"), method, rank=4, alpha=8, chain_length=k, seed=0, **kw)
    opt, snapshots = None, []
    for link in range(k):
        opt = train_steps(model, steps_per_link, optimizer=opt, seed=10 * link)
        snapshots.append(adapters.delta_weights(model))
        if link < k - 1:
            adapters.next_link(model, opt)
    return model, snapshots


def test_c3la_update_lives_exactly_on_its_windows_columns():
    k, r = 3, 4
    model, snapshots = _run_chain("c3la", k)
    for name, delta in snapshots[-1].items():
        nonzero_cols = (delta.abs().sum(0) > 0).nonzero().flatten().tolist()
        assert nonzero_cols == list(range(k * r)), name
        assert adapters.selectors(model)[name] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_c3la_windows_wrap_when_the_chain_is_longer_than_the_layer():
    model = adapters.apply(tiny("bert"), "c3la", rank=16, alpha=8, chain_length=3)
    opt = None
    for link in range(3):
        opt = train_steps(model, 1, optimizer=opt)
        if link < 2:
            adapters.next_link(model, opt)
    cols = next(iter(adapters.selectors(model).values()))
    assert cols[2] == list(range(0, 16))  # m = 32: link 3 revisits the first window
    delta = next(iter(adapters.delta_weights(model).values()))
    assert (delta.abs().sum(0) > 0).all()


def test_each_link_is_kept_after_the_next_link_trains():
    for method in CHAINED:
        model, snapshots = _run_chain(method, 3)
        for name in snapshots[0]:
            layer = dict(model.named_modules())[name]
            B_cat, A_cat = layer.factors()
            r = layer.r
            # link 1's folded factors reproduce the update at the end of link 1, after links 2 and 3 trained
            torch.testing.assert_close(B_cat[:, :r] @ A_cat[:r], snapshots[0][name], rtol=0, atol=1e-7)
            link2 = B_cat[:, r:2 * r] @ A_cat[r:2 * r]
            torch.testing.assert_close(snapshots[0][name] + link2, snapshots[1][name], rtol=1e-6, atol=1e-7)
            assert link2.abs().sum() > 0 and (B_cat[:, 2 * r:] @ A_cat[2 * r:]).abs().sum() > 0, method


def test_cola_update_has_rank_above_r():
    model, snapshots = _run_chain("cola", 3)
    for delta in snapshots[-1].values():
        assert torch.linalg.matrix_rank(delta) > 4


def test_rac_draws_a_new_frozen_A_each_link():
    model = adapters.apply(tiny("bert"), "rac", rank=4, alpha=8, chain_length=3)
    layer = next(iter(adapters.inject.adapted_layers(model).values()))
    assert not layer.A.requires_grad
    seen = [layer.A.detach().clone()]
    opt = None
    for _ in range(2):
        opt = train_steps(model, 2, optimizer=opt)
        assert torch.equal(layer.A, seen[-1])  # frozen while the link trains
        adapters.next_link(model, opt)
        seen.append(layer.A.detach().clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    B_cat, A_cat = layer.factors()
    assert torch.equal(A_cat[:4], seen[0]) and torch.equal(A_cat[4:8], seen[1])


def test_next_link_resets_optimizer_state_and_b():
    model = adapters.apply(tiny("bert"), "cola", rank=4, alpha=8, chain_length=2)
    opt = train_steps(model, 2)
    layer = next(iter(adapters.inject.adapted_layers(model).values()))
    assert layer.B in opt.state and layer.B.abs().sum() > 0
    adapters.next_link(model, opt)
    assert layer.B not in opt.state and layer.A not in opt.state
    assert layer.B.abs().sum() == 0
    with pytest.raises(adapters.AdapterError, match="links of the chain are used"):
        adapters.next_link(model, opt)


# -- selectors --------------------------------------------------------------------------------------

def test_rcla_selectors_distinct_seeded_and_different_across_seeds():
    def sel(seed):
        return adapters.selectors(adapters.apply(tiny("bert"), "rcla", rank=8, alpha=8, seed=seed))
    a, b, c = sel(0), sel(0), sel(1)
    assert a == b and a != c
    for (cols,) in a.values():
        assert len(set(cols)) == 8 and all(0 <= i < 32 for i in cols)
    assert len({tuple(cols[0]) for cols in a.values()}) > 1  # drawn per layer


# -- counts -----------------------------------------------------------------------------------------

FORMULA = {  # docs/METHODS.md, per adapted layer (m, n), rank r, chain length k
    "lora": lambda m, n, r, k: r * (m + n), "lora_plus": lambda m, n, r, k: r * (m + n),
    "asym": lambda m, n, r, k: r * n, "cla": lambda m, n, r, k: r * n, "rcla": lambda m, n, r, k: r * n,
    "paca": lambda m, n, r, k: r * n, "dpaca": lambda m, n, r, k: r * n,
    "cola": lambda m, n, r, k: k * r * (m + n), "rac": lambda m, n, r, k: k * r * n,
    "c3la": lambda m, n, r, k: k * r * n, "rc3la": lambda m, n, r, k: k * r * n,
}


@pytest.mark.parametrize("method", ADAPTER_METHODS + ["fft", "head"])
def test_trained_scalar_counts_match_the_formulas(method):
    k = 3 if method in CHAINED else 1
    model = tiny("bert")
    n_head = sum(p.numel() for p in model.classifier.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    adapters.apply(model, method, rank=4, alpha=8, chain_length=k,
                   targets=None if METHODS[method].adapter is None else "all-linear")
    counts = adapters.trained_parameters(model)
    assert counts["head"] == n_head
    if method == "fft":
        assert counts["total"] == n_all and counts["adapter"] == 0
        assert sum(l["trained"] for l in counts["layers"]) == sum(
            p.numel() for name, mod in model.named_modules() if isinstance(mod, nn.Linear)
            and not name.startswith("classifier") for p in mod.parameters())
    elif method == "head":
        assert counts["total"] == n_head and counts["layers"] == []
    else:
        assert len(counts["layers"]) == 2 * 6 + 1  # q, k, v, attn out, ffn in, ffn out per layer; pooler
        for layer in counts["layers"]:
            assert layer["trained"] == FORMULA[method](layer["m"], layer["n"], 4, k)
        assert counts["adapter"] == sum(FORMULA[method](l["m"], l["n"], 4, k) for l in counts["layers"])
        # from the tensors themselves: one link's trainable scalars times k, plus the head
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counts["total"] == (trainable - n_head) * k + n_head == counts["adapter"] + n_head


# -- injection --------------------------------------------------------------------------------------

def test_targets_by_exact_name_suffix_regex_and_all_linear():
    model = tiny("bert")
    exact = "bert.encoder.layer.1.attention.self.query"
    assert adapters.resolve_targets(model, [exact]) == [exact]
    assert adapters.resolve_targets(model, "value") == [f"bert.encoder.layer.{i}.attention.self.value" for i in (0, 1)]
    assert adapters.resolve_targets(model, r".*layer\.0\..*dense") == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense"]
    all_linear = adapters.resolve_targets(model, "all-linear", head=["classifier"])
    assert len(all_linear) == 13 and "classifier" not in all_linear  # 12 encoder + pooler


@pytest.mark.parametrize("family,expected", [("bert", ["query", "value"]), ("gpt2", ["c_attn"]),
                                             ("llama", ["q_proj", "v_proj"])])
def test_default_targets_per_family_and_merged_equivalence(family, expected):
    """ΔW from delta_weights, merged into W0 (Conv1D: transposed), reproduces the adapted model's output."""
    model = tiny(family)
    adapters.apply(model, "rcla", rank=4, alpha=8)
    names = model.adapter_settings["targets"]
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == sorted(expected) and len(names) == 2 * len(expected)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in adapters.inject.adapted_layers(model).values():
            layer.B.normal_()
    batch = tiny_batch()
    with torch.no_grad():
        adapted = model(**batch).logits
        merged = tiny(family)
        for name, delta in adapters.delta_weights(model).items():
            w = merged.get_submodule(name).weight
            w += delta.t() if family == "gpt2" else delta
        assert not torch.allclose(adapted, tiny(family)(**batch).logits)
        torch.testing.assert_close(adapted, merged(**batch).logits, rtol=1e-5, atol=1e-5)


def test_only_the_method_and_head_train():
    model = adapters.apply(tiny("bert"), "cla", rank=4, alpha=8)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in names if n.endswith(".B") or n.startswith("classifier.")}
    assert len([n for n in names if n.endswith(".B")]) == 4


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(method="lorax"), "unknown method 'lorax'"),
    (dict(method="cla", rank=64), "rank 64 is larger than layer"),
    (dict(method="cla", targets=["nope"]), "target 'nope' matches no linear layer"),
    (dict(method="c3la", chain_length=0), "chain_length must be an integer >= 1"),
    (dict(method="cla", chain_length=2), "not chained"),
])
def test_bad_input_names_the_problem(kwargs, message):
    with pytest.raises(adapters.AdapterError, match=message):
        adapters.apply(tiny("bert"), **kwargs)


# -- plumbing: weight orientation and module replacement --------------------------------------------

def test_a_conv1d_and_a_linear_give_the_same_out_in_weight():
    """GPT-2's Conv1D(nf=n, nx=m) stores W in×out, nn.Linear(m, n) out×in: both come out n×m, the matrix the layer
    applies (y = x Wᵀ + b), and a shape turns as the tensor does."""
    from transformers.pytorch_utils import Conv1D
    from adapters.layers import as_out_in, is_transposed, out_in_weight
    torch.manual_seed(0)
    conv, lin = Conv1D(5, 3), nn.Linear(3, 5)
    assert is_transposed(conv) and not is_transposed(lin)
    x = torch.randn(2, 3)
    for layer in (conv, lin):
        W = out_in_weight(layer)
        assert W.shape == (5, 3) and W.data_ptr() == layer.weight.data_ptr()  # a view, not a copy
        torch.testing.assert_close(layer(x), x @ W.t() + layer.bias)
    assert as_out_in((3, 5), True) == (5, 3) and as_out_in((5, 3), False) == (5, 3)


def test_replace_module_puts_a_module_at_a_dotted_name_and_at_the_top():
    from adapters.inject import owner, replace_module
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    new, top = nn.Identity(), nn.Tanh()
    replace_module(model, "1.1", new)
    assert model.get_submodule("1.1") is new and isinstance(model[1][0], nn.ReLU)
    replace_module(model, "0", top)
    assert model[0] is top
    assert owner(model, "1.0") == (model[1], "0") and owner(model, "0") == (model, "0")
