"""The study's reference: the untrained model on the runs' own task and splits, one row of the report's table."""
import json

import pytest

from adapters import evaluate
from tests.test_study import tiny_model, tiny_study  # noqa: F401  (the fixtures: one tiny study)


def test_the_report_shows_the_untrained_model_on_the_runs_splits(tiny_study, tiny_model, tmp_path):
    root, result = tiny_study
    ref = json.loads((root / "runs" / "untrained.json").read_text())
    assert not ref["checkpoint"] and ref["target"] == tiny_model and result["settings"]["reference"] == ref
    stats = json.loads(next((root / "runs").glob("*/training_stats.json")).read_text())
    assert {s: ref["splits"][s]["examples"] for s in ("train", "val", "test")} == \
        {s: stats[f"n_{s}"] for s in ("train", "val", "test")}
    # The same numbers as an evaluation of the untrained model by hand, with the runs' split sizes and length.
    study = json.loads((root / "runs" / "study.json").read_text())
    sizes = {k: study["train"][k] for k in ("n_train", "n_val", "n_test", "max_length")}
    want = evaluate.run(tiny_model, seed=result["settings"]["seeds"][0], out=tmp_path / "e.json", progress=False,
                        **sizes)["splits"]
    for split in ("train", "test"):
        assert ref["splits"][split]["loss"] == pytest.approx(want[split]["loss"], rel=1e-6)
    [line] = [x for x in result["markdown"].splitlines() if x.startswith("| untrained model (reference) |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    head = next(x for x in result["markdown"].splitlines() if x.startswith("| method |"))
    columns = [c.strip() for c in head.strip("|").split("|")]
    assert len(cells) == len(columns)
    row = dict(zip(columns, cells))
    assert row["test acc."] == f"{want['test']['metric']:.3g}"
    assert row["Ĝ"] == f"{want['test']['loss'] - want['train']['loss']:.3g}"
    assert row["trained scalars"] == "0" and row["MI bound"] == "n/a"


def test_the_latex_table_has_the_same_reference_row(tiny_study):
    root, result = tiny_study
    tex = (root / "figures" / "report.tex").read_text()
    [line] = [x for x in tex.splitlines() if x.startswith("Untrained model (reference) &")]
    cells = [c.strip() for c in line.removesuffix(r"\\").split("&")]
    head = next(x for x in tex.splitlines() if x.startswith("Method &"))
    assert len(cells) == len(head.split("&"))  # one cell per column, the row after the methods' rows
    md = next(x for x in result["markdown"].splitlines() if x.startswith("| untrained model (reference) |"))
    assert cells[2:] == [c.strip() for c in md.strip("|").split("|")][3:]  # trained 0, then the same numbers
    assert tex.splitlines().index(line) > max(i for i, x in enumerate(tex.splitlines()) if x.startswith("cLA &"))
