"""The one adapter layer every LoRA-family method shares.

    y = base(x) + x·A_prevᵀ·B_prevᵀ + s · (A x)ᵀ Bᵀ        (base = W0, frozen)

(B_prev, A_prev) hold the links already folded (scales folded in), so the update is kept exactly as
ΔW = Σ_j s·B_j·A_j in low-rank form, never merged into W0. When A is a selector, A x is the gather
x[..., idx], done by `gather_linear`, which keeps only x[..., idx] (r columns) for backward. With the base
frozen, the current link goes through `gather_adapted_linear`, which also does the base in the same autograd node.
"""
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .methods import Adapter


class _GatherLinear(torch.autograd.Function):
    """y = s · x[..., idx] @ Bᵀ, saving only x[..., idx] (for dB) and B (for dx) for backward.

    Plain autograd on `x.index_select(...) @ B.t()` would do the same arithmetic, but index_select
    saves the full input x for its backward; this keeps the r gathered columns instead.
    The arithmetic mirrors the dense (x @ Aᵀ) @ Bᵀ · s with A a selector op for op, so outputs and
    B-gradients are bit-for-bit those of the dense formula.
    """

    @staticmethod
    def forward(ctx, x, idx, B, scale):
        x_idx = x.index_select(-1, idx)
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.save_for_backward(idx, x_idx if ctx.needs_input_grad[2] else None,
                              B if ctx.needs_input_grad[0] else None)
        return (x_idx @ B.t()) * scale

    @staticmethod
    def backward(ctx, grad):
        idx, x_idx, B = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_x = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.new_zeros(ctx.x_shape).index_add_(-1, idx, grad @ B)
        if ctx.needs_input_grad[2]:
            # dB = s · gᵀ x[..., idx], computed as autograd's matmul backward does: (hᵀ g)ᵀ.
            grad_B = (x_idx.reshape(-1, x_idx.shape[-1]).t() @ grad.reshape(-1, grad.shape[-1])).t()
        return grad_x, None, grad_B, None


def gather_linear(x, idx, B, scale=1.0):
    return _GatherLinear.apply(x, idx, B, scale)


class _GatherAdaptedLinear(torch.autograd.Function):
    """y = base(x) + prev + s · x[..., idx] @ Bᵀ for a frozen base (weight W0, n×m), as one autograd node.

    Why: through two nodes, the selector path's dx is an m-wide tensor of zeros with r columns filled, which
    autograd then adds to the base's dx = g W0: two full-size passes and an allocation per layer per step.
    Here dx = g W0 gets s·(g B) added in place to its columns idx instead. The arithmetic is op for op that
    of base(x) + prev + gather_linear(x, idx, B, s), so y and dB are bit-for-bit the two-node results (and dx
    too without `prev`). `prev`, the folded links' output or None, is added in the same order; its gradient is g.
    """

    @staticmethod
    def forward(ctx, x, base, W0, idx, B, scale, prev):
        x_idx = x.index_select(-1, idx)
        ctx.scale = scale
        ctx.save_for_backward(idx, x_idx if ctx.needs_input_grad[4] else None,
                              B if ctx.needs_input_grad[0] else None, W0 if ctx.needs_input_grad[0] else None)
        y = base(x) if prev is None else base(x).add_(prev)
        return y.add_((x_idx @ B.t()).mul_(scale))  # in place on fresh tensors: same values, no extra buffers

    @staticmethod
    def backward(ctx, grad):
        idx, x_idx, B, W0 = ctx.saved_tensors
        grad_s = grad * ctx.scale
        grad_x = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ W0).index_add_(-1, idx, grad_s @ B)
        if ctx.needs_input_grad[4]:
            grad_B = (x_idx.reshape(-1, x_idx.shape[-1]).t() @ grad_s.reshape(-1, grad_s.shape[-1])).t()
        return grad_x, None, None, None, grad_B, None, grad if ctx.needs_input_grad[6] else None


def gather_adapted_linear(x, base, W0, idx, B, scale=1.0, prev=None):
    """base(x) + prev + s · x[..., idx] @ Bᵀ; `base` must be frozen (its W0 = n×m weight gives dx)."""
    return _GatherAdaptedLinear.apply(x, base, W0, idx, B, scale, prev)


def dense_linear(x, A, B, scale=1.0):
    """The low-rank path with a dense A: s · (x Aᵀ) Bᵀ (same op order as PEFT's LoRA)."""
    return ((x @ A.t()) @ B.t()) * scale


