"""Settings as data (adapters.settings) and the one CLI contract every command follows (adapters.command)."""
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Optional

import pytest
import yaml

from adapters import command
from adapters.errors import AdapterError, cli
from adapters.settings import AT_LEAST_1, FRACTION, check, make, setting, shaping


@dataclass(frozen=True)
class Toy:
    rank: int = setting(16, "rank r", check=AT_LEAST_1)
    warmup: float = setting(0.06, "warmup fraction", check=FRACTION)
    method: str = setting("cla", "the method", choices=("cla", "lora"))
    targets: Optional[list[str]] = setting(None, "module names (default: the family's)")
    diagnostics: list[str] = setting(["spectral"], "diagnostics", choices=("spectral", "hessian"), nargs="*")
    group_by_length: bool = setting(True, "plain batches", flag="--no-group-by-length")
    sweep: bool = setting(False, "draw the sweep")
    early_stopping: Optional[bool] = setting(None, "train to the cap", flag="--no-early-stopping")
    data_file: Optional[str] = setting(None, "your data", flag="--data")
    out: str = command.out("toy", "toy.json")
    formats: tuple = command.formats(("md", "png"))


def _parse(argv, **kw):
    return command.parse(command.parser("toy", "A toy.", Toy), Toy, argv, **kw)


def test_every_kind_of_field_becomes_the_flag_its_type_says():
    config, rest = _parse([])
    assert config == Toy() and rest == {}
    config, _ = _parse(["--rank", "4", "--targets", "query", "value", "--diagnostics", "--no-group-by-length",
                        "--sweep", "--no-early-stopping", "--data", "f.csv", "--formats", "tex,svg"])
    assert config == Toy(rank=4, targets=["query", "value"], diagnostics=[], group_by_length=False, sweep=True,
                         early_stopping=False, data_file="f.csv", formats=("tex", "svg"))
    assert _parse(["--diagnostics", "spectral", "hessian"])[0].diagnostics == ["spectral", "hessian"]


def test_a_config_file_gives_the_same_settings_as_the_same_flags_and_the_command_line_wins(tmp_path):
    file = tmp_path / "toy.yaml"
    file.write_text(yaml.safe_dump({"rank": 4, "no-group-by-length": True, "data": "f.csv", "formats": "tex",
                                    "diagnostics": [], "early_stopping": False}))
    flags = ["--rank", "4", "--no-group-by-length", "--data", "f.csv", "--formats", "tex", "--diagnostics",
             "--no-early-stopping"]
    assert _parse(["--config", str(file)]) == _parse(flags)
    assert _parse(["--config", str(file), "--rank", "2"])[0].rank == 2


@pytest.mark.parametrize("argv, message", [
    (["--rank", "0"], "rank must be >= 1, got 0"),
    (["--warmup", "1"], "warmup must be in [0, 1), got 1.0"),
    (["--method", "dora"], "invalid choice: 'dora'"),
    (["--formats", "png,gif"], "argument --formats: unknown format 'gif'"),
    (["--form", "md"], "unrecognized arguments: --form"),  # a prefix is not a flag
    (["--rnak", "2"], "unrecognized arguments: --rnak"),
    (["--k", "5"], "--k is now --rank (same meaning): use --rank"),
    (["--k=5"], "--k is now --rank (same meaning): use --rank"),
    (["--chain", "2"], "--chain is gone: give --rank"),
])
def test_bad_input_is_one_adapter_error_line(argv, message):
    with pytest.raises(AdapterError) as e:
        _parse(argv, renamed={"--k": "--rank", "--chain": "--chain is gone: give --rank"})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_check_refuses_what_python_callers_pass_and_make_refuses_unknown_settings():
    for bad, message in ((dict(rank=0), "rank must be >= 1"), (dict(rank=True), "rank must be >= 1"),
                         (dict(warmup=float("nan")), "warmup must be in [0, 1)"),
                         (dict(method="dora"), "method must be one of cla, lora, got 'dora'"),
                         (dict(diagnostics=["spectral", "x"]), "diagnostics must be one of spectral, hessian"),
                         (dict(formats=("png", "gif")), "formats must be one of md, tex, png, pdf, svg, got 'gif'")):
        with pytest.raises(AdapterError) as e:
            check(Toy(**bad))
        assert message in str(e.value)
    with pytest.raises(AdapterError, match="unknown Toy setting"):
        make(Toy, rnak=2)
    assert make(Toy, Toy(rank=4), sweep=True) == Toy(rank=4, sweep=True)
    with pytest.raises(AdapterError, match="unknown format 'gif'"):
        command.check_formats(["png", "gif"])


