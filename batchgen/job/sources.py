"""Where requests come from: INPUT in each format it comes in (JSONL, plain text, a JSON array,
Parquet) as numbered JSON lines, and rows of any shape read as native lines.

Imports nothing heavy: the run's checks use it before the model loads.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import orjson

InputFormat = Literal["jsonl", "text", "json", "parquet"]
INPUT_FORMATS: tuple[InputFormat, ...] = ("jsonl", "text", "json", "parquet")
# How `auto` reads a file by its name; anything else (and stdin) is JSONL.
_SUFFIX_FORMATS: dict[str, InputFormat] = {".txt": "text", ".json": "json", ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 1024  # rows read at a time: a Parquet file is streamed, never loaded whole
_BOM = b"\xef\xbb\xbf"


class FieldError(ValueError):
    """A line's field is missing, wrongly typed or out of range."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}' {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class RowShape:
    """Rows that are data, not requests: the prompt is one field, or a format over the fields
    (`"{instruction}\\n{input}"`); the row's `id` stays its id, its other fields its metadata."""

    prompt_field: str | None = None
    prompt_template: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt_field is None) == (self.prompt_template is None):
            raise ValueError("give one of --prompt-field and --prompt-template")
        if self.prompt_template is None:
            return
        try:
            named = template_fields(self.prompt_template)
        except ValueError as error:  # an unmatched brace, say
            raise ValueError(f"--prompt-template {self.prompt_template!r}: {error}") from None
        if not named:
            raise ValueError(
                f"--prompt-template {self.prompt_template!r} names no field: write the "
                "fields as {name}, e.g. '{instruction}'"
            )
        for _, name, _, conversion in string.Formatter().parse(self.prompt_template):
            if name is not None and (name == "" or name.isdigit()):
                raise ValueError(
                    f"--prompt-template {self.prompt_template!r}: fields are named, not "
                    "positional ({} or {0})"
                )
            if conversion not in (None, "s", "r", "a"):
                raise ValueError(f"--prompt-template {self.prompt_template!r}: !{conversion}?")

    def line(self, row: dict[str, Any]) -> dict[str, Any]:
        """The native line a row stands for; FieldError naming a field the row lacks."""
        if self.prompt_field is not None:
            if self.prompt_field not in row:
                raise FieldError(self.prompt_field, "is missing (--prompt-field names it)")
            prompt = row[self.prompt_field]
            rest = {k: v for k, v in row.items() if k not in ("id", self.prompt_field)}
        else:
            assert self.prompt_template is not None
            for name in template_fields(self.prompt_template):
                if row.get(name) is None:
                    raise FieldError(name, "is missing (--prompt-template names it)")
            try:
                prompt = self.prompt_template.format_map(row)
            except (LookupError, AttributeError, ValueError, TypeError) as error:
                message = f"cannot be made by --prompt-template from this row: {error!r}"
                raise FieldError("prompt", message) from None
            rest = {k: v for k, v in row.items() if k != "id"}
        line = {"prompt": prompt, "metadata": rest or None}
        return {"id": row["id"], **line} if "id" in row else line


def template_fields(template: str) -> list[str]:
    """The row fields a prompt template names (`{a}`, `{a[0]}` and `{a.b}` name `a`)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name:
            names.append(name.split(".", 1)[0].split("[", 1)[0])
    return names


def read_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, bytes) for every non-blank line, reading lazily.

    A UTF-8 byte-order mark at the start of the file is skipped; CRLF line ends are fine.
    """
    for number, raw in enumerate(stream, start=1):
        if number == 1:
            raw = raw.removeprefix(_BOM)
        if raw.strip():
            yield number, raw


def input_format(path: Path | None, given: str = "auto") -> InputFormat:
    """The format INPUT is read in: as given, or by its name's suffix (JSONL otherwise)."""
    if given != "auto":
        return given  # type: ignore[return-value]
    return _SUFFIX_FORMATS.get(path.suffix.lower(), "jsonl") if path else "jsonl"


def read_input(stream: IO[bytes], fmt: InputFormat) -> Iterator[tuple[int, bytes]]:
    """Every request of INPUT as (number, JSON line): numbered by line in a text file, by row
    in a JSON array or a Parquet file, so ids, resume and shards work alike in each.

    A JSON array or a Parquet file that cannot be read raises InputError here, at once.
    """
    if fmt == "json":
        return _numbered(_json_array(stream))
    if fmt == "parquet":
        return _parquet_rows(_parquet_file(stream))
    if fmt == "text":
        return _text_lines(stream)
    return read_lines(stream)


def _text_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in read_lines(stream):
        try:
            prompt = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:
            yield number, raw  # parse_line names it: not UTF-8
            continue
        yield number, orjson.dumps({"prompt": prompt})


def _json_array(stream: IO[bytes]) -> list[Any]:
    """A JSON array's items (Alpaca's files are one): read whole, as JSON cannot be streamed."""
    try:
        rows = orjson.loads(stream.read().removeprefix(_BOM))
    except orjson.JSONDecodeError as error:
        raise InputError(f"INPUT is not valid JSON: {error}") from None
    if not isinstance(rows, list):
        raise InputError("INPUT is JSON but not an array of rows: read it as JSONL instead")
    return rows


def _numbered(rows: list[Any]) -> Iterator[tuple[int, bytes]]:
    for number, row in enumerate(rows, start=1):
        yield number, orjson.dumps(row)


def _parquet_file(stream: IO[bytes]) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(stream)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"INPUT is not a Parquet file: {error}") from None


def _parquet_rows(table: Any) -> Iterator[tuple[int, bytes]]:
    number = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            # Dates and decimals travel as text; a null is a field not given.
            given = {k: v for k, v in row.items() if v is not None}
            yield number, orjson.dumps(given, default=str)


class InputError(ValueError):
    """INPUT as a whole cannot be read in its format (not a JSON array, not Parquet)."""


def count_lines(path: Path, fmt: InputFormat = "jsonl") -> int:
    """Requests in a file (for the progress bar): a Parquet file's row count is in its footer."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as stream:
        if fmt == "json":
            return len(_json_array(stream))
        return sum(1 for _ in read_lines(stream))
