"""Spectral norms and top singular triplets without an m×n SVD (docs/THEORY.md §2, §4).

Low-rank update ΔW = B A: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), B A = Q_B (R_B R_Aᵀ) Q_Aᵀ and
Q_B, Q_A have orthonormal columns, so ‖B A‖₂ = ‖R_B R_Aᵀ‖₂: an r×r problem, O((m+n) r²).

W = W0 + B A (or W0 alone) applied as an operator: `top_singular` runs block Krylov (Rayleigh–Ritz on
span{X, WᵀW X, (WᵀW)² X, …} from a seeded Gaussian block X; Musco & Musco 2015) and certifies each Ritz
triplet (σ̃_j, ũ_j, ṽ_j) a posteriori, in float64. With r_j = W ṽ_j − σ̃_j ũ_j, s_j = Wᵀ ũ_j − σ̃_j ṽ_j and
η_j = ‖(r_j, s_j)‖ / √2, (σ̃_j, (ũ_j, ṽ_j)/√2) is an approximate eigenpair of [[0, W], [Wᵀ, 0]] with
residual η_j, so (Davis–Kahan, residual form) ‖ũ_j − ±u_j‖ ≤ 2 η_j / δ_j and |σ̃_j − σ_j| ≤ η_j, where
δ_j = min(σ̃_j, σ̃_{j−1} − σ̃_j, σ̃_j − σ̃_{j+1} − η_{j+1}) bounds the distance from σ̃_j to every other
eigenvalue (±σ_i, i ≠ j, and 0). Ritz values never exceed the singular values they approximate, so
σ̃_{j−1} bounds σ_{j−1} from below without assumption; the upper side assumes the Krylov space caught
σ_{j+1} (σ_{j+1} ≤ σ̃_{j+1} + η_{j+1}), which a Gaussian start does with probability one.
"""
import math

import torch

from adapters.errors import AdapterError

# Residual target relative to σ̃_1, per working dtype: well above each dtype's rounding floor.
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-11}
OVERSAMPLE = 10  # block size = k + 1 + OVERSAMPLE (Halko, Martinsson & Tropp 2011 use 5-10)
MAX_BLOCKS = 40
CHUNK_ROWS = 2048  # rows of W0 converted to float64 at a time by the certificate (bounded memory)


def check_device(device, flag="--device"):
    """AdapterError (one line) unless torch can allocate on `device` (None: the CPU)."""
    if device is None:
        return
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise AdapterError(f"{flag} {device}: {str(e).splitlines()[0] if str(e) else 'not available'}") from None


def lowrank_spectral_norm(B, A):
    """‖B @ A‖₂ for B (n×r) and A (r×m), computed in float64 via the r×r trick."""
    return float(lowrank_singular_values(B, A)[0]) if torch.as_tensor(B).shape[-1] else 0.0


