"""The method registry: every fine-tuning method of METHODS.md as one small declarative record.

A LoRA-family layer computes y = W0 x + Σ_j s·B_j·A_j x (s = α/r). Methods differ only in
  - how A_j is made for link j (`make_a`): a dense random matrix, or a *selector* (column indices),
  - whether A trains (`train_a`), whether the chain has k > 1 links (`chained`),
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


@dataclass(frozen=True)
class Adapter:
    make_a: Callable        # (m, r, link, seed) -> LongTensor[r] (selector) or Tensor[r, m]
    selector: bool          # A is a column selector: applied as a gather, never a matmul
    train_a: bool = False
    chained: bool = False
    b_init: str = "zeros"   # "zeros" | "base_columns" (PaCA: B starts at W0[:, idx] / s)
    lr_ratio: float = 1.0   # default λ = lr_B / lr_A


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    adapter: Optional[Adapter] = None   # None: no adapter layers (fft, head)
    trains_base: bool = False           # every pretrained weight trains (fft)
    head_lr_mult: float = 1.0           # the task head's lr = head_lr_mult · lr (the paper: 10 for fft and head)


METHODS = {m.name: m for m in [
    Method("fft", "full fine-tuning: every parameter", trains_base=True, head_lr_mult=10.0),
    Method("head", "the task head only", head_lr_mult=10.0),
    Method("lora", "LoRA: A and B trained", Adapter(kaiming_a, selector=False, train_a=True)),
    Method("lora_plus", "LoRA+: lr_B = λ·lr_A", Adapter(kaiming_a, False, train_a=True, lr_ratio=16.0)),
    Method("asym", "asymmetric LoRA: random frozen A, B trained", Adapter(kaiming_a, False)),
    Method("cla", "cheap LoRA: A = [I_r | 0], B trained", Adapter(first_columns, True)),
    Method("rcla", "random cLA: r random columns, B trained", Adapter(random_columns, True)),
    Method("cola", "chain of LoRA: fresh random A each link, A and B trained",
           Adapter(kaiming_a, False, train_a=True, chained=True)),
    Method("rac", "randomized asymmetric chain: fresh frozen random A each link",
           Adapter(kaiming_a, False, chained=True)),
    Method("c3la", "chained cLA: the selector window shifts by r each link",
           Adapter(shifted_window, True, chained=True)),
    Method("rc3la", "random c3LA: a seeded random window each link",
           Adapter(random_window, True, chained=True)),
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
