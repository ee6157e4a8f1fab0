"""The study's runs as records: each final run's statistics, bounds and diagnostics, read from its own files.

Every number is read from a run's own files (training_stats.json, diagnostics/*/…json) or computed by the package
that owns its formula (bounds.report for the bounds, analysis.spectral for intruder averages); nothing is re-typed.
DIAGNOSTICS and OUTCOMES say how to read each quantity off a record.
"""
import json
from pathlib import Path

from adapters.errors import AdapterError
from analysis.layout import SELECTION_FILE, STUDY_FILE


def _rise(landscape):
    return landscape["sharpness"]["loss_rise"][-1]["mean_rise"] if landscape else None


def _top(hessian):
    return hessian["eigenvalues"][0] if hessian else None


# Each diagnostic: its label and how to read its number for one run (None when the run lacks it). All are
# oriented so that "larger" is the diagnostic's prediction of a larger generalization gap.
DIAGNOSTICS = {
    "mi_bound": ("MI bound √(2qσ²ln2·P/|N|)", lambda run: run["bounds"]["mi_bound"]),
    "intruders": ("intruders per compared matrix (ε = 0.5, k = all)",
                  lambda run: run["intruders"]["mean_intruders"] if run["intruders"] else None),
    "sharpness": ("loss rise at ρ, common space W0+ΔW", lambda run: _rise(run["landscape"])),
    "hessian": ("Hessian λ_max, common space W0+ΔW", lambda run: _top(run["hessian"])),
    "sharpness_trainable": ("loss rise at ρ, own trainable space", lambda run: _rise(run["landscape_trainable"])),
    "hessian_trainable": ("Hessian λ_max, own trainable space", lambda run: _top(run["hessian_trainable"])),
}
OUTCOMES = {
    "test_metric": ("test accuracy", lambda run: run["stats"]["test_metric"]),
    "gap": ("Ĝ = L_test − L_train", lambda run: run["stats"]["generalization_gap"]),
    "gap_clipped": ("Ĝ of the loss clipped at b", lambda run: run["bounds"]["clipped_gap"]),
}
# Where each landscape/Hessian diagnostic lives in a run, and the space it must have been taken in.
SOURCES = {"landscape": ("landscape", "effective"), "landscape_trainable": ("landscape", "trainable"),
           "hessian": ("hessian", "effective"), "hessian_trainable": ("hessian", "trainable")}


def read_json(path):
    return json.loads(path.read_text()) if path.exists() else None


def _diagnostic(run_dir, name):
    kind, space = SOURCES[name]
    result = read_json(Path(run_dir) / "diagnostics" / name / f"{kind}.json")
    if result is not None and result.get("space") != space:
        raise AdapterError(f"{run_dir}/diagnostics/{name} holds a {kind} in space {result.get('space')!r}, "
                           f"the report reads space {space!r} there: rerun the study to recompute it")
    return result


def collect(runs, loss_clip=4.0):
    """One record per run directory (a checkpoint with training_stats.json) under `runs`."""
    from bounds.report import checkpoint_row
    import adapters
    runs = Path(runs)
    selection = read_json(runs / SELECTION_FILE)
    # The study's learning-rate search leaves runs at the lrs it did not choose: only the final ones are reported.
    # Final runs are children of `runs` (listed by name; older lists held paths): found wherever `runs` now lies.
    dirs = (sorted(runs / Path(d).name for m in selection["methods"].values() for d in m["runs"]) if selection
            else sorted(p.parent for p in runs.glob("*/training_stats.json")))
    if not dirs:
        raise AdapterError(f"no runs in {runs}: expected RUNS/<run>/training_stats.json")
    records = []
    for d in dirs:
        meta = adapters.read_meta(d)
        spectral = read_json(d / "diagnostics" / "spectral" / "spectral.json")
        stats = adapters.read_stats(d)
        records.append(dict(outcomes=test_outcomes(d),
            path=str(d), method=meta["method"], seed=meta.get("seed", 0), stats=stats,
            lr=(meta.get("training") or {}).get("lr"), val_loss_falling=val_loss_falling(stats["history"]),
            converged=converged(stats),
            bounds=checkpoint_row(d, loss_clip=loss_clip),
            spectral=spectral["checkpoints"][0] if spectral else None,
            spectral_settings=(spectral or {}).get("settings"),
            **{name: _diagnostic(d, name) for name in SOURCES}))
    return records


