"""Job files: `batchgen run --job FILE`, a TOML table of `run`'s options, read and type-checked.

Keys are the long option names with `-` as `_`, plus `input` and `output`. Which keys exist
and what each takes come from the Click command's parameters (`settings`); this module reads
the file, checks TOML types, makes paths relative to the file and has Click check the values.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Kind = Literal["bool", "int", "float", "str", "strings"]
# Keys holding paths: read relative to the job file, wherever batchgen is started from.
PATH_KEYS = ("input", "output", "metrics", "errors", "chat_template")
NOT_KEYS = ("job", "dry_run", "help")  # what a run is, not what is run


class JobFileError(ValueError):
    """The job file cannot be used; nothing has run."""


def read(path: Path) -> dict[str, Any]:
    """The file's top-level table; JobFileError if it is unreadable or not flat TOML."""
    try:
        with path.open("rb") as stream:
            table = tomllib.load(stream)
    except OSError as error:
        raise JobFileError(f"cannot read job file {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise JobFileError(f"{path}: not valid TOML: {error}") from None
    for key, value in table.items():
        if isinstance(value, dict):
            raise JobFileError(f"{path}: [{key}] is a table; a job file is flat key = value")
    return table


def check(path: Path, key: str, value: Any, kind: Kind) -> Any:
    """The value if TOML typed it as the option needs; JobFileError naming the key if not."""
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "strings": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        wanted = {
            "bool": "true or false",
            "int": "an integer",
            "float": "a number",
            "str": "a string",
            "strings": "a list of strings",
        }[kind]
        raise JobFileError(f"{path}: key '{key}' must be {wanted}, not {value!r}")
    return value


def relative_to_file(path: Path, key: str, value: Any) -> Any:
    """Paths are relative to the job file; a model is too when that directory exists."""
    if not isinstance(value, str) or value == "-":
        return value
    if key in PATH_KEYS or (key == "model" and (path.parent / value).is_dir()):
        return str(path.parent / value)
    return value


def settings(ctx: click.Context, path: Path) -> dict[str, Any]:
    """The file's values for every parameter of ctx's command not given on its command line."""
    from click import BadParameter
    from click.core import ParameterSource

    by_key = {key_of(p): p for p in ctx.command.params if key_of(p) not in NOT_KEYS}
    values: dict[str, Any] = {}
    for key, value in read(path).items():
        param = by_key.get(key)
        if param is None:
            known = ", ".join(sorted(by_key))
            raise JobFileError(f"{path}: unknown key '{key}' (known: {known})")
        name = param.name or key
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            continue
        value = check(path, key, value, kind_of(param))
        value = relative_to_file(path, key, value)
        try:
            values[name] = param.process_value(ctx, value)
        except BadParameter as error:
            raise JobFileError(f"{path}: key '{key}': {error.message}") from None
    return values


def key_of(param: click.Parameter) -> str:
    """The job-file key of a parameter: its long option name with - as _, or its argument."""
    import click

    if isinstance(param, click.Argument):
        return param.human_readable_name.lower()
    long_names = [o for o in param.opts if o.startswith("--")]
    return long_names[0].removeprefix("--").replace("-", "_")


def kind_of(param: click.Parameter) -> Kind:
    """The TOML type a parameter's value takes."""
    import click

    if isinstance(param, click.Option) and param.is_flag:
        return "bool"
    if param.multiple:
        return "strings"
    if isinstance(param.type, click.types.IntParamType):
        return "int"
    if isinstance(param.type, click.types.FloatParamType):
        return "float"
    return "str"
