"""Where a study keeps its runs: the file names and directory names that the study writes and the report reads.

    RUNS/study.json                       the study's settings (written first)
    RUNS/lr_selection.json                each method's grid, validation scores, chosen lr and final runs
    RUNS/untrained.json                   the untrained model evaluated on the study's task: the reference
    RUNS/<method>-lr<lr>-s<seed>/         one checkpoint per run (diagnostics/ beside its files)
"""
from pathlib import Path

STUDY_FILE, SELECTION_FILE = "study.json", "lr_selection.json"
REFERENCE_FILE = "untrained.json"  # the untrained model on the study's task (adapters.evaluate): the reference row


def run_dir(runs, method, seed, lr):
    return Path(runs) / f"{method}-lr{lr:g}-s{seed}"


def data_label(study):
    """What a study was computed on, in one line, from its settings (runs/study.json): "task movie-reviews (built
    in)", or "data small.csv (sha256 1a2b3c4d5e6f…)" for a user's file (and "as task NAME" when --task renamed it)."""
    if not study.get("data"):
        return f"task {study.get('task')} (built in)"
    sha = study.get("data_sha256")
    renamed = study.get("task") and study["task"] != Path(study["data"]).stem
    return (f"data {Path(study['data']).name}" + (f" (sha256 {sha[:12]}…)" if sha else "")
            + (f" as task {study['task']}" if renamed else ""))