def lowrank_singular_values(B, A):
    """The nonzero-part singular values of B @ A (descending, min(n, m, r) of them), float64, via the r×r trick."""
    B = torch.as_tensor(B).detach().to(torch.float64)
    A = torch.as_tensor(A).detach().to(torch.float64)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise AdapterError(f"need B (n×r) and A (r×m), got shapes {tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[1] == 0:
        return torch.zeros(1, dtype=torch.float64)
    R_B = torch.linalg.qr(B, mode="r").R  # min(n, r) × r
    R_A = torch.linalg.qr(A.T, mode="r").R  # min(m, r) × r
    return torch.linalg.svdvals(R_B @ R_A.T)


def spectral_norm(W, *, device=None):
    """‖W‖₂ of a dense matrix (largest singular value): block Krylov, certified to 1e-11 relative (float64)."""
    W = torch.as_tensor(W).detach()
    if not W.numel():
        return 0.0
    if min(W.shape) <= 2 * (2 + OVERSAMPLE):  # too small for Krylov to save anything
        return float(torch.linalg.matrix_norm(W.to(torch.float64), ord=2))
    t = top_singular(W if device is None else W.to(device), k=1, dtype=torch.float64)
    return float(t["S"][0])


def _operator(W0, B, A, dtype):
    W = W0.to(dtype)
    if B is None:
        return W, (lambda X: W @ X), (lambda Y: W.T @ Y)
    Bd, Ad = B.to(device=W.device, dtype=dtype), A.to(device=W.device, dtype=dtype)
    return W, (lambda X: W @ X + Bd @ (Ad @ X)), (lambda Y: W.T @ Y + Ad.T @ (Bd.T @ Y))


def _orthonormal_block(Z, Q):
    """Z with the span of Q's columns removed and orthonormalised, each pass on unit columns: once the Krylov
    space is (nearly) invariant, what is left of Z is rounding noise, which only a pass after normalising
    makes orthogonal to Q."""
    for _ in range(2):
        Z = torch.linalg.qr(Z - Q @ (Q.T @ Z)).Q
    return Z


def top_singular(W0, B=None, A=None, k=10, *, dtype=torch.float32, tol=None, seed=0, max_blocks=MAX_BLOCKS,
                 start=None):
    """Top-k singular triplets of W = W0 + B A (B A omitted when B is None) and their certificate.

    W0 (n×m), B (n×R), A (R×m) are only multiplied by blocks of vectors, in `dtype` on W0's device.
    start: right vectors (m×s) to begin the Krylov space with (a warm start, e.g. a float32 run's "start"
    refined in float64), completed by Gaussian columns to a block.
    Returns {"S", "U" (n×k), "V" (m×k), "eta", "delta", "vector_error" (2η/δ, inf where δ ≤ 0): float64 on
    the CPU; "blocks", "width" (Krylov dimension), "converged", "start" (the top block of Ritz right vectors)}.
    k ≥ min(n, m) is refused: use a full SVD.
    """
    n, m = W0.shape
    if not 1 <= k < min(n, m):
        raise AdapterError(f"top_singular needs 1 ≤ k < min(n, m) = {min(n, m)}, got k = {k}")
    tol = TOLERANCE[dtype] if tol is None else tol
    W, mv, rmv = _operator(W0, B, A, dtype)
    block = min(k + 1 + OVERSAMPLE, min(n, m))
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, block, generator=g, dtype=dtype).to(W.device)
    if start is not None:
        X[:, :min(block, start.shape[1])] = start[:, :block].to(X)
    X = torch.linalg.qr(X).Q
    Q, Y = [X], [mv(X)]
    best, stalled = math.inf, 0
    while True:
        width = sum(q.shape[1] for q in Q)
        U, S, V = _ritz(torch.cat(Q, 1), torch.cat(Y, 1), block)
        U, S, V, ahead = U[:, :k + 1], S[:k + 1], V[:, :k + 1], V
        res = (rmv(U) - V * S).norm(dim=0)  # W V = U S holds by construction; the residual is on Wᵀ
        worst = float(res.max() / S[0]) if S[0] > 0 else 0.0
        full = width >= m  # the Krylov space is all of R^m: Rayleigh–Ritz is then exact
        if worst <= tol or full or len(Q) >= max_blocks or stalled >= 2:
            break
        stalled = stalled + 1 if worst > 0.9 * best else 0  # at the rounding floor residuals stop shrinking
        best = min(best, worst)
        Qc = torch.cat(Q, 1)
        Z = _orthonormal_block(rmv(Y[-1])[:, :m - width], Qc)
        Q.append(Z)
        Y.append(mv(Z))
    out = certify(W0, B, A, U, V)
    out.update(blocks=len(Q), width=width, converged=worst <= tol or full, start=ahead.cpu())
    out["S"], out["U"], out["V"] = out["S"][:k], out["U"][:, :k], out["V"][:, :k]
    for key in ("eta", "delta", "vector_error"):
        out[key] = out[key][:k]
    return out


def _ritz(Q, Y, k):
    """Rayleigh–Ritz: the top k singular triplets of W restricted to span(Q), given Y = W Q."""
    Uy, S, Zh = torch.linalg.svd(Y, full_matrices=False)
    return Uy[:, :k], S[:k], Q @ Zh[:k].T


def certify(W0, B, A, U, V):
    """σ̃_j = ũ_jᵀ W ṽ_j, η_j, δ_j and the vector error bound 2η_j/δ_j of approximate triplets (module docstring),
    all in float64, with W0 converted CHUNK_ROWS rows at a time."""
    U = U.to(torch.float64)
    V = V.to(torch.float64)
    U, V = U / U.norm(dim=0), V / V.norm(dim=0)
    n = W0.shape[0]
    WV = torch.empty_like(U)
    WtU = torch.zeros_like(V)
    for i in range(0, n, CHUNK_ROWS):
        rows = W0[i:i + CHUNK_ROWS].to(torch.float64)
        WV[i:i + CHUNK_ROWS] = rows @ V
        WtU += rows.T @ U[i:i + CHUNK_ROWS]
    if B is not None:
        B64, A64 = B.to(device=U.device, dtype=torch.float64), A.to(device=U.device, dtype=torch.float64)
        WV += B64 @ (A64 @ V)
        WtU += A64.T @ (B64.T @ U)
    S = (U * WV).sum(dim=0)
    sign = torch.where(S < 0, -1.0, 1.0).to(S)  # a Ritz pair with ũᵀWṽ < 0 is the pair (−ũ, ṽ)
    U, S, WtU = U * sign, S * sign, WtU * sign
    r, s = WV - U * S, WtU - V * S
    # + the float64 rounding of the products themselves (at most max(n, m)·ε·‖W‖₂ per entry, a standard bound)
    rounding = max(W0.shape) * torch.finfo(torch.float64).eps * float(S.abs().max())
    eta = torch.sqrt(r.square().sum(0) + s.square().sum(0)) / math.sqrt(2.0) + rounding
    order = torch.argsort(S, descending=True)
    U, V, S, eta = U[:, order], V[:, order], S[order], eta[order]
    above = torch.cat([torch.tensor([math.inf], dtype=S.dtype, device=S.device), S[:-1] - S[1:]])
    below = torch.cat([S[:-1] - S[1:] - eta[1:], torch.tensor([-math.inf], dtype=S.dtype, device=S.device)])
    delta = torch.minimum(torch.minimum(S, above), below)
    error = torch.where(delta > 0, 2 * eta / delta.clamp_min(torch.finfo(S.dtype).tiny), math.inf)
    return {k: v.cpu() for k, v in dict(S=S, U=U, V=V, eta=eta, delta=delta, vector_error=error).items()}
