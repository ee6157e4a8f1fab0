"""Directions in parameter space for loss landscapes (docs/THEORY.md section 5, Li et al. 2018).

A "direction" is a list of float32 tensors, one per perturbed parameter, in the same order and
shapes as the parameters. Three kinds:

- random: Gaussian N(0, 1) entries (zero mean, seeded), then filter-normalised: for a tensor with
  ≥ 2 dims every output row d_i (dim 0, the rest flattened: a filter) is rescaled to
  ‖θ_i‖ · d_i / ‖d_i‖, so the perturbation is equally large relative to every filter's weights.
  1-D tensors (biases, norms) are zeroed unless asked; when kept, the whole vector is one filter
  (rescaled to ‖θ‖), never element by element.
- pca: the top principal directions of the trajectory snapshots θ_e − θ* (centred, as in Li et
  al.'s code), scaled so the trajectory's largest |coordinate| along each is 1.
- segment: θ_2 − θ* towards a second checkpoint (no normalisation: α = 1 is that checkpoint).

`project` puts snapshots on the plane by least squares against the directions actually used,
so the drawn path and the contour share one scale whatever the normalisation.
"""
import numpy as np
import torch

from adapters.errors import AdapterError


def flatten(tensors):
    return torch.cat([t.reshape(-1).float() for t in tensors])


def unflatten(vec, like):
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def filter_normalise(direction, weights, include_1d=False):
    """Rescale each filter (output row) of `direction` to the norm of the matching row of `weights`."""
    out = []
    for d, w in zip(direction, weights):
        d, w = d.float(), w.detach().float()
        if d.dim() <= 1:
            if not include_1d:
                out.append(torch.zeros_like(d))
                continue
            rows_d, rows_w = d.reshape(1, -1), w.reshape(1, -1)  # the whole vector is one filter
        else:
            rows_d, rows_w = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
        # A zero weight row gets a zero direction row (‖θ_i‖ = 0); the clamp only avoids 0/0.
        scale = rows_w.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out.append((rows_d * scale).reshape(d.shape))
    return out


def random_direction(weights, seed, include_1d=False):
    """Seeded Gaussian direction, filter-normalised against `weights` (drawn on the CPU: same on every device)."""
    gen = torch.Generator().manual_seed(int(seed))
    raw = [torch.randn(w.shape, generator=gen, dtype=torch.float32) for w in weights]
    normed = filter_normalise(raw, [w.detach().cpu() for w in weights], include_1d)
    return [d.to(w.device) for d, w in zip(normed, weights)]


def pca_directions(snapshots, center, count=2):
    """Top `count` principal directions of the snapshots around θ*.

    snapshots: list of flat float tensors θ_e; center: flat θ*. Returns (directions as flat
    tensors, info). PCA of the centred matrix M = [θ_e − θ*] − mean via its small E×E Gram
    matrix (E snapshots ≪ n parameters): M Mᵀ = U S² Uᵀ, component k = Mᵀ u_k / s_k.
    """
    if len(snapshots) < count + 1:
        raise AdapterError(f"PCA directions need at least {count + 1} trajectory snapshots, found "
                           f"{len(snapshots)}; train with a smaller --save-trajectory interval")
    diffs = torch.stack([s.double() - center.double() for s in snapshots])  # E × n
    centred = diffs - diffs.mean(0, keepdim=True)
    gram = centred @ centred.T
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    total = float(evals.clamp_min(0).sum())
    if total <= 0 or float(evals[count - 1]) <= 1e-12 * total:
        raise AdapterError(f"the trajectory snapshots do not span {count} directions "
                           "(they are (nearly) identical); use --directions random")
    directions, extents = [], []
    for k in range(count):
        comp = centred.T @ evecs[:, k] / evals[k].sqrt()  # unit vector
        coords = diffs @ comp
        # Deterministic sign: the path starts on the negative side and ends at the centre.
        if coords[0] > 0:
            comp, coords = -comp, -coords
        extent = float(coords.abs().max())
        directions.append((comp * extent).float())  # trajectory's largest |coordinate| becomes 1
        extents.append(extent)
    info = {"explained_variance_ratio": [float(evals[k]) / total for k in range(count)],
            "extent": extents, "normalisation": "pca-extent (unit principal direction × the "
            "trajectory's largest |projection| on it)"}
    return directions, info


def project(points, center, directions):
    """Least-squares coordinates c of each θ_e − θ* in span(directions), and the relative residual.

    Solves the normal equations DᵀD c = Dᵀ(θ_e − θ*) (D = [δ η], n × dims) in float64, which is
    exact for any (non-orthogonal, unnormalised) pair of directions.
    """
    D = torch.stack([d.double() for d in directions], dim=1)  # n × dims
    G = D.T @ D
    coords, residuals = [], []
    for p in points:
        x = p.double() - center.double()
        c = torch.linalg.solve(G, D.T @ x)
        r = (x - D @ c).norm()
        coords.append(c.tolist())
        xn = float(x.norm())
        residuals.append(float(r) / xn if xn > 0 else 0.0)
    return np.array(coords), residuals
