"""Theorem 1 (composition bound) in closed form, O(L), in log space (docs/THEORY.md §2).

Network f(x) = σ_L(W^L ⋯ σ_1(W^1 x)), ‖x‖ ≤ C, loss L_ℓ-Lipschitz. With a_l = ‖W0^l‖₂,
b_l = ‖ΔW^l‖₂, λ_l = Lip(σ_l), s_l = ‖σ_l(0)‖, and products over all layers (Λ, T = Π(a+b),
A = Π a, B = Π b) or over the top p layers only (Λ_p, T_p, A_p, B_p):

    Φ_ΔW = 2 L_ℓ [ C Λ (T − A) + Σ_{p=1}^{L−1} s_{L−p} Λ_p (T_p − A_p) ]
    Φ_W0 = 2 L_ℓ [ C Λ (T − B) + Σ_{p=1}^{L−1} s_{L−p} Λ_p (T_p − B_p) ]

convention="literal" is the paper's printed offset rule F(i) (with the P(i, j) selector typo
corrected): its H(i, j) picks the opposite factor, giving (T_p − B_p) inside Φ_ΔW and
(T_p − A_p) inside Φ_W0. It is not a valid bound (tests/test_bounds_math.py shows violations).

Products of 70+ norms overflow and T − A cancels when b ≪ a, so everything is done in natural
logs: log(T − A) = Σ log a + log expm1(Σ log1p(b/a)).
"""
import math

import numpy as np

from adapters.errors import AdapterError

CONVENTIONS = ("derived", "literal")


