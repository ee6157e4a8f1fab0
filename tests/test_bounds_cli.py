"""python -m bounds: rows on fabricated and real checkpoints, σ options, tables, Kendall τ, bad input."""
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import bounds
from adapters.errors import AdapterError
from bounds.__main__ import main

LN2 = math.log(2.0)
LAYERS = [dict(name="l1", m=10, n=20), dict(name="l2", m=20, n=5), dict(name="l3", m=5, n=8)]
HEAD = 42
R, K = 4, 3


def hand_count(method):
    """docs/METHODS.md counts written out per layer for LAYERS, r = 4, k = 3 (the chained methods)."""
    per_layer = {
        "lora": lambda m, n: R * (m + n), "lora_plus": lambda m, n: R * (m + n),
        "asym": lambda m, n: R * n, "cla": lambda m, n: R * n, "rcla": lambda m, n: R * n,
        "paca": lambda m, n: R * n, "dpaca": lambda m, n: R * n,
        "cola": lambda m, n: K * R * (m + n), "rac": lambda m, n: K * R * n,
        "c3la": lambda m, n: K * R * n, "rc3la": lambda m, n: K * R * n,
        "fft": lambda m, n: m * n + n,  # weight + bias, all trained
        "head": lambda m, n: 0,
    }[method]
    return [per_layer(layer["m"], layer["n"]) for layer in LAYERS]


