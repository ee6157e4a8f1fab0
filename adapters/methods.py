"""The method registry: every fine-tuning method of docs/METHODS.md as one small declarative record.

A LoRA-family layer computes y = W0 x + Σ_j s·B_j·A_j x (s = α/r). Methods differ only in
  - how A_j is made for link j (`make_a`): a dense random matrix, or a *selector* (column indices),
  - whether A trains (`train_a`), how many links k the chain has by default (`chain_length`: k > 1 is a
    chained method, which extends its non-chained `twin`),
  - how B starts (`b_init`): zeros, or the selected columns of W0 itself (PaCA),
  - the learning-rate ratio λ = lr_B / lr_A (LoRA+).
Full fine-tuning and head-only training have no adapter (`adapter=None`). The layer code in
layers.py reads these fields; nothing else in the toolkit branches on a method's name.
"""
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import AdapterError


def layer_seed(seed, name, *tags):
    """A 63-bit seed from (run seed, layer name, tags): the same on every process, different per layer."""
    digest = hashlib.sha256(":".join(map(str, (seed, name) + tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed, *tags):
    return torch.Generator().manual_seed(layer_seed(seed, "", *tags))


# --- How A_j is made: (m inputs, rank r, link j, layer seed) -> indices (selector) or an r×m matrix.

def kaiming_a(m, r, link, seed):
    """PEFT's LoRA init, kaiming_uniform(a=√5): U(-1/√m, 1/√m), seeded per layer and link."""
    bound = 1.0 / math.sqrt(m)
    return (torch.rand(r, m, generator=_generator(seed, link)) * 2 - 1) * bound


def first_columns(m, r, link, seed):
    """cLA: [I_r | 0], the first r input columns."""
    return torch.arange(r)


def random_columns(m, r, link, seed):
    """Random cLA: r distinct columns, uniform without replacement, one draw per layer."""
    return torch.randperm(m, generator=_generator(seed))[:r]


def shifted_window(m, r, link, seed):
    """c3LA: link j selects columns j·r … j·r + r − 1, wrapping around when k·r > m."""
    return (link * r + torch.arange(r)) % m


def random_window(m, r, link, seed):
    """Random c3LA: link j takes the j-th window of a seeded permutation of the windows, without replacement.

    The windows are c3LA's: window w = columns w·r … w·r + r − 1 (mod m). The ⌊m/r⌋ full windows are disjoint;
    when r does not divide m a last window w = ⌊m/r⌋ holds the leftover columns and wraps onto the first ones.
    Each cycle of ⌈m/r⌉ links draws a fresh permutation; in the first cycle the wrapping window comes after every
    full window, so k links always cover min(k·r, m) distinct columns, as c3LA's do.
    """
    n_full, n_windows = m // r, -(-m // r)
    cycle, position = divmod(link, n_windows)
    order = torch.randperm(n_full if cycle == 0 else n_windows, generator=_generator(seed, "cycle", cycle))
    window = n_full if position >= len(order) else order[position]  # cycle 0: the wrapping window goes last
    return (window * r + torch.arange(r)) % m


# A chained method's default chain length k. docs/METHODS.md leaves k free; 3 is the k the study runs the chained
# methods with (README, "chain length k = 3 for the chained methods") and the one every example uses.
CHAIN_LENGTH = 3


@dataclass(frozen=True)
class Adapter:
    make_a: Callable        # (m, r, link, seed) -> LongTensor[r] (selector) or Tensor[r, m]
    selector: bool          # A is a column selector: applied as a gather, never a matmul
    train_a: bool = False
    chain_length: int = 1   # default k: > 1 for a chained method (a new link every 1/k of the run)
    twin: Optional[str] = None  # a chained method's non-chained twin: the same adapter without the chain
    # Whether one link of the chain is exactly its twin (the same A): cola, rac, c3la. rc3la's one link is a random
    # window of r contiguous columns, rcla's r random columns: the same structure, not the same A.
    one_link_is_twin: bool = True
    b_init: str = "zeros"   # "zeros" | "base_columns" (PaCA: B starts at W0[:, idx] / s)
    lr_ratio: float = 1.0   # default λ = lr_B / lr_A

    def __post_init__(self):
        if (self.chain_length > 1) != (self.twin is not None):
            raise ValueError("a chained adapter (chain_length > 1) names its non-chained twin, and only it does")

    @property
    def chained(self):
        return self.chain_length > 1


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    adapter: Optional[Adapter] = None   # None: no adapter layers (fft, head)
    trains_base: bool = False           # every pretrained weight trains (fft)
    head_lr_mult: float = 1.0           # the task head's lr = head_lr_mult · lr (the paper: 10 for fft and head)

    @property
    def chain_length(self):
        """The default chain length k: CHAIN_LENGTH for a chained method, 1 for every other."""
        return self.adapter.chain_length if self.adapter is not None else 1


METHODS = {m.name: m for m in [
    Method("fft", "full fine-tuning: every parameter", trains_base=True, head_lr_mult=10.0),
    Method("head", "the task head only", head_lr_mult=10.0),
    Method("lora", "LoRA: A and B trained", Adapter(kaiming_a, selector=False, train_a=True)),
    Method("lora_plus", "LoRA+: lr_B = λ·lr_A", Adapter(kaiming_a, False, train_a=True, lr_ratio=16.0)),
    Method("asym", "asymmetric LoRA: random frozen A, B trained", Adapter(kaiming_a, False)),
    Method("cla", "cheap LoRA: A = [I_r | 0], B trained", Adapter(first_columns, True)),
    Method("rcla", "random cLA: r random columns, B trained", Adapter(random_columns, True)),
    Method("cola", "chain of LoRA: fresh random A each link, A and B trained",
           Adapter(kaiming_a, False, train_a=True, chain_length=CHAIN_LENGTH, twin="lora")),
    Method("rac", "randomized asymmetric chain: fresh frozen random A each link",
           Adapter(kaiming_a, False, chain_length=CHAIN_LENGTH, twin="asym")),
    Method("c3la", "chained cLA: the selector window shifts by r each link",
           Adapter(shifted_window, True, chain_length=CHAIN_LENGTH, twin="cla")),
    Method("rc3la", "random c3LA: a seeded random window each link",
           Adapter(random_window, True, chain_length=CHAIN_LENGTH, twin="rcla", one_link_is_twin=False)),
    Method("paca", "PaCA: r random columns of W0 trained",
           Adapter(random_columns, True, b_init="base_columns")),
    Method("dpaca", "deterministic PaCA: the first r columns of W0 trained",
           Adapter(first_columns, True, b_init="base_columns")),
]}


def get_method(name):
    try:
        return METHODS[name]
    except KeyError:
        raise AdapterError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def resolve_chain_length(method, chain_length=None):
    """The chain length k a run of `method` uses: `chain_length` when given, else the method's default (k links
    for a chained method, so that one never trains a single link unasked)."""
    return get_method(method).chain_length if chain_length is None else chain_length


def one_link_note(method, chain_length):
    """What to tell a user who asked a chained method for one link: that it trains its non-chained twin (None for
    any other run)."""
    spec = get_method(method).adapter
    if spec is None or not spec.chained or chain_length != 1:
        return None
    if spec.one_link_is_twin:
        return (f"{method} with chain_length=1 trains a single link, as its non-chained twin {spec.twin} does "
                f"(the default is {spec.chain_length} links)")
    return (f"{method} with chain_length=1 trains a single link: its first link's A, not its non-chained twin "
            f"{spec.twin}'s (the default is {spec.chain_length} links)")


def method_table():
    """One line per method of the registry: its name, what it trains and its default chain length (for --help)."""
    width = max(map(len, METHODS))
    return "\n".join(f"  {m.name:<{width}}  {m.description}" + (f" (k = {m.chain_length} links by default)"
                                                               if m.chain_length > 1 else "")
                     for m in METHODS.values())


# The paper's names, in the order its tables list them (full FT, LoRA family, sparse variants): every table and
# figure of bounds/ and analysis/ labels and orders methods from here.
LABELS = {
    "fft": "Full FT", "head": "Head only",
    "lora": "LoRA", "lora_plus": "LoRA+", "asym": "Asym-LoRA", "cola": "CoLA", "rac": "RAC",
    "paca": "PaCA", "dpaca": "dPaCA",
    "cla": "cLA", "rcla": "random cLA", "c3la": "c3LA", "rc3la": "random c3LA",
}
GROUPS = {
    "full FT": ["fft", "head"],
    "LoRA family": ["lora", "lora_plus", "asym", "cola", "rac", "paca", "dpaca"],
    "sparse variants": ["cla", "rcla", "c3la", "rc3la"],
}


def label(method):
    return LABELS.get(method, method)


def paper_order(methods):
    """Sort method names in the paper's table order; unknown names go last, alphabetically."""
    order = list(LABELS)
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))
