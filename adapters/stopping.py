"""Early stopping on the validation loss, and the weights of the best validation evaluation.

    stop = EarlyStopping(patience=3, min_delta=0.0)
    if stop.update(step, val_loss, model): ...   # True: `patience` evaluations in a row without an improvement
    stop.restore(model)                          # the weights (and chain links) of the best evaluation

An evaluation improves when its validation loss is below the best so far by more than `min_delta`. The run's cap
(max steps, or epochs) bounds it; a chained method's link schedule is part of that cap (links end at equal
shares of it) and stopping acts within the last link only (adapters.train watches the evaluations after the last
fold): every chained run trains all k links, as the paper's chains do, and its kept weights are the last link's
best. Were earlier links watched too, a run converging before the first fold would keep link 1 alone, its
non-chained twin (c3la = cla). The best weights are kept with the links they had then.
`converged` is False only when the run ended at its cap while its last evaluation was still its best (still
improving); True when patience ran out or the validation loss had stopped improving before the cap.
"""
import math

from .inject import adapted_layers

KEEP = ("best", "final")


def trained_state(model):
    """CPU copies of what training changes: the trained parameters, every buffer (folded links, selectors) and
    each adapted layer's link index."""
    params = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()}
    links = {n: layer.link for n, layer in adapted_layers(model).items()}
    return dict(params=params, buffers=buffers, links=links)


def load_trained_state(model, state):
    """Put `trained_state` back, in place: parameters are copied into (the optimizer keeps pointing at them),
    buffers replaced (a folded link changes their shapes), link indices reset."""
    named = dict(model.named_parameters())
    for name, value in state["params"].items():
        named[name].data.copy_(value)
    for name, value in state["buffers"].items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        old = getattr(module, attr)
        setattr(module, attr, value.to(old.device, old.dtype))
    layers = adapted_layers(model)
    for name, link in state["links"].items():
        layers[name].link = link


def finish_chain(model):
    """End a chain that stopped before its last link: the links not reached stay untrained (B = 0, so ΔW is
    unchanged) and the model holds all k links, as a full run's does (what checkpoint.save writes). Returns the
    number of links that were trained (0 for a model without a chain)."""
    from .inject import next_link
    layers = list(adapted_layers(model).values())
    if not layers or not layers[0].spec.chained:
        return 0
    trained = layers[0].link + 1
    for _ in range(layers[0].k - trained):
        next_link(model)
    return trained


class EarlyStopping:
    """Watches the validation loss of each evaluation; keeps the best evaluation's weights when asked to."""

    def __init__(self, patience=3, min_delta=0.0, keep_best=True):
        self.patience, self.min_delta, self.keep_best = patience, min_delta, keep_best
        self.best_loss, self.best_step, self.bad, self.best, self.last_step = math.inf, None, 0, None, None

    def update(self, step, val_loss, model):
        """Record an evaluation; True when the run should stop (patience evaluations without an improvement)."""
        self.last_step = step
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad = val_loss, step, 0
            if self.keep_best:
                self.best = trained_state(model)
        else:
            self.bad += 1
        return self.bad >= self.patience

    def restore(self, model):
        """Load the best evaluation's weights into `model` (nothing to do when the last one was the best)."""
        if self.best is not None and self.best_step != self.last_step:
            load_trained_state(model, self.best)

    def converged(self):
        """False when the last evaluation was still the best one (still improving at the end); None without one."""
        return None if self.best_step is None else self.best_step != self.last_step

    def state_dict(self):
        return dict(best_loss=self.best_loss, best_step=self.best_step, bad=self.bad, best=self.best,
                    last_step=self.last_step)

    def load_state_dict(self, state):
        for k, v in state.items():
            setattr(self, k, v)