def fabricate(directory, method, *, stats=None, bits=32, **meta_extra):
    """A checkpoint directory by hand (docs/CHECKPOINT.md): adapters_meta.json + training_stats.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counts = hand_count(method)
    adapter = 0 if method == "fft" else sum(counts)
    other = sum(counts) if method == "fft" else 0
    meta = dict(format_version=1, method=method, rank=R, alpha=2 * R, scale=2.0,
                chain_length=K if method in ("cola", "rac", "c3la", "rc3la") else 1, seed=0,
                targets=[layer["name"] for layer in LAYERS], head=["classifier"], bits=bits,
                parameters=dict(layers=[dict(layer, trained=c) for layer, c in zip(LAYERS, counts)],
                                adapter=adapter, head=HEAD, other=other, total=adapter + HEAD + other))
    meta.update(meta_extra)
    (directory / "adapters_meta.json").write_text(json.dumps(meta))
    if stats is not False:
        stats = stats or dict(n_train=1000, n_test=200, train_loss=0.3, test_loss=0.45,
                              generalization_gap=0.15, train_loss_max=3.0, test_loss_max=5.0)
        (directory / "training_stats.json").write_text(json.dumps(stats))
    return str(directory)


def run_json(capsys, *argv):
    """The rows of OUT/bounds.json (what --format json printed before) of `python -m bounds ARGV --out OUT`."""
    with tempfile.TemporaryDirectory() as out:
        assert main([*argv, "--out", out]) == 0
        printed = capsys.readouterr().out
        assert printed.splitlines()[-1].startswith(f"wrote {out}/bounds.json")  # the summary line, last
        return json.loads((Path(out) / "bounds.json").read_text())


def run_error(capsys, *argv):
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def check_flags_are_the_fields(parser, settings_cls):
    """Every field of a command's settings dataclass is one option of its parser: the field's flag, dest = the
    field's name, default = the field's default (the one default: the function's, the parser's and --help's)."""
    from adapters import settings
    by_dest = {a.dest: a for a in parser._actions}
    for f in settings.fields(settings_cls):
        action = by_dest.get(f.name)
        assert action is not None, f"setting {f.name} has no flag"
        assert action.option_strings == [settings.option(f)], (f.name, action.option_strings)
        assert action.default == settings.default(f), (f.name, action.default, settings.default(f))


ALL_METHODS = ["fft", "head", "lora", "lora_plus", "asym", "cla", "rcla", "cola", "rac", "c3la", "rc3la",
               "paca", "dpaca"]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_mi_row_equals_closed_formula(tmp_path, capsys, method):
    ckpt = fabricate(tmp_path / method, method, bits=16)
    [row] = run_json(capsys, ckpt, "--sigma", "0.7", "--no-theorem1")
    P = sum(hand_count(method)) + HEAD
    assert row["trained_parameters"] == P
    assert row["mi_bound"] == pytest.approx(math.sqrt(2 * 16 * 0.7 ** 2 * LN2 * P / 1000), rel=1e-14)
    assert row["formula_match"] is (None if method == "fft" else True)
    if method == "fft":
        assert row["formula_adapter_parameters"] == sum(x["m"] * x["n"] for x in LAYERS)
    for key in ("path", "method", "n_train", "bits", "sigma", "trained_parameters", "adapter_parameters",
                "mi_bound", "empirical_gap"):
        assert key in row
    assert (row["method"], row["n_train"], row["bits"], row["sigma"], row["empirical_gap"]) == \
        (method, 1000, 16, 0.7, 0.15)


def test_formula_mismatch_is_flagged(tmp_path, capsys):
    ckpt = fabricate(tmp_path / "c", "cola", chain_length=1)  # a chain that did not count its links
    [row] = run_json(capsys, ckpt, "--sigma", "1", "--no-theorem1")
    assert row["formula_match"] is False
    assert main([ckpt, "--sigma", "1", "--no-theorem1", "--out", str(tmp_path / "b")]) == 0
    assert "WARNING" in capsys.readouterr().out


def test_sigma_sources(tmp_path, capsys):
    ckpt = fabricate(tmp_path / "c", "cla")
    [row] = run_json(capsys, ckpt, "--loss-clip", "4", "--no-theorem1")
    assert row["sigma"] == 2.0 and not row["sigma_heuristic"] and "clipped" in row["sigma_source"]
    for argv in ([], ["--sigma-from", "max-train-loss"]):
        [row] = run_json(capsys, ckpt, "--no-theorem1", *argv)
        # The default reads the training split only: B = train_loss_max = 3.0 (the test split's 5.0 is not
        # looked at), σ = B/2.
        assert row["sigma"] == 1.5 and row["sigma_heuristic"] and "HEURISTIC" in row["sigma_source"]
        assert row["loss_range"] == [0.0, 3.0] and "max-train-loss" in row["sigma_source"]
    [row] = run_json(capsys, ckpt, "--no-theorem1", "--sigma-from", "max-loss")
    assert row["sigma"] == 2.5 and "test split included" in row["sigma_source"]  # an explicit choice, labelled
    assert main([ckpt, "--no-theorem1", "--out", str(tmp_path / "b")]) == 0
    assert "heuristic" in capsys.readouterr().out
    no_train_max = fabricate(tmp_path / "t", "cla", stats=dict(n_train=10, test_loss_max=5.0))
    assert "train_loss_max" in run_error(capsys, no_train_max, "--no-theorem1")


def test_kendall_tau_between_bound_and_gap(tmp_path, capsys):
    # MI bound grows with P: lora (r(m+n)) > cla (r n) > head (0); choose the gaps per case.
    def tau_for(gaps):
        ckpts = [fabricate(tmp_path / f"{m}{gaps}", m, stats=dict(n_train=100, generalization_gap=g))
                 for m, g in zip(["head", "cla", "lora", "cola"], gaps)]
        rows = run_json(capsys, *ckpts, "--sigma", "1", "--no-theorem1")
        assert [r["mi_bound"] for r in rows] == sorted(r["mi_bound"] for r in rows)
        return rows[0]["kendall_tau"]["mi_bound"]["tau"]
    assert tau_for([0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)
    assert tau_for([0.4, 0.3, 0.2, 0.1]) == pytest.approx(-1.0)
    assert tau_for([0.2, 0.1, 0.3, 0.4]) == pytest.approx((5 - 1) / 6)  # one discordant pair of six


def test_markdown_and_latex_tables(tmp_path, capsys):
    ckpts = [fabricate(tmp_path / m, m) for m in ("cla", "fft", "lora")]
    out = tmp_path / "out"
    assert main([*ckpts, "--sigma", "1", "--no-theorem1", "--out", str(out)]) == 0
    tex = (out / "bounds.tex").read_text()
    for needle in (r"\toprule", r"\midrule", r"\bottomrule", "Full FT", "LoRA", "cLA", "Kendall"):
        assert needle in tex
    # grouped in the paper's order: full FT, LoRA family, sparse variants
    assert tex.index("full FT") < tex.index("LoRA family") < tex.index("sparse variants")
    md = (out / "bounds.md").read_text()
    assert md.startswith("| method") and md.count("\n| ") == 3  # header, then one row per checkpoint
    assert "Kendall τ" in md and "user-given" in md
    # stdout: the markdown table, then one line naming what was written
    assert capsys.readouterr().out == md + f"wrote {out}/bounds.json, {out}/bounds.md, {out}/bounds.tex\n"
    assert sorted(p.name for p in out.iterdir()) == ["bounds.json", "bounds.md", "bounds.tex"]  # no temp file left


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------

def test_bad_input_exits_2(tmp_path, capsys):
    good = fabricate(tmp_path / "good", "cla")
    out = tmp_path / "out"
    for argv in (["--sigma", "0"], ["--sigma", "-1"], ["--loss-clip", "0"], ["--bits", "0"], ["--bits", "-8"],
                 ["--n-examples", "0"], ["--sigma", "abc"], ["--sigma", "1", "--loss-clip", "2"],
                 ["--sigma", "nan"], ["--lipschitz", "-1"], ["--lipschitz", "inf"]):
        run_error(capsys, good, "--no-theorem1", "--out", str(out), *argv)
    assert "sigma" in run_error(capsys, good, "--sigma", "0")
    # bits ≤ 0 in the checkpoint itself
    run_error(capsys, fabricate(tmp_path / "bits0", "cla", bits=0), "--sigma", "1", "--no-theorem1")
    # missing statistics without --n-examples; with it, it runs
    nostats = fabricate(tmp_path / "nostats", "cla", stats=False)
    assert "--n-examples" in run_error(capsys, nostats, "--sigma", "1", "--no-theorem1")
    [row] = run_json(capsys, nostats, "--sigma", "1", "--no-theorem1", "--n-examples", "50")
    assert row["n_train"] == 50 and row["empirical_gap"] is None
    # no σ given and no loss maximum to fall back on
    run_error(capsys, fabricate(tmp_path / "noloss", "cla", stats=dict(n_train=10)), "--no-theorem1")
    # corrupt checkpoints: bad JSON, missing directory, no parameters, unknown method, not a checkpoint
    bad = fabricate(tmp_path / "badjson", "cla")
    (Path(bad) / "adapters_meta.json").write_text("{not json")
    run_error(capsys, bad, "--sigma", "1", "--no-theorem1")
    run_error(capsys, str(tmp_path / "missing"), "--sigma", "1")
    run_error(capsys, fabricate(tmp_path / "noparams", "cla", parameters=None), "--sigma", "1", "--no-theorem1")
    unknown = fabricate(tmp_path / "unknown", "cla")
    meta = json.loads((Path(unknown) / "adapters_meta.json").read_text())
    (Path(unknown) / "adapters_meta.json").write_text(json.dumps(dict(meta, method="c3a")))
    assert "c3a" in run_error(capsys, unknown, "--sigma", "1", "--no-theorem1")
    (tmp_path / "empty").mkdir()
    run_error(capsys, str(tmp_path / "empty"), "--sigma", "1")
    # statistics that are not an object; bits that are not a number
    liststats = fabricate(tmp_path / "liststats", "cla")
    (Path(liststats) / "training_stats.json").write_text("[1, 2]")
    run_error(capsys, liststats, "--sigma", "1", "--no-theorem1")
    run_error(capsys, fabricate(tmp_path / "bitsstr", "cla", bits="fp32"), "--sigma", "1", "--no-theorem1")
    # a good checkpoint before a bad one: still nothing written
    run_error(capsys, good, bad, "--sigma", "1", "--no-theorem1", "--out", str(out))
    # Theorem 1 needs weights: a checkpoint without them is corrupt
    run_error(capsys, good, "--sigma", "1", "--out", str(out))
    assert not out.exists()


def test_every_setting_is_a_flag_and_a_config_file_is_the_same_flags(tmp_path):
    from bounds.__main__ import BoundsConfig, parse, parser
    check_flags_are_the_fields(parser(), BoundsConfig)
    assert parse(["c1", "c2"]) == (BoundsConfig(), ["c1", "c2"])
    flags = ["c1", "--loss-clip", "3", "--n-examples", "50", "--bits", "16", "--lipschitz", "1.5", "--input-bound", "2",
             "--convention", "literal", "--no-theorem1", "--no-progress", "--n-test", "8", "--device", "cpu",
             "--out", "o", "--formats", "md"]
    config = tmp_path / "bounds.yaml"
    config.write_text("loss-clip: 3\nn_examples: 50\nbits: 16\nlipschitz: 1.5\ninput_bound: 2\nconvention: literal\n"
                      "no-theorem1: true\nprogress: false\nn-test: 8\ndevice: cpu\nout: o\nformats: md\n")
    want = BoundsConfig(loss_clip=3.0, n_examples=50, bits=16.0, lipschitz=1.5, input_bound=2.0,
                        convention="literal", theorem1=False, progress=False, n_test=8, device="cpu", out="o",
                        formats=("md",))
    assert parse(flags) == parse(["c1", "--config", str(config)]) == (want, ["c1"])
    # σ from one place, in a file as on the command line
    config.write_text("sigma: 1\nsigma-from: max-loss\n")
    with pytest.raises(AdapterError, match="^--sigma and --sigma-from exclude each other"):
        parse(["c1", "--config", str(config)])


@pytest.mark.parametrize("argv, names", [
    (["--norm-device", "cpu"], ["--norm-device is now --device", "use --device"]),
    (["--norm-device=cpu"], ["--norm-device is now --device"]),
    (["--format", "json"], ["--format is gone", "OUT/bounds.json", "--formats", "--out DIR"]),
    (["--format=latex"], ["--format is gone", "OUT/bounds.json", "--formats"]),
    (["--format", "md"], ["--format is gone"]),
])
def test_the_old_flags_are_refused_in_one_line_naming_the_new_ones(tmp_path, capsys, argv, names):
    good = fabricate(tmp_path / "good", "cla")
    err = run_error(capsys, good, "--sigma", "1", "--no-theorem1", "--out", str(tmp_path / "out"), *argv)
    assert all(name in err for name in names), err
    assert not (tmp_path / "out").exists()


def test_out_dir_holds_the_json_and_the_tables_with_the_python_apis_numbers(tmp_path, capsys, tiny_base):
    """bounds.json is what --format json printed: checkpoint_row's rows (strict JSON) with Kendall τ; bounds.md and
    bounds.tex are the tables of those rows; a --formats without a table writes bounds.json alone."""
    from bounds.__main__ import _finite
    from bounds.report import checkpoint_row, compare
    from bounds.tables import to_latex, to_markdown
    ckpts = []
    for i, method in enumerate(("cla", "lora")):
        ckpts.append(str(tmp_path / method))
        _trained_checkpoint(tiny_base, ckpts[-1], method, seed=i)
    opts = ["--loss-clip", "3", "--lipschitz", "1.3", "--input-bound", "2", "--act-zero-norm", "0.1"]
    out = tmp_path / "out"
    assert main([*ckpts, *opts, "--out", str(out)]) == 0
    t1 = dict(act_lipschitz=1.3, input_bound=2.0, loss_lipschitz=1.0, act_zero_norm=0.1, convention="derived",
              device=None)
    rows = [checkpoint_row(c, loss_clip=3.0, theorem1_options=t1, task_options={}) for c in ckpts]
    comparison = compare(rows)
    md, tex = to_markdown(rows, comparison), to_latex(rows, comparison)
    want = json.loads(json.dumps(_finite([dict(r, kendall_tau=comparison) for r in rows])))
    assert json.loads((out / "bounds.json").read_text()) == want
    assert rows[0]["theorem1"]["layers"] and rows[0]["mi_bound"] > 0 and rows[1]["paper_bound"] is not None
    assert (out / "bounds.md").read_text() == md and (out / "bounds.tex").read_text() == tex
    assert capsys.readouterr().out == md + f"wrote {out}/bounds.json, {out}/bounds.md, {out}/bounds.tex\n"
    assert main([*ckpts, *opts, "--out", str(tmp_path / "j"), "--formats", "png"]) == 0
    assert [p.name for p in (tmp_path / "j").iterdir()] == ["bounds.json"]
    assert json.loads((tmp_path / "j" / "bounds.json").read_text()) == want
    assert capsys.readouterr().out == md + f"wrote {tmp_path}/j/bounds.json\n"


def test_device_is_where_the_norms_and_the_model_run(tmp_path, capsys, monkeypatch):
    """--device reaches both places bounds computes on: Theorem 1's spectral norms of W0 and the model run for
    per-example losses (default None: each its own default, cpu for the norms, cuda if available for the model)."""
    from bounds import report
    ckpt = fabricate(tmp_path / "c", "cla")
    seen = []

    def losses(path, *, progress=False, device=None, **task_options):
        seen.append(("model", device))
        return {"train": ([0.1, 0.2], [1, 1]), "test": ([0.3, 0.5], [1, 1])}, "made up"

    monkeypatch.setattr(report, "example_losses", losses)
    monkeypatch.setattr(report, "layer_norms", lambda path, device=None: seen.append(("norms", device))
                        or [("l1", 1.0, 0.5)])
    for argv, device in (([], None), (["--device", "cpu"], "cpu")):
        seen.clear()
        assert main([ckpt, "--task", "tweets", "--loss-clip", "0.25", "--out", str(tmp_path / "o"), *argv]) == 0
        assert sorted(seen) == [("model", device), ("norms", device)]
    assert "--device no-such-device" in run_error(capsys, ckpt, "--device", "no-such-device", "--out",
                                                  str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_module_entry_point(tmp_path):
    good = fabricate(tmp_path / "good", "cla")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "out"
    ok = subprocess.run([sys.executable, "-m", "bounds", good, "--sigma", "1", "--no-theorem1", "--out", str(out)],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and json.loads((out / "bounds.json").read_text())[0]["method"] == "cla"
    assert ok.stdout.startswith("| method") and ok.stdout.splitlines()[-1].startswith("wrote ")
    bad = subprocess.run([sys.executable, "-m", "bounds", good, "--sigma", "0"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and bad.stdout == ""


# -- real checkpoints (adapters.apply + adapters.save on a tiny BERT) --------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from adapters import models
    return models.tiny_model_dir(tmp_path_factory.mktemp("base") / "tiny-bert")


def _trained_checkpoint(base, directory, method, chain_length=1, seed=0):
    """A tiny BERT adapted with `method`, every trained scalar moved by noise (and chained links folded)."""
    import adapters
    from adapters import models
    model = models.load_model(base, 2, seed=0)
    base_model = copy.deepcopy(model)
    h = models.weights_hash(model, exclude=models.head_names(model))
    adapters.apply(model, method, rank=4, alpha=8, chain_length=chain_length)
    g = torch.Generator().manual_seed(seed)
    for link in range(chain_length):
        if link:
            adapters.next_link(model)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    adapters.save(model, directory, base_model=base, base_model_hash=h)
    stats = dict(n_train=200, n_test=100, train_loss=0.2, test_loss=0.2 + 0.01 * seed,
                 train_loss_max=2.0, test_loss_max=2.5)
    (Path(directory) / "training_stats.json").write_text(json.dumps(stats))
    return model, base_model


def _linear_weights(model, skip="classifier"):
    return {n: m.weight.detach().double() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.startswith(skip)}


@pytest.mark.parametrize("method,k", [("lora", 1), ("lora_plus", 1), ("asym", 1), ("cla", 1), ("rcla", 1),
                                      ("paca", 1), ("dpaca", 1), ("cola", 2), ("rac", 3), ("c3la", 2),
                                      ("rc3la", 3), ("fft", 1), ("head", 1)])
def test_real_checkpoint_end_to_end(tmp_path, capsys, tiny_base, method, k):
    import adapters
    ckpt = str(tmp_path / method)
    model, base_model = _trained_checkpoint(tiny_base, ckpt, method, chain_length=k)
    opts = ["--sigma", "1", "--lipschitz", "1.3", "--input-bound", "2", "--loss-lipschitz", "1.5"]
    [row] = run_json(capsys, ckpt, *opts)
    # P from an independent count: the model's requires_grad tensors (one link) times k for the adapter.
    head = sum(p.numel() for p in model.classifier.parameters())
    layer_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad
                       and not n.startswith("classifier"))
    assert row["trained_parameters"] == k * layer_params + head
    assert row["mi_bound"] == pytest.approx(math.sqrt(2 * 32 * LN2 * row["trained_parameters"] / 200), rel=1e-14)
    if method not in ("fft", "head"):
        shapes = [(d.shape[1], d.shape[0]) for d in adapters.delta_weights(model).values()]
        assert row["adapter_parameters"] == bounds.formula_parameters(method, 4, k, shapes) \
            and row["formula_match"] is True
    # Theorem 1 from dense norms computed here, independently of the r×r trick and adapters.matrices.
    if method in ("fft", "head"):
        w0, w1 = _linear_weights(base_model), _linear_weights(model)
        dense = {n: (w0[n], w1[n] - w0[n]) for n in w0}
    else:
        base_w, delta = adapters.base_weights(model), adapters.delta_weights(model)
        dense = {n: (base_w[n].double(), delta[n].double()) for n in delta}
    t = row["theorem1"]
    names = [x["name"] for x in t["norms"]]
    assert sorted(names) == sorted(dense) and t["layers"] == len(dense)
    a = [torch.linalg.matrix_norm(dense[n][0], ord=2).item() for n in names]
    b = [torch.linalg.matrix_norm(dense[n][1], ord=2).item() for n in names]
    assert [x["base"] for x in t["norms"]] == pytest.approx(a, rel=1e-6)
    assert [x["delta"] for x in t["norms"]] == pytest.approx(b, rel=1e-5, abs=1e-7)
    ref = bounds.theorem1(a, b, 1.3, 0.0, 2.0, 1.5)
    if method == "head":
        assert t["log10_phi_delta"] == -math.inf or t["phi_delta"] == 0  # ΔW = 0 everywhere
    else:
        assert t["log10_phi_delta"] == pytest.approx(ref["log10_phi_delta"], rel=1e-5)
    assert t["log10_phi_base"] == pytest.approx(ref["log10_phi_base"], rel=1e-5)
    assert row["log10_paper_bound"] == pytest.approx(math.log10(ref["phi_base"] + row["mi_bound"]), rel=1e-5)
    assert "abstraction" in t["note"]


def test_theorem1_options_reach_the_bound(tmp_path, capsys, tiny_base):
    ckpt = str(tmp_path / "cla")
    _trained_checkpoint(tiny_base, ckpt, "cla")
    opts = ["--sigma", "1", "--act-zero-norm", "0.5", "--lipschitz", "0.25", "--input-bound", "3"]
    [derived] = run_json(capsys, ckpt, *opts)
    [literal] = run_json(capsys, ckpt, *opts, "--convention", "literal")
    a = [x["base"] for x in derived["theorem1"]["norms"]]
    b = [x["delta"] for x in derived["theorem1"]["norms"]]
    for row, convention in ((derived, "derived"), (literal, "literal")):
        ref = bounds.theorem1(a, b, 0.25, 0.5, 3.0, 1.0, convention)
        assert row["theorem1"]["convention"] == convention
        assert row["theorem1"]["log10_phi_delta"] == pytest.approx(ref["log10_phi_delta"], rel=1e-12)
        assert row["theorem1"]["log10_phi_base"] == pytest.approx(ref["log10_phi_base"], rel=1e-12)
    assert derived["theorem1"]["phi_delta"] != literal["theorem1"]["phi_delta"]


def _peft_dir(base, out, task_type):
    import peft
    from adapters import models
    model = models.load_model(base, 2, seed=0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                          task_type=task_type)
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    model.save_pretrained(str(out))
    assert not (out / "adapters_meta.json").exists()
    return model


def _check_peft_counts(row):
    # 2 layers × {query, value}, 32 → 32: r(m+n) each, plus the saved classifier (32·2 + 2).
    assert row["method"] == "lora" and row["adapter_parameters"] == 4 * 4 * (32 + 32)
    assert row["trained_parameters"] == 4 * 4 * (32 + 32) + 66 and row["formula_match"] is True
    assert row["n_train"] == 50 and row["bits"] == 32


def test_plain_peft_lora_directory_mi(tmp_path, capsys, tiny_base):
    """A stock PEFT SEQ_CLS adapter: counts come from its tensors; no model load needed."""
    out = tmp_path / "peft"
    _peft_dir(tiny_base, out, "SEQ_CLS")
    assert "--n-examples" in run_error(capsys, str(out), "--sigma", "1", "--no-theorem1")
    [row] = run_json(capsys, str(out), "--sigma", "1", "--n-examples", "50", "--no-theorem1")
    _check_peft_counts(row)


def test_plain_peft_lora_directory_theorem1(tmp_path, capsys, tiny_base):
    # No task_type: PEFT's SEQ_CLS adds "score" to modules_to_save, which adapters.load cannot map
    # onto a BERT classifier (an adapters limitation, reported); the MI part above does not need it.
    out = tmp_path / "peft"
    model = _peft_dir(tiny_base, out, None)
    [row] = run_json(capsys, str(out), "--sigma", "1", "--n-examples", "50")
    _check_peft_counts(row)
    # Theorem 1: ΔW = (α/r) B A from PEFT's own modules, dense.
    dense = []
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            dW = mod.scaling["default"] * mod.lora_B["default"].weight @ mod.lora_A["default"].weight
            dense.append(torch.linalg.matrix_norm(dW.double(), ord=2).item())
    got = sorted(x["delta"] for x in row["theorem1"]["norms"])
    assert len(got) == 4 and got == pytest.approx(sorted(dense), rel=1e-5)


# -- what the bounds are: vacuous or not, and the gap of the loss they hold for -----------------------

def test_vacuous_bounds_are_marked(tmp_path, capsys):
    ckpt = fabricate(tmp_path / "lora", "lora")  # P = 314 trained scalars, |N| = 1000
    [row] = run_json(capsys, ckpt, "--loss-clip", "4", "--no-theorem1")
    assert row["mi_bound"] == pytest.approx(math.sqrt(2 * 32 * 2.0 ** 2 * LN2 * 314 / 1000))  # 7.5 ≥ b = 4
    assert row["vacuous"] is True and row["loss_range"] == [0.0, 4.0]
    [row] = run_json(capsys, ckpt, "--loss-clip", "4", "--no-theorem1", "--n-examples", "10000000")
    assert row["mi_bound"] < 4 and row["vacuous"] is False
    [row] = run_json(capsys, ckpt, "--sigma", "2", "--no-theorem1")
    assert row["vacuous"] is None  # a user-given σ comes with no range: vacuity is unknown, not false
    assert main([ckpt, "--loss-clip", "4", "--no-theorem1", "--out", str(tmp_path / "b")]) == 0
    md = capsys.readouterr().out
    assert "‡" in md.splitlines()[2] and "‡ vacuous" in md
    assert r"$^\ddagger$" in (tmp_path / "b" / "bounds.tex").read_text()
    assert bounds.is_vacuous(4.0, 4.0) and not bounds.is_vacuous(3.99, 4.0) and bounds.is_vacuous(1, None) is None


def test_clipped_gap_beside_the_unclipped_one(tmp_path, capsys):
    from adapters.evaluate import checkpoint_batches, evaluate
    from tests.test_landscape import train_tiny
    import adapters
    ckpt = fabricate(tmp_path / "f", "cla")  # train_loss_max 3.0, test_loss_max 5.0, Ĝ = 0.15
    [row] = run_json(capsys, ckpt, "--loss-clip", "6", "--no-theorem1")
    assert row["clipped_gap"] == 0.15 and "no per-example loss exceeds" in row["clipped_gap_source"]
    [row] = run_json(capsys, ckpt, "--loss-clip", "4", "--no-theorem1")  # clipping bites, and no weights here
    assert row["clipped_gap"] is None and "not computed" in row["clipped_gap_source"]
    real = train_tiny(tmp_path / "real", snapshots=0)
    stats = adapters.read_stats(real)
    losses = {s: np.asarray(evaluate(adapters.load(real), checkpoint_batches(real, s))["losses"])
              for s in ("train", "test")}
    b = float(np.median(losses["test"]))  # clips about half the test examples
    [row] = run_json(capsys, str(real), "--loss-clip", str(b), "--no-theorem1")
    want = np.minimum(losses["test"], b).mean() - np.minimum(losses["train"], b).mean()
    # Clipping at the median changes this run's gap by more than the tolerance below (by how much depends on the
    # run: 4e-4 relative on one machine), so an unclipped gap fails the comparison with `want`.
    assert want != pytest.approx(losses["test"].mean() - losses["train"].mean(), rel=1e-5)
    assert row["clipped_gap"] == pytest.approx(want, rel=1e-6) and abs(row["clipped_gap"]) <= b
    assert row["clipped_gap"] != pytest.approx(row["empirical_gap"], rel=1e-5)
    assert row["empirical_gap"] == stats["generalization_gap"]
    assert main([str(real), "--loss-clip", str(b), "--no-theorem1", "--out", str(tmp_path / "b")]) == 0
    assert "Ĝ clipped at b" in capsys.readouterr().out


def test_ties_of_the_mi_bound_are_said_where_tau_is_shown(tmp_path, capsys):
    # cla, rcla and asym train the same P: the MI bound ties them whatever their gaps.
    ckpts = [fabricate(tmp_path / f"{m}", m, stats=dict(n_train=100, generalization_gap=g, train_loss_max=2.0))
             for m, g in zip(["cla", "rcla", "asym", "lora"], [0.1, 0.3, 0.2, 0.4])]
    rows = run_json(capsys, *ckpts, "--no-theorem1")
    assert rows[0]["kendall_tau"]["mi_bound"]["distinct"] == 2
    assert main([*ckpts, "--no-theorem1", "--out", str(tmp_path / "b")]) == 0
    assert "MI bound takes 2 distinct values over 4 (it depends on the trained-scalar count P alone)" \
        in capsys.readouterr().out
    assert "2 distinct values over 4" in (tmp_path / "b" / "bounds.tex").read_text()