def _log_expm1(u):
    """log(e^u − 1) for u ≥ 0 without overflow (u large) or cancellation (u small); −inf at 0."""
    u = np.asarray(u, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        small = np.log(np.expm1(np.minimum(u, 30.0)))
        large = u + np.log1p(-np.exp(-np.maximum(u, 30.0)))
    return np.where(u <= 30.0, small, large)


def suffix_log_prod_diff(x, y):
    """For p = 0..L: log( Π_{top p}(x+y) − Π_{top p} x ), x, y ≥ 0, in O(L).

    Index p counts layers from the top (p = L is the whole chain). Where some x_l = 0 in the
    suffix, Π x = 0 and the difference is just log Π(x+y).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    top_first = slice(None, None, -1)  # reverse so a cumulative sum runs over the top p layers
    xr, yr = x[top_first], y[top_first]
    zero = xr == 0
    with np.errstate(divide="ignore"):
        log_x = np.where(zero, 0.0, np.log(np.where(zero, 1.0, xr)))
        log_sum = np.log(xr + yr)
    ratio = np.where(zero, 0.0, np.log1p(yr / np.where(zero, 1.0, xr)))
    cum = lambda v: np.concatenate([[0.0], np.cumsum(v)])  # noqa: E731  (p = 0 is the empty product)
    any_zero = cum(zero.astype(np.float64)) > 0
    # Π x > 0: log Π x + log expm1(Σ log1p(y/x)).  Π x = 0: log Π(x+y).
    with np.errstate(invalid="ignore"):
        return np.where(any_zero, cum(log_sum), cum(log_x) + _log_expm1(cum(ratio)))


def _as_layers(name, values, L):
    v = np.broadcast_to(np.asarray(values, dtype=np.float64), (L,)) if np.ndim(values) == 0 \
        else np.asarray(values, dtype=np.float64)
    if v.shape != (L,):
        raise AdapterError(f"{name} must have one value per layer ({L}), got shape {v.shape}")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise AdapterError(f"{name} must be finite and ≥ 0")
    return v


def log_phi(d_main, d_off, lam, s, C, loss_lipschitz):
    """ln Φ for Φ = 2 L_ℓ [C Λ (T − X) + Σ_{p=1}^{L−1} s_{L−p} Λ_p (T_p − Y_p)].

    d_main[p] = ln(T_p − X_p) and d_off[p] = ln(T_p − Y_p) for p = 0..L (suffix_log_prod_diff).
    """
    L = len(lam)
    with np.errstate(divide="ignore"):
        log_lam = np.concatenate([[0.0], np.cumsum(np.log(lam[::-1]))])  # ln Λ_p, p = 0..L
        log_s = np.log(s)
        terms = [math.log(C) + log_lam[L] + d_main[L]] if C > 0 else []
        # p = 1..L−1: the offset of layer L−p (1-based), i.e. s[L−p−1] (0-based).
        p = np.arange(1, L)
        terms = np.concatenate([terms, log_s[L - p - 1] + log_lam[p] + d_off[p]])
    terms = terms[np.isfinite(terms) | (terms > 0)]  # drop −inf (zero terms); keep +inf
    if terms.size == 0:
        return -math.inf
    top = terms.max()
    if not math.isfinite(top):
        return float(top)
    return float(math.log(2.0 * loss_lipschitz) + top + math.log(np.exp(terms - top).sum()))


def theorem1(base_norms, delta_norms, act_lipschitz, act_zero_norms, input_bound,
             loss_lipschitz, convention="derived"):
    """Φ_ΔW and Φ_W0 of Theorem 1; all sequences in forward layer order (l = 1..L).

    act_lipschitz (λ_l) and act_zero_norms (s_l = ‖σ_l(0)‖) may be scalars (same for every layer).
    Returns {"phi_delta", "phi_base" (floats, inf on overflow), "log10_phi_delta", "log10_phi_base",
    "convention", "layers"}.
    """
    if convention not in CONVENTIONS:
        raise AdapterError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    a = np.asarray(base_norms, dtype=np.float64).reshape(-1)
    L = a.size
    if L == 0:
        raise AdapterError("theorem1 needs at least one adapted layer")
    a = _as_layers("base_norms", a, L)
    b = _as_layers("delta_norms", delta_norms, L)
    lam = _as_layers("act_lipschitz", act_lipschitz, L)
    s = _as_layers("act_zero_norms", act_zero_norms, L)
    for name, v in (("input_bound", input_bound), ("loss_lipschitz", loss_lipschitz)):
        if not (math.isfinite(v) and v >= 0):
            raise AdapterError(f"{name} must be finite and ≥ 0, got {v!r}")
    if loss_lipschitz == 0:
        ln_delta = ln_base = -math.inf
    else:
        T_minus_A, T_minus_B = suffix_log_prod_diff(a, b), suffix_log_prod_diff(b, a)
        # derived: Φ_ΔW offsets subtract A_p, Φ_W0 offsets B_p; the literal rule swaps the offsets.
        off_delta, off_base = (T_minus_A, T_minus_B) if convention == "derived" else (T_minus_B, T_minus_A)
        ln_delta = log_phi(T_minus_A, off_delta, lam, s, input_bound, loss_lipschitz)
        ln_base = log_phi(T_minus_B, off_base, lam, s, input_bound, loss_lipschitz)
    out = {"convention": convention, "layers": L}
    for key, ln in (("delta", ln_delta), ("base", ln_base)):
        out[f"log10_phi_{key}"] = float(ln) / math.log(10.0)
        out[f"phi_{key}"] = math.exp(ln) if ln < 709.78 else math.inf
    return out


def theorem1_bruteforce(base_norms, delta_norms, act_lipschitz, act_zero_norms, input_bound,
                        loss_lipschitz, convention="derived"):
    """Reference: the paper's 2^L-word sums, evaluated literally. O(L 2^L); only for small L.

    Word i = 1..2^L; P(i, j) takes ΔW^j when bit ⌊(i−1)/2^{L−j}⌋ mod 2 is 1, else W0^j (the
    corrected selector), and every word but i = 1 (all W0) enters Φ_ΔW's main term; Φ_W0 swaps
    the roles of W0 and ΔW. The offset of layer L−p sums the words over the top p layers; the
    literal H(i, j) there takes the opposite factor from P(i, j).
    """
    a = np.asarray(base_norms, dtype=np.float64)
    b = np.asarray(delta_norms, dtype=np.float64)
    L = a.size
    lam = np.broadcast_to(np.asarray(act_lipschitz, dtype=np.float64), (L,))
    s = np.broadcast_to(np.asarray(act_zero_norms, dtype=np.float64), (L,))

    def word_sum(layers, one_is_delta):
        """Σ_{i=2}^{2^n} Π_j P(i, j) over `layers` (1-based, forward order): every word but i = 1.

        Bit j of word i is ⌊(i−1)/2^{n−j}⌋ mod 2; it selects ΔW^j when it equals one_is_delta.
        """
        n = len(layers)
        sel_a, sel_b = a[np.asarray(layers) - 1], b[np.asarray(layers) - 1]
        j = np.arange(1, n + 1)
        total = 0.0
        for lo in range(2, 2 ** n + 1, 2 ** 16):  # words in chunks, so L = 20 fits in memory
            i = np.arange(lo, min(lo + 2 ** 16, 2 ** n + 1), dtype=np.int64)
            bits = ((i[:, None] - 1) // 2 ** (n - j)) % 2
            total += np.where((bits == 1) == one_is_delta, sel_b, sel_a).prod(axis=1).sum()
        return float(total)

    literal = convention == "literal"
    out = {}
    for key, main_one_is_delta in (("delta", True), ("base", False)):
        offset_one_is_delta = main_one_is_delta != literal  # H(i, j) picks the opposite factor
        phi = input_bound * math.prod(lam) * word_sum(list(range(1, L + 1)), main_one_is_delta)
        for p in range(1, L):
            top = list(range(L - p + 1, L + 1))
            phi += s[L - p - 1] * math.prod(lam[L - p:]) * word_sum(top, offset_one_is_delta)
        out[f"phi_{key}"] = 2.0 * loss_lipschitz * phi
    return out
