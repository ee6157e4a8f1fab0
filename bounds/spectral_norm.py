"""Spectral norm of a low-rank update ΔW = B A without forming it (THEORY.md §2).

With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), B A = Q_B (R_B R_Aᵀ) Q_Aᵀ and Q_B, Q_A have
orthonormal columns, so ‖B A‖₂ = ‖R_B R_Aᵀ‖₂: an r×r problem, O((m+n) r²) instead of an m×n SVD.
"""
import torch

from adapters.errors import AdapterError


def lowrank_spectral_norm(B, A):
    """‖B @ A‖₂ for B (n×r) and A (r×m), computed in float64 via the r×r trick."""
    B = torch.as_tensor(B).detach().to(torch.float64)
    A = torch.as_tensor(A).detach().to(torch.float64)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise AdapterError(f"need B (n×r) and A (r×m), got shapes {tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[1] == 0:
        return 0.0
    R_B = torch.linalg.qr(B, mode="r").R  # min(n, r) × r
    R_A = torch.linalg.qr(A.T, mode="r").R  # min(m, r) × r
    return float(torch.linalg.matrix_norm(R_B @ R_A.T, ord=2))


def spectral_norm(W):
    """‖W‖₂ of a dense matrix (largest singular value), in float64."""
    W = torch.as_tensor(W).detach().to(torch.float64)
    return float(torch.linalg.matrix_norm(W, ord=2)) if W.numel() else 0.0