def test_shaping_is_the_fields_marked_as_results_in_their_order():
    assert list(shaping(Toy())) == ["rank", "warmup", "method", "targets", "diagnostics", "group_by_length", "sweep",
                                    "early_stopping", "data_file"]


def test_help_shows_each_default_as_it_is_typed(capsys):
    with pytest.raises(SystemExit):
        command.parser("toy", "A toy.", Toy).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: md,png)" in text and "(default: spectral)" in text and "(default: 16)" in text


def test_cli_returns_2_for_bad_input_and_the_value_of_main_otherwise(capsys):
    @cli
    def main(argv=None):
        if argv:
            raise AdapterError("bad thing")
        return 0
    assert main([]) == 0
    assert main(["x"]) == 2 and capsys.readouterr().err == "error: bad thing\n"


def test_write_tables_writes_the_table_formats_the_command_has_and_says_which(tmp_path):
    texts = {"md": "| a |", "tex": "\\begin{table}"}
    assert command.write_tables(tmp_path, "toy", ("png", "tex", "md"), texts) == [tmp_path / "toy.tex",
                                                                               tmp_path / "toy.md"]
    assert (tmp_path / "toy.md").read_text() == "| a |" and (tmp_path / "toy.tex").read_text() == "\\begin{table}"
    assert command.write_tables(tmp_path / "b", "toy", ("tex", "pdf"), {"md": "x"}) == []  # no tex table: none
    assert not (tmp_path / "b").exists()
    assert command.table_paths(tmp_path, "toy", ("md", "svg")) == [tmp_path / "toy.md"]


def test_out_dir_refuses_a_file(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(AdapterError, match="--out .*x.json is a file: --out is the directory toy writes toy.json"):
        command.out_dir(tmp_path / "x.json", "toy")
    assert command.out_dir(tmp_path / "new", "toy") == tmp_path / "new"


# -- the contract, command by command ------------------------------------------------------------------------------
COMMANDS = {  # module: (its settings class, a positional argument it needs)
    "adapters.train": ("TrainConfig", []), "adapters.evaluate": ("EvaluateConfig", ["CKPT"]),
    "bounds.__main__": ("BoundsConfig", ["CKPT"]), "analysis.spectral": ("SpectralConfig", ["CKPT"]),
    "analysis.landscape": ("LandscapeConfig", ["CKPT"]), "analysis.hessian": ("HessianConfig", ["CKPT"]),
    "analysis.report": ("ReportConfig", ["RUNS"]), "analysis.study": ("StudyConfig", []),
    "analysis.suite": ("SuiteConfig", ["SUITE"]),
}
# Where a command has no use for a common flag: training draws no tables or figures; the report computes statistics
# and draws, it runs no model.
NOT_TAKEN = {"adapters.train": {"formats"}, "analysis.report": {"device"}}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_the_same_shape(name, tmp_path, capsys):
    module = importlib.import_module(name)
    cls, positional = getattr(module, COMMANDS[name][0]), COMMANDS[name][1]
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    p = module.parser()
    dests = {a.dest for a in p._actions}
    # every setting is a flag with the setting's own default, and nothing else is, but the positionals
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert dests - {"help", "config"} - set(fields) == {a.dest for a in p._actions if not a.option_strings}
    for a in p._actions:
        if a.dest in fields:
            assert a.default == (fields[a.dest].default_factory() if fields[a.dest].default_factory is not
                                 dataclasses.MISSING else fields[a.dest].default), (name, a.dest)
    common = {"config", "out", "device", "formats"} - NOT_TAKEN.get(name, set())
    assert common <= dests, (name, common - dests)
    assert "--out" in {o for a in p._actions for o in a.option_strings if a.dest == "out"}
    assert not p.allow_abbrev
    # bad input: main returns 2 with one line, and writes nothing
    out = tmp_path / "out"
    assert module.main([*positional, "--out", str(out), "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--no-such-flag" in err
    assert not out.exists()
