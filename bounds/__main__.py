"""python -m bounds CKPT [CKPT ...]: generalization bounds per checkpoint, and their agreement with Ĝ.

When it runs the model: for per-example losses, which Ĝ clipped at b needs when a loss exceeds b (with the
default σ, b is the largest training loss, so a larger test loss does) and from which --task / --data measure
every statistic. Training's record of them (CKPT/example_losses.safetensors) is read instead when it is of the same
weights and split; otherwise both splits are evaluated, a progress bar each, on the GPU when there is one.
Theorem 1 reads the weights but runs no forward pass (--no-theorem1 skips it).

Bad input (σ ≤ 0, bits ≤ 0, missing statistics without --n-examples, a corrupt checkpoint) gives
one line `error: ...` on stderr and exit status 2; nothing is written then.
"""
import argparse
import json
import math
import sys

from tqdm import tqdm

from adapters.errors import AdapterError, ArgumentParser, cli
from adapters.taskspec import add_task_arguments, task_options
from adapters.io import write_text
from bounds.report import checkpoint_row, compare
from bounds.tables import to_latex, to_markdown


def parse_args(argv):
    p = ArgumentParser(prog="python -m bounds", description="\n\n".join(__doc__.split("\n\n")[:2]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint directories (ours or plain PEFT LoRA)")
    p.add_argument("--format", choices=("md", "latex", "json"), default="md")
    p.add_argument("--out", help="write here (atomically) instead of stdout")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sigma", type=float, help="sub-Gaussian constant σ of the loss (user-given)")
    g.add_argument("--loss-clip", type=float, metavar="B",
                   help="clip the loss at B: the bound then holds for min(ℓ, B), σ = B/2")
    g.add_argument("--sigma-from", choices=("max-train-loss", "max-loss"),
                   help="σ = B/2 with B the largest per-example loss: of the training split (max-train-loss, the "
                        "default; a heuristic) or of both splits (max-loss: σ then depends on the test data)")
    p.add_argument("--n-examples", type=int,
                   help="|N| (overrides n_train; required when training_stats.json is absent, unless --task / --data)")
    p.add_argument("--bits", type=float, help="bits q per trained scalar (default: from the checkpoint)")
    t = p.add_argument_group("Theorem 1 (an abstraction for transformers)")
    t.add_argument("--lipschitz", type=float, default=1.0,
                   help="Lipschitz constant λ of the maps between adapted layers (default 1)")
    t.add_argument("--input-bound", type=float, default=1.0, help="C with ‖x‖ ≤ C at the first adapted layer")
    t.add_argument("--loss-lipschitz", type=float, default=1.0, help="Lipschitz constant L_ℓ of the loss")
    t.add_argument("--act-zero-norm", type=float, default=0.0,
                   help="‖σ_l(0)‖ (0 for ReLU/GELU/tanh; only sigmoid-like maps add offset terms)")
    t.add_argument("--convention", choices=("derived", "literal"), default="derived",
                   help="offset rule: derived (valid) or the paper's literal printed rule (not a valid bound)")
    t.add_argument("--no-theorem1", action="store_true", help="skip Theorem 1 (needs no model weights then)")
    t.add_argument("--norm-device", default=None, metavar="DEVICE",
                   help="where the spectral norms of W0 run, e.g. cuda (default: cpu)")
    add_task_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (while the model runs)")
    args = p.parse_args(argv)
    for name in ("sigma", "loss_clip", "bits"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise AdapterError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
    if args.n_examples is not None and args.n_examples <= 0:
        raise AdapterError(f"--n-examples must be > 0, got {args.n_examples}")
    for name in ("lipschitz", "input_bound", "loss_lipschitz", "act_zero_norm"):
        v = getattr(args, name)
        if not (v >= 0 and math.isfinite(v)):
            raise AdapterError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got {v}")
    return args


def _finite(x):
    """Strict JSON: an overflowed Φ (inf) becomes null; its log10_* value beside it is kept."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


@cli
def main(argv=None):
    args = parse_args(argv)
    t1 = None if args.no_theorem1 else dict(
        act_lipschitz=args.lipschitz, input_bound=args.input_bound, loss_lipschitz=args.loss_lipschitz,
        act_zero_norm=args.act_zero_norm, convention=args.convention, device=args.norm_device)
    rows = [checkpoint_row(path, sigma=args.sigma, loss_clip=args.loss_clip, sigma_from=args.sigma_from,
                           n_examples=args.n_examples, bits=args.bits, theorem1_options=t1,
                           task_options=task_options(args), progress=not args.no_progress)
            for path in tqdm(args.checkpoints, desc="checkpoints", disable=True if args.no_progress else None)]
    comparison = compare(rows)
    if args.format == "json":
        if comparison:
            for r in rows:
                r["kendall_tau"] = comparison
        text = json.dumps(_finite(rows), indent=2, allow_nan=False) + "\n"
    else:
        text = (to_markdown if args.format == "md" else to_latex)(rows, comparison)
    if args.out:
        write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
