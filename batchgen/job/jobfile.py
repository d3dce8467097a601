"""Job files: `batchgen run --job FILE`, a TOML table of `run`'s options, read and type-checked.

Keys are the long option names with `-` as `_`, plus `input` and `output`. Which keys exist
and what each takes come from the command (the caller); this module only reads the file,
checks TOML types and makes paths relative to the file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Kind = Literal["bool", "int", "float", "str", "strings"]
# Keys holding paths: read relative to the job file, wherever batchgen is started from.
PATH_KEYS = ("input", "output", "metrics", "chat_template")


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
