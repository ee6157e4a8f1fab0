"""Mutual-information generalization bound and the trained-scalar counts that feed it (docs/THEORY.md §1).

If the loss is σ-sub-Gaussian, |E G| ≤ sqrt(2 σ² I(S; W) / |N|) (Xu & Raginsky, 2017), and
I(S; W) ≤ H(trained scalars) ≤ P · q · ln 2 nats for P scalars stored in q bits each, so

    G ≤ sqrt( 2 q σ² ln2 · P / |N| ).
"""
import math

from adapters import methods as registry
from adapters.errors import AdapterError

METHODS = sorted(registry.METHODS)


def mi_bound(trained_parameters, n_examples, sigma, bits):
    """sqrt(2 q σ² ln2 · P / |N|): the bound on the expected generalization error (loss units)."""
    if not (isinstance(trained_parameters, int) or float(trained_parameters).is_integer()) \
            or trained_parameters < 0:
        raise AdapterError(f"trained_parameters must be a non-negative integer, got {trained_parameters!r}")
    if not n_examples > 0:
        raise AdapterError(f"n_examples must be > 0, got {n_examples!r}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise AdapterError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (bits > 0 and math.isfinite(bits)):
        raise AdapterError(f"bits must be > 0, got {bits!r}")
    return math.sqrt(2.0 * bits * sigma ** 2 * math.log(2.0) * trained_parameters / n_examples)


def sigma_from_range(loss_max, loss_min=0.0):
    """Hoeffding: a loss in [a, b] is (b − a)/2-sub-Gaussian. Cross-entropy has a = 0."""
    if not (loss_max > loss_min and math.isfinite(loss_max)):
        raise AdapterError(f"loss bound must be finite and > {loss_min}, got {loss_max!r}")
    return (loss_max - loss_min) / 2.0


def is_vacuous(bound, loss_max, loss_min=0.0):
    """Whether a bound on G says nothing: a loss in [a, b] has |G| ≤ b − a for any weights, so a bound
    ≥ b − a is vacuous. None when the loss has no known range (a user-given σ)."""
    if loss_max is None:
        return None
    return bool(bound >= loss_max - loss_min)


def formula_parameters(method, rank, chain_length, layers):
    """Adapter scalars by docs/METHODS.md "Trainable-parameter counts"; layers = [(m_i, n_i)] (in, out).

    lora, lora_plus: r(m+n); asym, cla, rcla, paca, dpaca: r·n; cola: k·r(m+n);
    rac, c3la, rc3la: k·r·n; fft: m·n per adapted matrix (weights only, biases/norms/head are
    counted from the tensors); head: 0 adapter scalars (the head is counted separately).
    """
    if method not in METHODS:
        raise AdapterError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    record = registry.METHODS[method]
    if record.adapter is None:  # no adapter layers: every adapted matrix trains (fft), or none does (head)
        return sum(m * n for m, n in layers) if record.trains_base else 0
    if not (isinstance(rank, int) and rank > 0):
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    k = chain_length if record.adapter.chained else 1
    if not (isinstance(k, int) and k > 0):
        raise AdapterError(f"chain_length must be a positive integer, got {chain_length!r}")
    # A trained: r(m+n) per link; A frozen or a selector: r·n (B only, or PaCA's r columns of W0)
    per_layer = (lambda m, n: m + n) if record.adapter.train_a else (lambda m, n: n)
    return k * rank * sum(per_layer(m, n) for m, n in layers)
