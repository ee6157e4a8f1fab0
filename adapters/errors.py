"""One error type for bad input, the CLI wrapper that turns it into one line + exit 2, and the CLIs' parser."""
import argparse
import sys
from functools import wraps


class AdapterError(ValueError):
    """Bad input to any part of the toolkit (unknown method, missing file, corrupt checkpoint...).

    The message is shown to the user as one line, so it must name the problem and the value.
    """


class CheckpointError(AdapterError):
    """A checkpoint directory that cannot be read (missing, corrupt, mismatched base)."""


def cli(main):
    """Wrap a CLI `main(argv=None)`, which returns its exit code: AdapterError -> `error: ...` on stderr, 2."""
    @wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except AdapterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is an AdapterError: one `error: ...` line and exit 2 under `cli`."""

    def error(self, message):
        raise AdapterError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default, read off the parser (whose defaults are the function's own); a flag
    without one (None) says in its help what the code does instead."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:
            return text  # a flag (store_true/false), or a default that is computed: its help says which
        if isinstance(action.default, (tuple, list)):  # as it is typed: --formats md,png, --seeds 1 2 3
            sep = "," if action.nargs is None else " "
            return f"{text} (default: {sep.join(map(str, action.default))})"
        return f"{text} (default: %(default)s)"
