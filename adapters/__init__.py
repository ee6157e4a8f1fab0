"""adapters, the ground floor: every method of "Beyond LoRA" (the sparse variants and their baselines) on any
transformers model, trained (adapters.train, or a Trainer with adapters.callback) into a checkpoint directory that
holds everything the floors above need; it imports nothing from bounds/ or analysis/.

    import adapters
    adapters.apply(model, "cla", rank=16, alpha=32)      # inject + freeze; the model trains cLA
    adapters.delta_weights(model)                          # {module: ΔW = Σ_j s·B_j·A_j}
    adapters.next_link(model, optimizer)                   # chained methods: fold, re-init, reset
    adapters.trained_parameters(model)                     # per-layer (m_i, n_i, trained scalars)
    model = adapters.load("ckpt/")                         # a checkpoint of ours or a PEFT LoRA dir
"""
from .errors import AdapterError, CheckpointError
from .inject import (apply, base_weights, delta_weights, next_link, param_groups, resolve_targets,
                     selectors, trained_parameters)
from .methods import METHODS, get_method
from .checkpoint import (load, load_base, lowrank_factors, matrices, read_meta, read_stats, save,
                         weights_hash)

__all__ = ["apply", "delta_weights", "base_weights", "next_link", "trained_parameters", "param_groups",
           "resolve_targets", "selectors", "METHODS", "get_method", "AdapterError", "CheckpointError",
           "load", "load_base", "lowrank_factors", "matrices", "read_meta", "read_stats", "save",
           "weights_hash"]
