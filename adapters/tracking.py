"""Where training reports its numbers: accelerate's trackers (--report-to), and the monitor hook.

A monitor is any callable `monitor(model, step) -> {name: float}` that training calls at each evaluation
(adapters.train) or logging step (adapters.callback.AdaptersCallback); its values go to the same trackers as the
losses. If it has a `start(n_examples=...)` method, training calls it once before the first step with the training
set's size.
adapters/ defines the hook only: the toolkit's own monitor (intruders, ‖ΔW‖, stable rank, the MI bound so far,
λ_max) is analysis.monitor.Diagnostics, a floor above, which the package registers under the entry-point group
MONITORS (pyproject.toml); `installed_monitor()` finds it there when analysis/ is installed beside adapters/.
"""
import importlib.metadata
import importlib.util

from .errors import AdapterError

MONITORS = "beyond_lora.monitors"  # entry-point group: name -> a monitor class (called with n_examples=...)


def installed_monitor(name="diagnostics"):
    """The monitor class registered under `name` in MONITORS, or None when no installed package registers it."""
    found = [ep for ep in importlib.metadata.entry_points(group=MONITORS) if ep.name == name]
    return found[0].load() if found else None


def start_monitor(monitor, n_examples):
    """Tell a monitor the training set's size, if it asks (see the module docstring)."""
    if monitor is not None and hasattr(monitor, "start"):
        monitor.start(n_examples=n_examples)


TRACKERS = ("tensorboard", "wandb", "trackio")


def tracker_names(report_to):
    """--report-to tensorboard|wandb|trackio|none|all (or a list) -> accelerate's log_with list.

    "all": the installed ones. A named tracker that is not installed is an AdapterError saying what to install."""
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    names = [str(n).lower() for n in names if n is not None]
    if "all" in names:
        return [t for t in TRACKERS if importlib.util.find_spec(t)]
    out = []
    for name in names:
        if name == "none":
            continue
        if name not in TRACKERS:
            raise AdapterError(f"unknown --report-to {name!r}; choose from {', '.join(TRACKERS + ('none', 'all'))}")
        if importlib.util.find_spec(name) is None:
            raise AdapterError(f"--report-to {name}: the {name} package is not installed (pip install {name})")
        out.append(name)
    return list(dict.fromkeys(out))


def tracker_config(config):
    """A resolved config as trackers store it (TensorBoard's hparams take only numbers, strings and bools)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def log_scalars(accelerator, values, step):
    """Log {name: float} to every tracker of `accelerator` (main process only, as accelerate does)."""
    if values and accelerator.trackers:
        accelerator.log({k: float(v) for k, v in values.items()}, step=step)
