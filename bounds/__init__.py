"""bounds, the floor above adapters/: the information-theoretic generalization-error bounds of a checkpoint (the
MI bound, Theorem 1 in O(L)) from its weights and training statistics (docs/THEORY.md §1–2), and the statistics the
floors share (bounds.stats); it reads checkpoints through adapters/ and never imports analysis/.

Stable API: mi_bound, theorem1, lowrank_spectral_norm, formula_parameters.
CLI: python -m bounds CKPT [CKPT ...]
"""
from bounds.mi import formula_parameters, is_vacuous, mi_bound, sigma_from_range
from bounds.spectral_norm import lowrank_spectral_norm, spectral_norm
from bounds.theorem1 import theorem1, theorem1_bruteforce

__all__ = ["mi_bound", "theorem1", "lowrank_spectral_norm", "formula_parameters",
           "sigma_from_range", "is_vacuous", "spectral_norm", "theorem1_bruteforce"]
