"""bounds math: MI bound, Theorem 1 closed form vs 2^L enumeration / recursion / exact rationals,
the derived bound vs measured sigmoid MLPs (and the literal rule's failure), low-rank spectral norm."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import bounds
from adapters.errors import AdapterError
from bounds.theorem1 import theorem1_bruteforce


# -- MI bound and counts ---------------------------------------------------------------------------

def test_mi_bound_closed_form():
    # sqrt(2 q σ² ln2 P / N) written out by hand for one case: q=32, σ=0.5, P=1000, N=64.
    expected = math.sqrt(2 * 32 * 0.25 * 0.6931471805599453 * 1000 / 64)
    assert bounds.mi_bound(1000, 64, 0.5, 32) == pytest.approx(expected, rel=1e-15)
    assert bounds.mi_bound(0, 10, 1.0, 16) == 0.0
    # Scaling: ∝ σ, ∝ sqrt(P q / N).
    assert bounds.mi_bound(400, 100, 2.0, 8) == pytest.approx(4 * bounds.mi_bound(100, 100, 1.0, 8))


@pytest.mark.parametrize("bad", [dict(sigma=0), dict(sigma=-1), dict(bits=0), dict(bits=-4), dict(n=0),
                                 dict(P=-1), dict(P=1.5), dict(sigma=math.inf)])
def test_mi_bound_rejects_bad_input(bad):
    args = dict(P=10, n=10, sigma=1.0, bits=32) | bad
    with pytest.raises(AdapterError):
        bounds.mi_bound(args["P"], args["n"], args["sigma"], args["bits"])


LAYERS = [(384, 384), (384, 1536), (1536, 384)]  # (m_i in, n_i out)
M, N = sum(m for m, _ in LAYERS), sum(n for _, n in LAYERS)


@pytest.mark.parametrize("method,k,expected", [
    # docs/METHODS.md "Trainable-parameter counts", written out: r = 8, k = 3.
    ("lora", 3, 8 * (M + N)), ("lora_plus", 1, 8 * (M + N)),
    ("asym", 1, 8 * N), ("cla", 3, 8 * N), ("rcla", 1, 8 * N), ("paca", 1, 8 * N), ("dpaca", 1, 8 * N),
    ("cola", 3, 3 * 8 * (M + N)), ("rac", 3, 3 * 8 * N), ("c3la", 3, 3 * 8 * N), ("rc3la", 3, 3 * 8 * N),
    ("fft", 1, 384 * 384 + 384 * 1536 + 1536 * 384), ("head", 1, 0),
])
def test_formula_parameters(method, k, expected):
    assert bounds.formula_parameters(method, 8, k, LAYERS) == expected


def test_formula_parameters_rejects_unknown_method():
    with pytest.raises(AdapterError, match="unknown method"):
        bounds.formula_parameters("c3a", 8, 1, LAYERS)


# -- Theorem 1: closed form vs the 2^L definition --------------------------------------------------

def _random_net(rng, L):
    return dict(base_norms=rng.uniform(0.3, 3.0, L), delta_norms=rng.uniform(0.01, 2.0, L),
                act_lipschitz=rng.uniform(0.2, 1.5, L), act_zero_norms=rng.uniform(0.0, 2.0, L),
                input_bound=rng.uniform(0.5, 3.0), loss_lipschitz=rng.uniform(0.5, 2.0))


@pytest.mark.parametrize("convention", ["derived", "literal"])
@pytest.mark.parametrize("L", range(1, 13))
def test_theorem1_equals_bruteforce(L, convention):
    rng = np.random.default_rng(1000 * L + (convention == "literal"))
    for _ in range(3):
        net = _random_net(rng, L)
        got = bounds.theorem1(**net, convention=convention)
        ref = theorem1_bruteforce(**net, convention=convention)
        assert got["phi_delta"] == pytest.approx(ref["phi_delta"], rel=1e-12)
        assert got["phi_base"] == pytest.approx(ref["phi_base"], rel=1e-12)
        assert got["log10_phi_delta"] == pytest.approx(math.log10(ref["phi_delta"]), rel=1e-12, abs=1e-13)


def test_conventions_differ_only_in_offsets():
    rng = np.random.default_rng(7)
    net = _random_net(rng, 6)
    d, lit = bounds.theorem1(**net), bounds.theorem1(**net, convention="literal")
    assert abs(d["phi_delta"] - lit["phi_delta"]) > 1e-6 * d["phi_delta"]
    net["act_zero_norms"] = np.zeros(6)  # no offsets: both rules agree
    d, lit = bounds.theorem1(**net), bounds.theorem1(**net, convention="literal")
    assert d["phi_delta"] == lit["phi_delta"] and d["phi_base"] == lit["phi_base"]


def test_theorem1_equals_unrolled_recursion():
    """Derived form = the recursion D_l ≤ λ_l[(a_l+b_l) D_{l−1} + b_l H_{l−1}], H_l ≤ λ_l a_l H_{l−1} + s_l."""
    rng = np.random.default_rng(3)
    for L in (1, 2, 5, 30):
        net = _random_net(rng, L)
        a, b, lam, s = net["base_norms"], net["delta_norms"], net["act_lipschitz"], net["act_zero_norms"]
        for key, x, y in (("phi_delta", a, b), ("phi_base", b, a)):  # Φ_W0: roles of W0 and ΔW swapped
            D, H = 0.0, net["input_bound"]
            for l in range(L):
                D, H = lam[l] * ((x[l] + y[l]) * D + y[l] * H), lam[l] * x[l] * H + s[l]
            assert bounds.theorem1(**net)[key] == pytest.approx(2 * net["loss_lipschitz"] * D, rel=1e-12)


def test_theorem1_edge_cases():
    one = dict(act_lipschitz=1.0, act_zero_norms=0.0, input_bound=1.0, loss_lipschitz=1.0)
    # ΔW = 0: Φ_ΔW = 0 exactly (log10 = −inf); Φ_W0 = 2 Π a.
    r = bounds.theorem1([2.0, 3.0], [0.0, 0.0], **one)
    assert r["phi_delta"] == 0.0 and r["log10_phi_delta"] == -math.inf
    assert r["phi_base"] == pytest.approx(12.0)
    # W0 = 0 in one layer: A = 0, T − A = T.
    r = bounds.theorem1([0.0, 3.0], [0.5, 1.0], **one)
    assert r["phi_delta"] == pytest.approx(2 * 0.5 * 4.0)
    with pytest.raises(AdapterError):
        bounds.theorem1([1.0, 2.0], [1.0], **one)
    with pytest.raises(AdapterError):
        bounds.theorem1([1.0], [-1.0], **one)
    with pytest.raises(AdapterError):
        bounds.theorem1([1.0], [1.0], **one, convention="printed")


def test_theorem1_log_space_matches_exact_rationals_where_floats_overflow():
    """L = 500, b/a ~ 1e-4: log-space result vs exact Fraction arithmetic, to 1e-9 relative."""
    rng = np.random.default_rng(11)
    L = 500
    a = rng.uniform(2.0, 8.0, L)
    b = a * rng.uniform(0.5e-4, 1.5e-4, L)
    lam = rng.uniform(0.5, 1.5, L)
    s = rng.uniform(0.1, 1.0, L)
    C, Ll = 1.5, 1.25
    fa, fb, fl, fs = ([Fraction(float(v)) for v in arr] for arr in (a, b, lam, s))
    # Exact suffix products over the top p layers (T_p, A_p, B_p, Λ_p) and the two offset sums.
    T = A = B = Lam = Fraction(1)
    off = {"a": Fraction(0), "b": Fraction(0)}  # Σ_{p<L} s_{L−p} Λ_p (T_p − A_p), same with B_p
    for p in range(1, L + 1):
        l = L - p  # 0-based index of the layer joining the suffix
        T, A, B, Lam = T * (fa[l] + fb[l]), A * fa[l], B * fb[l], Lam * fl[l]
        if p < L:
            off["a"] += fs[L - p - 1] * Lam * (T - A)
            off["b"] += fs[L - p - 1] * Lam * (T - B)
    exact = {("derived", "delta"): (T - A, "a"), ("derived", "base"): (T - B, "b"),
             ("literal", "delta"): (T - A, "b"), ("literal", "base"): (T - B, "a")}
    for (convention, key), (main, offset) in exact.items():
        got = bounds.theorem1(a, b, lam, s, C, Ll, convention)
        phi = 2 * Fraction(Ll) * (Fraction(C) * Lam * main + off[offset])
        log10_exact = math.log10(phi.numerator) - math.log10(phi.denominator)
        assert got[f"phi_{key}"] == math.inf  # the float value overflows...
        assert abs(got[f"log10_phi_{key}"] - log10_exact) * math.log(10) < 1e-9  # ...the log does not
        assert abs(got[f"log10_phi_{key}"] / log10_exact - 1) < 1e-9
    with np.errstate(over="ignore"):
        assert np.prod(a) == np.inf  # the naive product overflows


# -- the derived bound on real networks; the literal rule's failure ------------------------------

def _sigmoid_mlp_gap(seed, L, width, w_scale, d_scale, C, starts=256, steps=40):
    """(max over sampled ‖x‖ ≤ C of ‖f_{W0+ΔW}(x) − f_{W0}(x)‖, a, b, s) for a random bias-free sigmoid MLP.

    The sup is estimated by random points in the ball plus projected gradient ascent from them,
    so the estimate is a lower bound on the true sup: any value above a bound disproves the bound.
    """
    g = torch.Generator().manual_seed(seed)
    W0 = [torch.randn(width, width, generator=g, dtype=torch.float64) * w_scale / width ** 0.5 for _ in range(L)]
    dW = [torch.randn(width, width, generator=g, dtype=torch.float64) * d_scale / width ** 0.5 for _ in range(L)]
    W1 = [w + d for w, d in zip(W0, dW)]

    def f(Ws, x):
        for W in Ws:
            x = torch.sigmoid(x @ W.T)
        return x

    x = torch.randn(starts, width, generator=g, dtype=torch.float64)
    radius = C * torch.rand(starts, 1, generator=g, dtype=torch.float64) ** (1 / width)
    x = torch.cat([x / x.norm(dim=1, keepdim=True) * radius, torch.zeros(1, width, dtype=torch.float64)])
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    best = 0.0
    for _ in range(steps):
        gap = (f(W1, x) - f(W0, x)).norm(dim=1)
        best = max(best, gap.max().item())
        opt.zero_grad()
        (-gap.sum()).backward()
        opt.step()
        with torch.no_grad():  # project back onto the ball ‖x‖ ≤ C
            x.mul_(torch.clamp(C / x.norm(dim=1, keepdim=True).clamp_min(1e-300), max=1.0))
    norm = lambda W: torch.linalg.matrix_norm(W, ord=2).item()  # noqa: E731
    s = [0.5 * width ** 0.5] * L  # ‖sigmoid(0)‖ = 0.5·sqrt(width)
    return best, [norm(W) for W in W0], [norm(W) for W in dW], s


REGIMES = [(1.0, 1.0, 1.0), (0.1, 3.0, 0.1), (2.0, 0.1, 1.0), (0.3, 2.0, 0.5), (3.0, 3.0, 2.0)]


def test_derived_bound_holds_on_random_sigmoid_mlps():
    checked = 0
    for seed in range(6):
        for w_scale, d_scale, C in REGIMES:
            L = 2 + seed % 4
            gap, a, b, s = _sigmoid_mlp_gap(seed, L, 6, w_scale, d_scale, C)
            bound = bounds.theorem1(a, b, 0.25, s, C, loss_lipschitz=1.0)["phi_delta"] / 2  # Φ_ΔW / (2 L_ℓ)
            assert 0 < gap <= bound, (seed, w_scale, d_scale, C, gap, bound)
            checked += 1
    assert checked == 30


def test_literal_rule_is_violated_on_random_sigmoid_mlps():
    """Documented failure: with ‖ΔW‖ ≫ ‖W0‖ the printed offset rule (T_p − B_p) undershoots.

    Input x = 0 (C = 0): both networks see σ(0) after layer 1, then differ through ΔW, but the
    literal Φ_ΔW only sees Π_top(a+b) − Π_top b, which is tiny when a ≪ b.
    """
    violated = 0
    for seed in range(8):
        gap, a, b, s = _sigmoid_mlp_gap(seed, 4, 6, 0.05, 4.0, 0.0, starts=1, steps=1)
        literal = bounds.theorem1(a, b, 0.25, s, 0.0, 1.0, convention="literal")["phi_delta"] / 2
        derived = bounds.theorem1(a, b, 0.25, s, 0.0, 1.0)["phi_delta"] / 2
        assert gap <= derived
        violated += gap > literal
    assert violated == 8


# -- spectral norm of a low-rank product ----------------------------------------------------------

@pytest.mark.parametrize("n,m,r", [(64, 48, 4), (300, 200, 16), (10, 500, 12), (7, 5, 9), (1, 1, 1)])
def test_lowrank_spectral_norm_equals_dense(n, m, r):
    g = torch.Generator().manual_seed(n * m + r)
    B = torch.randn(n, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, m, generator=g, dtype=torch.float64)
    dense = torch.linalg.matrix_norm(B @ A, ord=2).item()
    assert bounds.lowrank_spectral_norm(B, A) == pytest.approx(dense, rel=1e-10)
    # float32 factors (as checkpoints store them) are promoted to float64 first.
    assert bounds.lowrank_spectral_norm(B.float(), A.float()) == pytest.approx(dense, rel=1e-6)


def test_lowrank_spectral_norm_of_selector_update():
    # cLA: A = [I_r | 0] selects columns, so ‖B A‖₂ = ‖B‖₂.
    B = torch.randn(20, 3, dtype=torch.float64)
    A = torch.zeros(3, 11, dtype=torch.float64)
    A[torch.arange(3), torch.tensor([4, 0, 9])] = 1.0
    assert bounds.lowrank_spectral_norm(B, A) == pytest.approx(torch.linalg.matrix_norm(B, ord=2).item(), rel=1e-12)
    with pytest.raises(AdapterError):
        bounds.lowrank_spectral_norm(B, A.T)
