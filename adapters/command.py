"""The one shape of every command of the toolkit (adapters.train, adapters.evaluate, bounds, analysis.*).

    def parser():                                   # the flags, from the command's settings dataclass
        p = command.parser("python -m analysis.spectral", __doc__, SpectralConfig)
        p.add_argument("checkpoints", nargs="+", metavar="CKPT")
        return p

    @cli
    def main(argv=None):                           # returns the exit code: 0, or 2 for bad input (one line)
        config, args = command.parse(parser(), SpectralConfig, argv)
        ...
        print(summary line)

Every command takes `--config FILE.yaml` (its keys are the flags; the command line wins), `--out DIR` (where it
writes `<command>.json` beside its tables and figures) and, where it has them, `--device` and `--formats`. A flag
that was renamed is refused with one line naming the new one.
"""
import argparse
import sys
from pathlib import Path

from .config import parse_args_with_config
from .errors import AdapterError, ArgumentParser, HelpFormatter
from .io import write_text
from .settings import add_arguments, check, fields, setting

TABLE_FORMATS = ("md", "tex")
FIGURE_FORMATS = ("png", "pdf", "svg")


def check_formats(formats):
    """The formats (a tuple), or an AdapterError naming the first unknown one."""
    formats = tuple(formats)
    bad = [f for f in formats if f not in TABLE_FORMATS + FIGURE_FORMATS]
    if bad:
        raise AdapterError(f"unknown format {bad[0]!r} (choose from {', '.join(TABLE_FORMATS + FIGURE_FORMATS)})")
    return formats


def formats_arg(text):
    """--formats: comma-separated file formats of the tables and figures (md, tex, png, pdf, svg)."""
    try:
        return check_formats(f.strip() for f in str(text).split(",") if f.strip())
    except AdapterError as e:  # argparse (and a --config file) put the message after the flag's name
        raise argparse.ArgumentTypeError(str(e)) from None


def figure_formats(formats):
    """The figure formats of a --formats value (a command draws its figures in these)."""
    return tuple(f for f in formats if f in FIGURE_FORMATS)


def table_formats(formats):
    """The table formats of a --formats value (a command writes its tables in these)."""
    return tuple(f for f in formats if f in TABLE_FORMATS)


def table_paths(out, name, formats):
    """OUT/<name>.<f> for each table format f of `formats`: where a command's tables go."""
    return [Path(out) / f"{name}.{f}" for f in table_formats(formats)]


def write_tables(out, name, formats, texts):
    """Write the command's tables, texts[f] to OUT/<name>.<f>, for each table format f of `formats` it has (the
    keys of `texts`); returns the paths written."""
    paths = [p for p in table_paths(out, name, formats) if p.suffix[1:] in texts]
    for path in paths:
        write_text(path, texts[path.suffix[1:]])
    return paths


# The common settings, one definition each; a command's dataclass takes those it has.
def out(default, where):
    return setting(default, f"the output directory: {where}", results=False, metavar="DIR")


def device(what="it runs"):
    return setting(None, f"where {what}, e.g. cuda, cuda:1 or cpu (default: cuda if available, else cpu)",
                   results=False)


def formats(default=("md", "tex", "png", "pdf")):
    return setting(tuple(default), "file formats of the tables (md, tex) and figures (png, pdf, svg), "
                   "comma-separated", results=False, type=formats_arg, choices=TABLE_FORMATS + FIGURE_FORMATS)


def out_dir(out, command_name):
    """--out as a directory: refused in one line when it is an existing file (--out used to name a file)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"--out {out} is a file: --out is the directory {command_name} writes "
                           f"{command_name}.json (and its tables) into")
    return out


def parser(prog, doc, settings=None, *, epilog=None, description=None):
    """The command's ArgumentParser: its description (the docstring's first paragraph unless given), each
    setting's flag (adapters.settings) and --config."""
    # allow_abbrev=False: a prefix is not a flag (an old --format must not be read as --formats)
    p = ArgumentParser(prog=prog, description=description or doc.split("\n\n")[0], formatter_class=HelpFormatter,
                       epilog=epilog, allow_abbrev=False)
    if settings is not None:
        add_arguments(p, settings)
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML file of flag values (the command line wins)")
    return p


def parse(p, settings, argv=None, renamed=None):
    """(the settings dataclass, checked; the other arguments, e.g. positionals, as a dict) of `argv`.

    `renamed`: {old flag: new flag, or what to do instead}; an old flag is refused in one line that says it.
    """
    given = sys.argv[1:] if argv is None else argv
    for old, new in (renamed or {}).items():
        if any(a == old or a.startswith(old + "=") for a in given):
            raise AdapterError(f"{old} is now {new} (same meaning): use {new}" if new.startswith("--") else new)
    values = parse_args_with_config(p, argv)
    names = {f.name for f in fields(settings)}
    config = check(settings(**{k: v for k, v in values.items() if k in names}))
    return config, {k: v for k, v in values.items() if k not in names}
