"""Early stopping on the validation loss, and the weights of the best validation evaluation.

    stop = EarlyStopping(patience=3, min_delta=0.0)
    if stop.update(step, val_loss, model): ...   # True: `patience` evaluations in a row without an improvement
    stop.restore(model)                          # the weights (and chain links) of the best evaluation

An evaluation improves when its validation loss is below the best so far by more than `min_delta`. The run's cap
(max steps, or epochs) bounds it.

A run is watched link by link (LinkByLink; a non-chained run is one link). With early stopping, each link of a
chain converges on its own: it trains until `patience` of its evaluations in a row do not improve on its own best,
or until its share of the cap (link j: at most round(j·T/k) − round((j−1)·T/k) steps, adapters.chain); its best
weights are then restored and folded, and the next link starts from them. The last link ends the run. Without
early stopping the links end at the fixed shares and nothing is restored. Either way the kept weights
(keep="best") are the best evaluation over every link, restored with the links they had then; when that is in
link j < k, the chain is finished there (finish_chain: the later links untrained, ΔW unchanged).

`converged` is False only when the last link trained ended at its cap while its last evaluation was still its own
best and the best of the whole run (still improving at the end); True otherwise (a link that stopped on patience,
or validation that had stopped improving before the cap); None without any validation evaluation. For a
non-chained run that is: False only when the run ended at its cap while its last evaluation was its best.
"""
import math

from .inject import adapted_layers, owner

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
        module, attr = owner(model, name)
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

    def improves(self, val_loss):
        """Whether an evaluation with this validation loss would be the new best."""
        return val_loss < self.best_loss - self.min_delta

    def update(self, step, val_loss, model, state=None):
        """Record an evaluation; True when the run should stop (patience evaluations without an improvement).
        `state`: the model's trained_state when the caller already took it (one copy for several watchers)."""
        self.last_step = step
        if self.improves(val_loss):
            self.best_loss, self.best_step, self.bad = val_loss, step, 0
            if self.keep_best:
                self.best = trained_state(model) if state is None else state
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


class LinkByLink:
    """Watches a run link by link (a non-chained run is one link): each link's own EarlyStopping, which says when
    the link has converged, and one over every evaluation of the run, whose best are the kept weights.

    The caller (adapters.train) evaluates, calls `update`, and ends a link (`end_link`, then `start_link` for the
    next) when update says so or the link reaches its cap. `restore_links`: a link's best weights are kept, to be
    restored (`restore_link`) before it is folded (early stopping of a chain).
    """

    def __init__(self, chain_length=1, patience=3, min_delta=0.0, keep_best=True, restore_links=False):
        self.k, self.patience, self.min_delta, self.restore_links = chain_length, patience, min_delta, restore_links
        self.run = EarlyStopping(math.inf, min_delta, keep_best)  # never stops anything: links do
        self.records, self.best_link = [], None
        self.start_link(0)

    @property
    def index(self):
        """The current link, 0-based."""
        return len(self.records) - 1

    @property
    def start(self):
        """The step the current link started after."""
        return self.records[-1]["start"]

    def start_link(self, step):
        """The next link starts after `step`. Only a link with a later one to hand over to keeps its best weights:
        the last link's kept weights are the run's to choose."""
        self.records.append(dict(link=len(self.records) + 1, start=step, end=None, steps=None, best_step=None,
                                 best_val_loss=None, ended=None))
        self.link = EarlyStopping(self.patience, self.min_delta, self.restore_links and self.index < self.k - 1)

    def update(self, step, val_loss, model):
        """Record an evaluation of the current link; True when the link has converged (patience evaluations without
        an improvement on its own best)."""
        keeps = [w for w in (self.run, self.link) if w.keep_best and w.improves(val_loss)]
        state = trained_state(model) if keeps else None  # one copy when both watchers keep this evaluation
        if self.run.improves(val_loss):
            self.best_link = self.index + 1
        self.run.update(step, val_loss, model, state)
        return self.link.update(step, val_loss, model, state)

    def end_link(self, step, ended):
        """The current link ended after `step`, on "patience" or at its "cap"."""
        record = self.records[-1]
        record.update(end=step, steps=step - record["start"], best_step=self.link.best_step, ended=ended,
                      best_val_loss=None if self.link.best_step is None else self.link.best_loss)

    def restore_link(self, model):
        """Load the current link's best weights (nothing to do when its last evaluation was its best)."""
        self.link.restore(model)

    def links(self):
        """One record per link of the chain: link (1-based), start, end, steps, best_step, best_val_loss, ended."""
        todo = [dict(link=j + 1, start=None, end=None, steps=0, best_step=None, best_val_loss=None,
                     ended="not reached") for j in range(len(self.records), self.k)]
        return [dict(r) for r in self.records] + todo

    def converged(self):
        """False when the last link trained ended at its cap while its last evaluation was its own best and the
        run's best (still improving at the end); None without an evaluation; True otherwise."""
        if self.run.best_step is None:
            return None
        last, link = self.records[-1], self.link
        return not (last["ended"] == "cap" and link.best_step is not None
                    and link.best_step == link.last_step == self.run.best_step)

    def state_dict(self):
        return dict(run=self.run.state_dict(), link=self.link.state_dict(), link_keeps_best=self.link.keep_best,
                    records=[dict(r) for r in self.records], best_link=self.best_link)

    def load_state_dict(self, state):
        self.run.load_state_dict(state["run"])
        self.records, self.best_link = [dict(r) for r in state["records"]], state["best_link"]
        self.link = EarlyStopping(self.patience, self.min_delta, state["link_keeps_best"])
        self.link.load_state_dict(state["link"])
