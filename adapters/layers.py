"""The one adapter layer every LoRA-family method shares.

    y = base(x) + x·A_prevᵀ·B_prevᵀ + s · (A·drop(x))ᵀ Bᵀ        (base = W0, frozen)

(B_prev, A_prev) hold the links already folded (scales folded in), so the update is kept exactly as
ΔW = Σ_j s·B_j·A_j in low-rank form, never merged into W0. `drop` is LoRA dropout on the current link's
input (PEFT's lora_dropout; folded links act as part of the frozen weight and see the plain input).

When A is a selector, A x is the gather x[..., idx]. Plain autograd already keeps only what cLA needs for
backward: index_select saves the indices (not x) and the matmul saves x[..., idx] (r columns) and B. So the
selector path is ordinary differentiable ops — twice differentiable (exact Hessians), autocast-safe, and
op for op the dense formula (x Aᵀ) Bᵀ s with a one-hot A. With the base frozen, one autograd node
(`_FusedSelectorLinear`) does the frozen base and the current link together to save an m-wide pass in backward.
"""
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .methods import Adapter

# The layers an adapter wraps. GPT-2's Conv1D computes x W + b with W stored in×out; nn.Linear stores it out×in.
LINEAR = (nn.Linear, Conv1D)


def is_transposed(module):
    """Whether `module` stores its weight in×out (GPT-2's Conv1D; a PEFT config says so as fan_in_fan_out)."""
    return isinstance(module, Conv1D)


def as_out_in(weight, transposed):
    """`weight` (a tensor, or its shape) as n out × m in, given whether it is stored in×out (`transposed`)."""
    if not transposed:
        return weight
    return weight.t() if torch.is_tensor(weight) else tuple(weight)[::-1]


def out_in_weight(module):
    """The weight of a Linear or Conv1D `module` as n out × m in (a view)."""
    return as_out_in(module.weight, is_transposed(module))


def gather_linear(x, idx, B, scale=1.0):
    """s · x[..., idx] @ Bᵀ: the selector path. Saves idx, x[..., idx] and B for backward, never x."""
    return (x.index_select(-1, idx) @ B.t()) * scale


def dense_linear(x, A, B, scale=1.0):
    """The low-rank path with a dense A: s · (x Aᵀ) Bᵀ (same op order as PEFT's LoRA)."""
    return ((x @ A.t()) @ B.t()) * scale


def dropout_mask(x, p):
    """LoRA dropout's multiplier for x: Bernoulli(1−p)/(1−p), drawn over x's full shape as F.dropout does on CPU.

    Drawn in full (not only over the r selected columns) so the gather and dense paths see the same numbers
    and a run's random stream does not depend on whether A is a selector. Not saved for backward.
    """
    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


class _FusedSelectorLinear(torch.autograd.Function):
    """y = base(x) + prev + s · x_idx @ Bᵀ for a frozen base (weight W0, n×m) as one autograd node.

    Why: through two nodes, the selector path's dx is an m-wide tensor of zeros with r columns filled, which
    autograd then adds to the base's dx = g W0. Here s·(g B) is added in place to columns idx of g W0 instead.

    x_idx = drop(x)[..., idx] comes in as an input computed by ordinary autograd ops, and the backward is written in
    differentiable ops on saved *inputs*, so under create_graph the dependence of dB = s·gᵀ x_idx on earlier layers
    (through x_idx) and of dx on B is kept: Hessian-vector products are exact. The gradient of the x_idx path is
    returned through x (complete dx) and None for x_idx, so first-order backward never runs the m-wide scatter.
    The backward computes in the forward's output dtype (bf16/fp16 under autocast) and returns each gradient in
    its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, x_idx, base, W0, idx, B, scale, prev):
        ctx.scale, ctx.dtypes = scale, (x.dtype, B.dtype)
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
        ctx.save_for_backward(idx, x_idx if need_b else None, B if need_x else None, W0 if need_x else None)
        y = base(x) if prev is None else base(x).add_(prev)
        ctx.compute_dtype = y.dtype
        return y.add_((x_idx @ B.t()).mul_(scale))  # in place on fresh tensors: same values, no extra buffers

    @staticmethod
    def backward(ctx, grad):
        idx, x_idx, B, W0 = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad_s = grad.to(dtype) * ctx.scale
        grad_x = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(dtype) @ W0.to(dtype)).index_add_(-1, idx, grad_s @ B.to(dtype)).to(ctx.dtypes[0])
        if ctx.needs_input_grad[5]:
            n, r = grad_s.shape[-1], x_idx.shape[-1]
            grad_B = (grad_s.reshape(-1, n).t() @ x_idx.to(dtype).reshape(-1, r)).to(ctx.dtypes[1])
        return grad_x, None, None, None, None, grad_B, None, grad if ctx.needs_input_grad[7] else None


def fused_selector_linear(x, x_idx, base, W0, idx, B, scale=1.0, prev=None):
    """base(x) + prev + s · x_idx @ Bᵀ with x_idx = (dropped) x[..., idx]; `base` must be frozen (W0 gives dx)."""
    return _FusedSelectorLinear.apply(x, x_idx, base, W0, idx, B, scale, prev)


class AdaptedLinear(nn.Module):
    """Wraps a frozen nn.Linear or GPT-2 Conv1D (weight stored in×out) with a chain of low-rank links."""

    def __init__(self, base, spec: Adapter, rank, alpha, chain_length=1, seed=0, dropout=0.0):
        super().__init__()
        self.base, self.spec, self.r, self.k = base, spec, rank, chain_length
        self.scale, self.seed, self.link, self.dropout = alpha / rank, seed, 0, dropout
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
        return tuple(self.base_weight().shape)

    def base_weight(self):
        """W0 as n×m (Conv1D stores it transposed)."""
        return out_in_weight(self.base)

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
        mask = dropout_mask(x, self.dropout) if self.dropout and self.training else None
        B = self.current_B()
        if self.spec.selector:
            x_idx = x.index_select(-1, self.idx)
            if mask is not None:
                x_idx = x_idx * mask.index_select(-1, self.idx)  # = drop(x)[..., idx], the same numbers
            if not any(p.requires_grad for p in self.base.parameters()):
                return fused_selector_linear(x, x_idx, self.base, self.base_weight(), self.idx, B, self.scale, prev)
            low_rank = (x_idx @ B.t()) * self.scale
        else:
            low_rank = dense_linear(x if mask is None else x * mask, self.A, B, self.scale)
        y = self.base(x) if prev is None else self.base(x) + prev
        return y + low_rank

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
        drop = f", dropout={self.dropout:g}" if self.dropout else ""
        return f"n={n}, m={m}, r={self.r}, s={self.scale:g}, link={self.link + 1}/{self.k}{drop}"
