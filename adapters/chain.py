"""The chain schedule: after which optimizer steps each link of a chained method (c3la, rc3la, cola, rac) ends.

One place for both training paths, adapters.train's own loop and the Trainer callback (adapters.callback): a run
of T steps and chain length k folds its links after steps round(j·T/k), j = 1 … k−1 (equal shares of the run).
"""
from .errors import AdapterError


def link_boundaries(total_steps, chain_length):
    """Steps after which link j ends: equal shares of the run."""
    if total_steps < chain_length:
        raise AdapterError(f"{total_steps} steps cannot hold chain_length={chain_length} links")
    return [round(j * total_steps / chain_length) for j in range(1, chain_length)]


def check_boundaries(planned, chain_length, max_steps):
    """A schedule given by hand: k−1 increasing steps inside the run."""
    b = list(planned)
    if len(b) != chain_length - 1 or b != sorted(set(b)) or (b and not 0 < b[0] <= b[-1] < max_steps):
        raise AdapterError(f"boundaries must be {chain_length - 1} increasing steps in 1..{max_steps - 1} "
                           f"(chain_length={chain_length}, max_steps={max_steps}), got {planned!r}")
    return b