def test_outcomes(run_dir):
    """The run's per-example test outcomes (correct, losses, units; recorded by training with the digest of its
    weights), for claims paired by test example; None for a run without them (trained before they were recorded)."""
    from adapters.example_losses import example_outcomes
    try:
        return example_outcomes(run_dir, "test")
    except AdapterError:
        return None


def converged(stats):
    """False when the run hit its cap while validation loss still improved (training_stats' `converged`, written by
    adapters.train; for a run from before it: whether validation loss had stopped falling), None if unknown."""
    if "converged" in stats:
        return stats["converged"]
    falling = val_loss_falling(stats["history"])
    return None if falling is None else not falling


def val_loss_falling(history):
    """Whether the validation loss still fell over the run's last evaluation interval (it had not yet fit, or
    was not yet overfitting); None without two validation evaluations."""
    losses = [h.get("val_loss") for h in history if h.get("val_loss") is not None]
    return losses[-1] < losses[-2] if len(losses) >= 2 else None


# -- one matrix set for the intruders -------------------------------------------------------------

def _adapts_matrices(method):
    from adapters.methods import get_method
    spec = get_method(method)
    return spec.adapter is not None or spec.trains_base


def compared_matrices(records):
    """The matrices every method's intruders are averaged over, in forward order: those every LoRA-family run
    adapts (without LoRA-family runs: those every full fine-tune has)."""
    from adapters.methods import get_method
    with_spectral = [r for r in records if r["spectral"]]
    pool = ([r for r in with_spectral if get_method(r["method"]).adapter is not None]
            or [r for r in with_spectral if _adapts_matrices(r["method"])])
    if not pool:
        return []
    common = set.intersection(*({x["name"] for x in r["spectral"]["layers"]} for r in pool))
    return [x["name"] for x in pool[0]["spectral"]["layers"] if x["name"] in common]


def restrict_intruders(record, names):
    """analysis.spectral's totals over the compared matrices of one run; None for a method that adapts none."""
    from analysis import spectral
    if not record["spectral"] or not names or not _adapts_matrices(record["method"]):
        return None
    layers = {x["name"]: x for x in record["spectral"]["layers"]}
    missing = [n for n in names if n not in layers]
    if missing:
        raise AdapterError(f"{record['path']}: spectral.json has no record of the compared matrix {missing[0]}")
    return spectral.summarise([layers[n] for n in names])


def hessian_converged(record, key):
    """For the Hessian diagnostics: whether the run's Lanczos iteration converged (None elsewhere)."""
    source = {"hessian": "hessian", "hessian_trainable": "hessian_trainable"}.get(key)
    result = record.get(source) if source else None
    return None if result is None else bool(result["lanczos"]["converged"])


def machines(records):
    """The machines the runs trained on, as training_stats records them: 'CPU model (N logical CPUs)' or the GPU's
    name, each once; runs from before the record are left out."""
    seen = {}
    for r in records:
        m = r["stats"].get("machine")
        if m:
            seen[m.get("gpu") or f"{m['cpu']} ({m['logical_cpus']} logical CPUs)"] = None
    return list(seen)


def study_elapsed(runs):
    """Seconds from the study's start (runs/study.json, written first) to the last result file any run wrote; None
    outside a study. Measured off the files, so it holds for the runs as they are, however they were scheduled."""
    runs = Path(runs)
    if not (runs / STUDY_FILE).exists():
        return None
    results = [p.stat().st_mtime for pattern in ("*/training_stats.json", "*/diagnostics/*/*.json")
               for p in runs.glob(pattern)]
    return max(results) - (runs / STUDY_FILE).stat().st_mtime if results else None
