"""python -m bounds CKPT [CKPT ...]: generalization bounds per checkpoint, and their agreement with Ĝ.

When it runs the model: for per-example losses, which Ĝ clipped at b needs when a loss exceeds b (with the
default σ, b is the largest training loss, so a larger test loss does) and from which --task / --data measure
every statistic. Training's record of them (CKPT/example_losses.safetensors) is read instead when it is of the same
weights and split; otherwise both splits are evaluated, a progress bar each, on --device (default: the GPU when
there is one). Theorem 1 reads the weights but runs no forward pass (--no-theorem1 skips it); its spectral norms of
W0 run on --device too (default: the CPU).

It writes OUT/bounds.json (a row per checkpoint, with Kendall τ for several) and the tables OUT/bounds.md and
OUT/bounds.tex (--formats md,tex), prints the markdown table and then one line naming what it wrote. Bad input
(σ ≤ 0, bits ≤ 0, missing statistics without --n-examples, a corrupt checkpoint) gives one line `error: ...` on
stderr and exit status 2; nothing is written then.
"""
import json
import math
import sys
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from adapters import command
from adapters.errors import AdapterError, cli
from adapters.io import write_text
from adapters.settings import AT_LEAST_1, Check, fields, option, setting
from adapters.taskspec import DataChoice, task_options
from bounds.report import SIGMA_FROM, checkpoint_row, compare
from bounds.spectral_norm import check_device
from bounds.tables import to_latex, to_markdown

POSITIVE_FINITE = Check("a finite number > 0", lambda v: v > 0)  # check() refuses nan and ±inf first
NON_NEGATIVE_FINITE = Check("a finite number ≥ 0", lambda v: v >= 0)
THEOREM1 = "Theorem 1 (an abstraction for transformers)"
SIGMA_OPTIONS = ("sigma", "loss_clip", "sigma_from")  # where σ comes from: one of them at most
# Old flags: one line each, naming what replaced them.
RENAMED = {"--norm-device": "--device",
           "--format": "--format is gone: bounds now writes OUT/bounds.json (what --format json printed) and the "
                       "tables --formats names (md, tex: OUT/bounds.md, OUT/bounds.tex); --out DIR says where"}


@dataclass(frozen=True)
class BoundsConfig(DataChoice):
    """The settings of `python -m bounds` (the data flags, which measure the statistics: taskspec.DataChoice)."""
    sigma: Optional[float] = setting(None, "sub-Gaussian constant σ of the loss (user-given)", check=POSITIVE_FINITE)
    loss_clip: Optional[float] = setting(None, "clip the loss at B: the bound then holds for min(ℓ, B), σ = B/2",
                                         check=POSITIVE_FINITE, metavar="B")
    sigma_from: Optional[str] = setting(None, "σ = B/2 with B the largest per-example loss: of the training split "
                                        "(max-train-loss, the default; a heuristic) or of both splits (max-loss: σ "
                                        "then depends on the test data)", choices=tuple(SIGMA_FROM))
    n_examples: Optional[int] = setting(None, "|N| (overrides n_train; required when training_stats.json is absent, "
                                        "unless --task / --data)", check=AT_LEAST_1)
    bits: Optional[float] = setting(None, "bits q per trained scalar (default: from the checkpoint)",
                                    check=POSITIVE_FINITE)
    lipschitz: float = setting(1.0, "Lipschitz constant λ of the maps between adapted layers",
                               check=NON_NEGATIVE_FINITE, group=THEOREM1)
    input_bound: float = setting(1.0, "C with ‖x‖ ≤ C at the first adapted layer", check=NON_NEGATIVE_FINITE,
                                 group=THEOREM1)
    loss_lipschitz: float = setting(1.0, "Lipschitz constant L_ℓ of the loss", check=NON_NEGATIVE_FINITE,
                                    group=THEOREM1)
    act_zero_norm: float = setting(0.0, "‖σ_l(0)‖ (0 for ReLU/GELU/tanh; only sigmoid-like maps add offset terms)",
                                   check=NON_NEGATIVE_FINITE, group=THEOREM1)
    convention: str = setting("derived", "offset rule: derived (valid) or the paper's literal printed rule (not a "
                              "valid bound)", choices=("derived", "literal"), group=THEOREM1)
    theorem1: bool = setting(True, "skip Theorem 1 (needs no model weights then)", flag="--no-theorem1",
                             group=THEOREM1)
    device: Optional[str] = setting(None, "where the spectral norms of W0 run and, when per-example losses must be "
                                    "computed, the model, e.g. cuda, cuda:1 or cpu (default: the norms on the cpu, "
                                    "the model on cuda if available, else cpu)", results=False)
    progress: bool = setting(True, "no progress bars (while the model runs)", flag="--no-progress", results=False)
    out: str = command.out("bounds-report", "bounds.json, plus bounds.md / bounds.tex per --formats")
    formats: tuple = command.formats(("md", "tex"))


def parser():
    p = command.parser("python -m bounds", __doc__, BoundsConfig,
                       description="\n\n".join(__doc__.split("\n\n")[:3]))
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint directories (ours or plain PEFT LoRA)")
    return p


def check_sigma(config):
    """σ comes from one place: --sigma, --loss-clip and --sigma-from exclude each other."""
    given = [option(f) for f in fields(config) if f.name in SIGMA_OPTIONS and getattr(config, f.name) is not None]
    if len(given) > 1:
        raise AdapterError(f"{' and '.join(given)} exclude each other: σ comes from one of --sigma, --loss-clip, "
                           "--sigma-from")
    return config


def parse(argv=None):
    """(the checked BoundsConfig, the checkpoints) of `argv`; an old flag is refused in one line."""
    config, args = command.parse(parser(), BoundsConfig, argv, renamed=RENAMED)
    check_device(config.device, "--device")
    return check_sigma(config), args["checkpoints"]


def _finite(x):
    """Strict JSON: an overflowed Φ (inf) becomes null; its log10_* value beside it is kept."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def rows_of(config, checkpoints):
    """(a row per checkpoint, their comparison), as bounds.report computes them with `config`'s settings."""
    t1 = None if not config.theorem1 else dict(
        act_lipschitz=config.lipschitz, input_bound=config.input_bound, loss_lipschitz=config.loss_lipschitz,
        act_zero_norm=config.act_zero_norm, convention=config.convention, device=config.device)
    rows = [checkpoint_row(path, sigma=config.sigma, loss_clip=config.loss_clip, sigma_from=config.sigma_from,
                           n_examples=config.n_examples, bits=config.bits, theorem1_options=t1,
                           task_options=task_options(config), progress=config.progress, device=config.device)
            for path in tqdm(checkpoints, desc="checkpoints", disable=True if not config.progress else None)]
    return rows, compare(rows)


@cli
def main(argv=None):
    config, checkpoints = parse(argv)
    out = command.out_dir(config.out, "bounds")
    rows, comparison = rows_of(config, checkpoints)  # every row first: bad input writes nothing
    texts = {"md": to_markdown(rows, comparison), "tex": to_latex(rows, comparison)}
    if comparison:
        for r in rows:
            r["kendall_tau"] = comparison
    written = [out / "bounds.json"]
    write_text(written[0], json.dumps(_finite(rows), indent=2, allow_nan=False) + "\n")
    written += command.write_tables(out, "bounds", config.formats, texts)
    sys.stdout.write(texts["md"])
    print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
