"""`--config FILE.yaml` for any argparse CLI of the toolkit: the file's keys are flags, the command line wins.

    args = parse_args_with_config(parser, argv)   # {dest: value}, resolved; write it as the run's config.yaml
"""
import argparse
from pathlib import Path

import yaml

from .errors import AdapterError


def parse_args_with_config(parser, argv=None):
    """Parse `argv` with `parser`, plus `--config FILE.yaml`: every key of the file is a flag's dest or long
    option (dashes or underscores), its value the flag's; flags on the command line override the file.

    Values go through the flag's own type and choices; an unknown key or a wrong type is an AdapterError naming
    the key. Returns the resolved {dest: value} (without config), to write into the run's output.
    """
    if not any("--config" in a.option_strings for a in parser._actions):
        parser.add_argument("--config", metavar="FILE.yaml", help="a YAML file of flag values (the command line wins)")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config
    values = _read_config(parser, config) if config else {}
    # The file's values become the parser's defaults, so an explicit flag overrides them exactly as it overrides
    # a default; a required flag or positional the file gives is no longer required. Restored afterwards.
    saved = [(a, a.default, a.required, a.nargs) for a in parser._actions]
    try:
        for action in parser._actions:
            if action.dest in values:
                action.default, action.required = values[action.dest], False
                if not action.option_strings:  # a positional: may now be absent from the command line
                    action.nargs = {None: "?", "+": "*"}.get(action.nargs, action.nargs)
        resolved = vars(parser.parse_args(argv))
    finally:
        for action, default, required, nargs in saved:
            action.default, action.required, action.nargs = default, required, nargs
    resolved.pop("config", None)
    return resolved


def _read_config(parser, path):
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise AdapterError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AdapterError(f"cannot read config file {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AdapterError(f"config file {path}: expected a mapping of flag: value, got {type(data).__name__}")
    return config_values(parser, data, f"config file {path}")


def config_values(parser, data, where):
    """{dest: value} of a mapping of flag: value (a config file's, a suite file's study), each key a flag's dest or
    long option (dashes or underscores) and each value through the flag's type and choices; an unknown key or a
    wrong value is an AdapterError that starts with `where` and names the key."""
    actions = [a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help", "config")]
    by_dest = {a.dest: a for a in actions}
    by_option = {o[2:].replace("-", "_"): a for a in actions for o in a.option_strings if o.startswith("--")}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        action = by_dest.get(name) or by_option.get(name)
        if action is None:
            raise AdapterError(f"{where}: unknown key {key!r} (not a flag of {parser.prog})")
        if action.dest in values:
            raise AdapterError(f"{where}: key {key!r} sets {action.dest} a second time")
        values[action.dest] = _config_value(action, key, value, as_flag=name not in by_dest, where=where)
    return values


def _config_value(action, key, value, *, as_flag, where):
    def bad(why):
        return AdapterError(f"{where}: key {key!r}: {why}")

    if value is None:
        if action.default is None:
            return None
        raise bad("null is not a value of this flag")
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {value!r}")
        if as_flag:  # `no-group-by-length: true` means the flag is given
            return action.const if value else action.default
        if not isinstance(action.const, bool):
            raise bad("give this flag by its option name (true: the flag is given)")
        return value

    def one(item):
        if isinstance(item, (dict, list, tuple)):
            raise bad(f"expected a single value, got {item!r}")
        if isinstance(item, bool):  # YAML reads yes/no/on/off as booleans: never a number or a string here
            raise bad(f"expected {getattr(action.type, '__name__', 'a string')}, got {item!r} (quote it for a string)")
        try:
            converted = action.type(str(item)) if action.type is not None else str(item)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise bad(f"expected {getattr(action.type, '__name__', 'a string')}, got {item!r} ({e})") from None
        if action.choices is not None and converted not in action.choices:
            raise bad(f"{converted!r} is not one of {', '.join(map(str, action.choices))}")
        return converted

    if action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if (action.nargs == "+" and not items) or (isinstance(action.nargs, int) and len(items) != action.nargs):
            raise bad(f"expected {action.nargs} value(s), got {len(items)}")
        return [one(item) for item in items]
    return one(value)
