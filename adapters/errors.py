"""One error type for bad input, and the CLI wrapper that turns it into one line + exit 2."""
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
    """Wrap a CLI `main(argv=None)`: AdapterError -> `error: ...` on stderr, exit status 2."""
    @wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except AdapterError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is an AdapterError: one `error: ...` line and exit 2 under `cli`."""

    def error(self, message):
        raise AdapterError(message)