class AdaptedLinear(nn.Module):
    """Wraps a frozen nn.Linear or GPT-2 Conv1D (weight stored in×out) with a chain of low-rank links."""

    def __init__(self, base, spec: Adapter, rank, alpha, chain_length=1, seed=0):
        super().__init__()
        self.base, self.spec, self.r, self.k = base, spec, rank, chain_length
        self.scale, self.seed, self.link = alpha / rank, seed, 0
        for p in base.parameters():
            p.requires_grad_(False)
        n, m = self.shape
        dtype, device = self.base_weight().dtype, self.base_weight().device
        # Folded links: B_prev is n×(j·r) with scales folded in; A_prev is (j·r)×m or column indices.
        self.register_buffer("B_prev", torch.zeros(n, 0, dtype=dtype, device=device))
        if spec.selector:
            self.register_buffer("A_prev", torch.zeros(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("A_prev", torch.zeros(0, m, dtype=dtype, device=device))
        a = spec.make_a(m, rank, 0, seed).to(device)
        if spec.selector:
            self.register_buffer("idx", a)
        else:
            self.A = nn.Parameter(a.to(dtype), requires_grad=spec.train_a)
        self.B = nn.Parameter(torch.zeros(n, rank, dtype=dtype, device=device))
        if spec.b_init == "base_columns":
            # PaCA: the trained scalars are W0's own columns, parametrised as W[:, idx] = s·P with
            # P0 = W0[:, idx] / s; the update is s·(P − P0) on those columns.
            p0 = self.base_weight()[:, a] / self.scale
            self.register_buffer("B_offset", p0.detach().clone())
            self.B.data.copy_(p0)
        else:
            self.register_buffer("B_offset", None)

    # -- shapes and views -------------------------------------------------------------------------
    @property
    def shape(self):
        """(n out, m in) of W0."""
        w = self.base.weight
        return (w.shape[1], w.shape[0]) if isinstance(self.base, Conv1D) else tuple(w.shape)

    def base_weight(self):
        """W0 as n×m (Conv1D stores it transposed)."""
        w = self.base.weight
        return w.t() if isinstance(self.base, Conv1D) else w

    def current_A(self):
        """A of the current link: column indices for selectors, else the r×m matrix."""
        return self.idx if self.spec.selector else self.A

    def current_B(self):
        return self.B if self.B_offset is None else self.B - self.B_offset

    def selectors(self):
        """Column indices of every link so far (folded ones, then the current one); [] if dense."""
        if not self.spec.selector:
            return []
        idx = torch.cat([self.A_prev, self.idx]).tolist()
        return [idx[j:j + self.r] for j in range(0, len(idx), self.r)]

    # -- forward ----------------------------------------------------------------------------------
    def _low_rank(self, x, A, B, scale):
        return gather_linear(x, A, B, scale) if self.spec.selector else dense_linear(x, A, B, scale)

    def forward(self, x):
        prev = self._low_rank(x, self.A_prev, self.B_prev, 1.0) if self.B_prev.shape[1] else None
        if self.spec.selector and not any(p.requires_grad for p in self.base.parameters()):
            return gather_adapted_linear(x, self.base, self.base_weight(), self.idx, self.current_B(), self.scale,
                                         prev)
        y = self.base(x) if prev is None else self.base(x) + prev
        return y + self._low_rank(x, self.current_A(), self.current_B(), self.scale)

    # -- the update -------------------------------------------------------------------------------
    def factors(self):
        """(B_cat, A_cat) with ΔW = B_cat @ A_cat exactly: B_cat = [B_prev, s·B], A_cat dense."""
        with torch.no_grad():
            B_cat = torch.cat([self.B_prev, self.scale * self.current_B()], dim=1)
            A = torch.cat([self.A_prev, self.current_A()])
            if self.spec.selector:
                A = torch.nn.functional.one_hot(A, self.shape[1]).to(B_cat.dtype)
        return B_cat, A

    def delta_weight(self):
        B_cat, A_cat = self.factors()
        return B_cat @ A_cat

    def trained_parameters(self):
        """Trained scalars over the whole run: each link trains a fresh copy of the trainable factors."""
        return self.k * sum(p.numel() for p in (self.B, getattr(self, "A", None))
                            if p is not None and p.requires_grad)

    def next_link(self):
        """Fold s·B_j·A_j into (B_prev, A_prev), then start link j+1: B = 0, A = the next A."""
        with torch.no_grad():
            self.B_prev = torch.cat([self.B_prev, self.scale * self.current_B()], dim=1)
            self.A_prev = torch.cat([self.A_prev, self.current_A().detach()])
            self.link += 1
            a = self.spec.make_a(self.shape[1], self.r, self.link, self.seed).to(self.B.device)
            if self.spec.selector:
                self.idx = a
            else:
                self.A.copy_(a)  # in place: the optimizer keeps pointing at the same Parameter
            self.B.zero_()

    def extra_repr(self):
        n, m = self.shape
        return f"n={n}, m={m}, r={self.r}, s={self.scale:g}, link={self.link + 1}/{self.k}"
