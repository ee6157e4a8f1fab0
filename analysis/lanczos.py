"""Matrix-free spectral estimators for a symmetric operator given only v ↦ H v (docs/THEORY.md section 6).

Every function takes `matvec` (a flat tensor of length n → a flat tensor of length n) and draws its
random vectors from a seeded CPU generator, so results do not depend on the device.

- `lanczos`: Lanczos tridiagonalisation with full reorthogonalisation (two passes of classical
  Gram-Schmidt against every stored basis vector, "twice is enough"), so Ritz values do not
  duplicate and the second eigenvalue is not missed as with power iteration plus deflation.
- `top_eigenvalues`: Ritz values of the Lanczos T, stopped when the top-k residuals
  |β_m s_{m,i}| (= ‖H y_i − θ_i y_i‖ for Ritz pair i) fall below tol·|θ_max|.
- `hutchinson`: tr H ≈ mean of vᵀHv over Rademacher v, with its standard error.
- `hutchpp`: Hutch++ (Meyer et al. 2021): exact trace on a sketched range plus Hutchinson on the rest.
- `slq`, `slq_density`: stochastic Lanczos quadrature; nodes = Ritz values, weights = squared first
  components of the Ritz vectors; the density is the weighted sum of Gaussians (Ghorbani et al. 2019).
"""
import math

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from tqdm import tqdm


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def _gaussian(n, gen, like):
    return torch.randn(n, generator=gen, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def rademacher(n, gen, like):
    v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(like.device)
    return (2 * v - 1).to(like.dtype)


def lanczos(matvec, start, steps, *, on_step=None, progress=False, desc="lanczos"):
    """Run up to `steps` Lanczos steps from `start`; return (alphas, betas, Q, beta_next).

    T = tridiag(betas, alphas, betas) (m × m) is the projection Qᵀ H Q of H on the orthonormal
    basis Q (m × n); beta_next is the coupling to the next basis vector, so the residual of Ritz
    pair (θ_i, Q ᵀs_i) is |beta_next · s_i[-1]|. `on_step(alphas, betas)` (betas including the
    latest coupling) may return True to stop early. On breakdown (β ≈ 0: an invariant subspace
    is exhausted) the iteration continues from a fresh random vector orthogonal to Q with
    coupling 0, still a valid orthonormal projection (T becomes block diagonal).
    """
    n = start.numel()
    steps = min(steps, n)
    # The basis grows by doubling, so memory follows the steps actually taken, not `steps`: a run that
    # converges early over millions of parameters (full fine-tuning) never holds max_iter vectors.
    Q = torch.zeros(min(steps, 8), n, dtype=start.dtype, device=start.device)
    q = start / start.norm()
    alphas, betas = [], []
    gen = _gen(12345)  # only used on breakdown; fixed so runs are reproducible
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for j in range(steps):
        if j == len(Q):
            Q = torch.cat([Q, torch.zeros(min(len(Q), steps - len(Q)), n, dtype=Q.dtype, device=Q.device)])
        Q[j] = q
        w = matvec(q).to(q.dtype)
        alpha = float(torch.dot(w, q))
        # Full reorthogonalisation against q_0..q_j, twice; it subsumes the three-term recurrence.
        for _ in range(2):
            w = w - Q[:j + 1].T @ (Q[:j + 1] @ w)
        beta = float(w.norm())
        scale = max(abs(alpha), max((abs(b) for b in betas), default=0.0), 1e-300)
        breakdown = beta <= 1e-10 * scale
        alphas.append(alpha)
        betas.append(0.0 if breakdown else beta)
        bar.update(1)
        if j + 1 == steps or (on_step is not None and on_step(alphas, betas)):
            break
        if breakdown:
            w = _gaussian(n, gen, start)
            for _ in range(2):
                w = w - Q[:j + 1].T @ (Q[:j + 1] @ w)
        q = w / w.norm()
    bar.close()
    m = len(alphas)
    return alphas, betas[:m - 1], Q[:m], betas[m - 1]


def ritz(alphas, betas):
    """Eigenvalues (ascending) and eigenvectors of the tridiagonal T."""
    if len(alphas) == 1:
        return np.array(alphas, dtype=float), np.ones((1, 1))
    return eigh_tridiagonal(np.array(alphas, dtype=float), np.array(betas, dtype=float))


def top_eigenvalues(matvec, n, k=5, *, max_iter=100, tol=1e-4, seed=0, like=None, progress=False):
    """Algebraically largest k eigenvalues (descending) by Lanczos with full reorthogonalisation.

    Converged (after ≥ 2k steps) when every top-k Ritz residual |β_next · s_{last,i}| ≤ tol · max|θ|.
    Also returns the smallest Ritz value (the most negative curvature seen), the residuals and the step count.
    """
    like = like if like is not None else torch.zeros(1, dtype=torch.float64)
    k = min(k, n)
    start = _gaussian(n, _gen(seed), like)

    def converged(alphas, betas):
        # betas[-1] is the coupling to the next (not yet used) basis vector. At least 2k steps, so a
        # Krylov space barely larger than k cannot declare a premature top-k.
        if len(alphas) < 2 * k:
            return False
        theta, S = ritz(alphas, betas[:-1])
        res = np.abs(betas[-1] * S[-1, :])
        top = np.argsort(theta)[::-1][:k]
        return bool(np.all(res[top] <= tol * max(np.abs(theta).max(), 1e-30)))

    alphas, betas, _, beta_next = lanczos(matvec, start, max_iter, on_step=converged,
                                          progress=progress, desc="lanczos top-k")
    theta, S = ritz(alphas, betas)
    res = np.abs(beta_next * S[-1, :])
    order = np.argsort(theta)[::-1]
    top = order[:k]
    return {"eigenvalues": theta[top].tolist(), "residuals": res[top].tolist(),
            "lambda_min": float(theta.min()), "iterations": len(alphas),
            "converged": bool(np.all(res[top] <= tol * max(np.abs(theta).max(), 1e-30))),
            "tol": tol, "seed": seed}


def hutchinson(matvec, n, samples=32, *, seed=0, like=None, progress=False):
    """tr H ≈ (1/s) Σ vᵀHv, v Rademacher; standard error = sample std / √s."""
    like = like if like is not None else torch.zeros(1, dtype=torch.float64)
    gen = _gen(seed)
    vals = []
    for _ in tqdm(range(samples), desc="hutchinson", disable=not progress, leave=False):
        v = rademacher(n, gen, like)
        vals.append(float(torch.dot(v, matvec(v).to(v.dtype))))
    vals = np.array(vals)
    stderr = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    return {"trace": float(vals.mean()), "stderr": stderr, "samples": vals.tolist(),
            "method": "hutchinson", "matvecs": samples, "seed": seed}


def hutchpp(matvec, n, matvecs=33, *, seed=0, like=None, progress=False):
    """Hutch++: with sketch size s = matvecs // 3, Q = orth(H S) for Rademacher S (n × s),
    tr H = tr(Qᵀ H Q) + tr((I−QQᵀ) H (I−QQᵀ)) where the second term is estimated by Hutchinson
    with s projected Rademacher vectors. Its standard error comes from those s samples only
    (the first term is exact given Q)."""
    like = like if like is not None else torch.zeros(1, dtype=torch.float64)
    s = max(1, matvecs // 3)
    gen = _gen(seed)
    bar = tqdm(total=3 * s, desc="hutch++", disable=not progress, leave=False)

    def mv(v):
        bar.update(1)
        return matvec(v).to(v.dtype)

    HS = torch.stack([mv(rademacher(n, gen, like)) for _ in range(s)], dim=1)
    Q, _ = torch.linalg.qr(HS)  # n × s orthonormal
    exact = sum(float(torch.dot(Q[:, i], mv(Q[:, i]))) for i in range(Q.shape[1]))
    vals = []
    for _ in range(s):
        g = rademacher(n, gen, like)
        g = g - Q @ (Q.T @ g)
        vals.append(float(torch.dot(g, mv(g))))
    bar.close()
    vals = np.array(vals)
    stderr = float(vals.std(ddof=1) / math.sqrt(s)) if s > 1 else float("nan")
    return {"trace": exact + float(vals.mean()), "stderr": stderr, "samples": vals.tolist(),
            "sketch_trace": exact, "method": "hutch++", "matvecs": 3 * s, "seed": seed}


def slq(matvec, n, steps=50, runs=3, *, seed=0, like=None, progress=False):
    """Stochastic Lanczos quadrature: for each run, Lanczos from a normalised Rademacher vector v;
    nodes θ_i (Ritz values) and weights τ_i = S[0, i]² satisfy Σ τ_i θ_iᵖ = vᵀ Hᵖ v for p < 2m."""
    like = like if like is not None else torch.zeros(1, dtype=torch.float64)
    gen = _gen(seed)
    nodes, weights = [], []
    for r in range(runs):
        v = rademacher(n, gen, like)
        alphas, betas, _, _ = lanczos(matvec, v, steps, progress=progress, desc=f"slq run {r + 1}/{runs}")
        theta, S = ritz(alphas, betas)
        nodes.append(theta.tolist())
        weights.append((S[0, :] ** 2).tolist())
    return {"nodes": nodes, "weights": weights, "steps": steps, "runs": runs, "seed": seed}


def slq_density(nodes, weights, sigma=None, points=1000, pad=0.05):
    """Smoothed spectral density φ(t) = (1/runs) Σ_runs Σ_i τ_i N(t; θ_i, σ²) on a grid.

    σ defaults to 1 % of the spectral range seen. φ integrates to 1 (the weights of each run sum to 1)."""
    allnodes = np.concatenate([np.asarray(x) for x in nodes])
    lo, hi = allnodes.min(), allnodes.max()
    width = max(hi - lo, 1e-12 * max(abs(hi), 1.0))
    sigma = float(sigma) if sigma is not None else 0.01 * width
    t = np.linspace(lo - pad * width - 3 * sigma, hi + pad * width + 3 * sigma, points)
    phi = np.zeros_like(t)
    for th, tau in zip(nodes, weights):
        th, tau = np.asarray(th)[:, None], np.asarray(tau)[:, None]
        phi += (tau * np.exp(-0.5 * ((t[None, :] - th) / sigma) ** 2)).sum(0) / (sigma * math.sqrt(2 * math.pi))
    return t, phi / len(nodes), sigma
