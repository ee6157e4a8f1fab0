"""Settings as data: a command's settings are one frozen dataclass, and each field says everything about itself.

    @dataclass(frozen=True)
    class TrainConfig:
        rank: int = setting(16, "rank r of each link", check=AT_LEAST_1)
        out: str = setting("ckpt", "the checkpoint directory", results=False)

    add_arguments(parser, TrainConfig)   # the flags: name, type, default, choices and help come from the fields
    check(config)                        # every range and choice, one line naming the setting and the value
    shaping(config)                      # {name: value} of the settings that change what is computed (config.yaml)

A field's default is the one default: the function, the parser and its --help all read it here, so a new setting
is one field (and the code that uses it). The field's type says the flag's kind: int, float or str take one value,
`list[...]` several, a bool is a switch (default False: `--name`; default True: `--no-name`; default None: "not
given", and `--name` sets True, `--no-name` False); `Optional[...]` (a default of None) means "not given", and its
help says what is done instead.
"""
import dataclasses
import math
import types
import typing

from .errors import AdapterError


class Check(typing.NamedTuple):
    """A range a numeric setting must lie in: `text` says it in the error ("must be >= 1, got 0")."""
    text: str
    ok: typing.Callable


AT_LEAST_1 = Check(">= 1", lambda v: v >= 1)
POSITIVE = Check("> 0", lambda v: v > 0)
NON_NEGATIVE = Check(">= 0", lambda v: v >= 0)
FRACTION = Check("in [0, 1)", lambda v: 0 <= v < 1)


def setting(default, help, *, check=None, choices=None, results=True, flag=None, type=None, metavar=None,
            group=None, nargs=None):
    """One field of a settings dataclass.

    `check`: a Check of the value (numbers); `choices`: the values allowed (each item's, for a list or tuple);
    `results`: whether the value changes what
    the command computes (False for where it writes, whether it resumes, progress bars); `flag`: the option's name
    when it is not --the-field-name (e.g. --data for data_file, --no-group-by-length); `type`: the argparse type when
    the annotation's is not it (e.g. "an int or all"); `group`: the --help section it is listed under;
    `nargs`: "*" for a list that may be given empty (a list's default is "+").
    """
    meta = dict(help=help, check=check, choices=choices, results=results, flag=flag, type=type, metavar=metavar,
                group=group, nargs=nargs)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields(cls):
    """The settings of a dataclass (class or instance), in their order."""
    return dataclasses.fields(cls)


def default(field):
    """The field's default (a fresh list for a list)."""
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _base_type(cls, field):
    """(the value type, several values?) from the field's annotation: Optional[X] is X, list[X] is X several."""
    hint = typing.get_type_hints(cls)[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def option(field):
    """The field's long option: --the-name, or its `flag`."""
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def add_arguments(parser, cls):
    """One flag per field of `cls`, dest = the field's name, default = the field's default."""
    groups = {}
    for f in fields(cls):
        m = f.metadata
        where = parser
        if m["group"]:
            where = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        value_type, several = _base_type(cls, f)
        kwargs = dict(dest=f.name, default=default(f), help=m["help"])
        if value_type is bool and kwargs["default"] is None:  # not given (None), or the switch's value
            kwargs.update(action="store_const", const=not option(f).startswith("--no-"))
        elif value_type is bool:
            kwargs["action"] = "store_false" if kwargs["default"] else "store_true"
        else:
            kwargs["type"] = m["type"] or (None if value_type is str else value_type)
            if several:
                kwargs["nargs"] = m["nargs"] or "+"
            if m["choices"] is not None and m["type"] is None:  # a type of its own checks the values it parses
                kwargs["choices"] = m["choices"]
            if m["metavar"]:
                kwargs["metavar"] = m["metavar"]
        where.add_argument(option(f), **kwargs)
    return parser


def check(config):
    """Refuse a value out of its field's range or choices: AdapterError("name must be ..., got ...")."""
    for f in fields(config):
        value, m = getattr(config, f.name), f.metadata
        if value is None:
            continue
        if m["check"] is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                           and math.isfinite(value) and m["check"].ok(value)):
            raise AdapterError(f"{f.name} must be {m['check'].text}, got {value!r}")
        if m["choices"] is not None:
            items = value if isinstance(value, (list, tuple)) else [value]
            bad = [v for v in items if v not in m["choices"]]
            if bad:
                raise AdapterError(f"{f.name} must be one of {', '.join(map(str, m['choices']))}, got {bad[0]!r}")
    return config


def shaping(config):
    """{name: value} of the settings that change what is computed, in field order: what a run records as its
    config.yaml and what a resumed run must share with the state it resumes."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.metadata["results"]}


def make(cls, config=None, **settings):
    """`config` (or the defaults) with `settings` replacing fields; an unknown name is one AdapterError line."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise AdapterError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}")
    return dataclasses.replace(config or cls(), **settings)


def as_dict(config):
    return {f.name: getattr(config, f.name) for f in fields(config)}

