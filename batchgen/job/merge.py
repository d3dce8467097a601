"""Shard outputs -> one file: every input line accounted for exactly once, or nothing written.

The parts are indexed (byte offsets, not lines) and copied in the order asked for, so merging
holds about as much memory per line as a resume scan, never the results themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import orjson

from batchgen.job import ledger, records, shards
from batchgen.job.inputs import Defaults, parse_line
from batchgen.job.records import JsonId
from batchgen.job.sources import InputError, input_format, read_input

Order = Literal["parts", "input"]
_SHOWN = 5  # ids named in a message before "and N more"


class MergeError(Exception):
    """The parts do not make a complete output; MERGED has not been written."""


@dataclass(frozen=True)
class Entry:
    """Where one output line lies: which part, at what byte, how long."""

    part: int
    offset: int
    length: int


@dataclass
class PartIndex:
    """Every whole line of the parts, by what it accounts for."""

    results: dict[JsonId, Entry] = field(default_factory=dict)  # by id
    errors: dict[int, Entry] = field(default_factory=dict)  # by input line number
    duplicates: list[str] = field(default_factory=list)
    unused: list[Entry] = field(default_factory=list)  # kept but matched by no input line
    with_results: set[int] = field(default_factory=set)  # parts holding a result (not --errors)


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote and what it noticed."""

    lines: int
    duplicates: list[str]
    unmarked: list[Path]  # parts without a shard completion marker


def merge(
    parts: list[Path], input_path: Path, merged: Path, order: Order, overwrite: bool
) -> MergeReport:
    """Write MERGED from the parts; MergeError (nothing written) if any input line is missing."""
    if merged.exists() and not overwrite:
        raise MergeError(f"{merged} exists: pass --overwrite to replace it")
    if any(ledger.same_file(merged, p) for p in [*parts, input_path] if p.exists()):
        raise MergeError(f"{merged} is one of the files being merged")
    index = PartIndex()
    for number, part in enumerate(parts):
        _index_part(part, number, index)
    chosen = _choose(input_path, index)
    if order == "parts":
        chosen.sort(key=lambda entry: (entry.part, entry.offset))
    _write(parts, chosen, merged)
    # An error file (--errors) has no marker of its own: its OUTPUT's marker stands for it.
    unmarked = [
        p for i, p in enumerate(parts)
        if i in index.with_results and not shards.marker_path(p).exists()
    ]  # fmt: skip
    return MergeReport(len(chosen), index.duplicates, unmarked)


def _open(path: Path, name: str) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as error:
        raise MergeError(f"cannot read {name} {path}: {error.strerror}") from None


def _index_part(part: Path, number: int, index: PartIndex) -> None:
    with _open(part, "part") as stream:
        for offset, raw in _lines_with_offsets(stream):
            try:
                key = records.accounted(orjson.loads(raw))
            except orjson.JSONDecodeError:
                if raw.endswith(b"\n"):
                    raise MergeError(f"{part}: a line is not JSON at byte {offset}") from None
                break  # a torn last line (its shard crashed): its input line counts as missing
            if key is None:
                raise MergeError(f"{part}: not a batchgen output line at byte {offset}")
            entry = Entry(number, offset, len(raw))
            kind, value = key
            if kind == "id":
                index.with_results.add(number)
            table = index.results if kind == "id" else index.errors if kind == "line" else None
            if table is None:
                index.unused.append(entry)
            elif value in table:
                index.duplicates.append(f"{part}: {'id' if kind == 'id' else 'line'} {value!r}")
            else:
                table[value] = entry


def _lines_with_offsets(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    offset = 0
    for raw in stream:
        yield offset, raw
        offset += len(raw)


def _choose(input_path: Path, index: PartIndex) -> list[Entry]:
    """One entry per input line, in input order; MergeError naming the lines none covers."""
    chosen: list[Entry] = []
    missing: list[str] = []
    seen: set[JsonId] = set()
    with _open(input_path, "--input") as stream:
        try:
            lines = read_input(stream, input_format(input_path))
        except InputError as error:
            raise MergeError(f"--input {input_path}: {error}") from None
        for number, raw in lines:
            line_id = parse_line(number, raw, Defaults()).id  # only the id is used
            first = line_id is not None and line_id not in seen
            entry = index.results.pop(line_id, None) if first else None
            if line_id is not None:
                seen.add(line_id)
            error = index.errors.pop(number, None)
            if entry is None:
                entry = error
            elif error is not None:
                index.duplicates.append(f"line {number}: both a result and an error line")
            if entry is None:
                missing.append(f"id {line_id!r}" if line_id is not None else f"line {number}")
            else:
                chosen.append(entry)
    stray = len(index.results) + len(index.errors) + len(index.unused)
    if missing:
        shown = ", ".join(missing[:_SHOWN])
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise MergeError(
            f"{len(missing)} input lines have no output line in the parts: {shown}{more}; "
            "run (or --resume) the shards they belong to, then merge again"
        )
    if stray:
        raise MergeError(
            f"{stray} lines of the parts match no line of {input_path}: is it their input?"
        )
    return chosen


def _write(parts: list[Path], chosen: list[Entry], merged: Path) -> None:
    """Copy the chosen lines into a temporary file, then rename it to MERGED at once."""
    temporary = merged.with_name(f".{merged.name}.{os.getpid()}.tmp")
    streams = [p.open("rb") for p in parts]
    try:
        with temporary.open("wb") as out:
            for entry in chosen:
                source = streams[entry.part]
                source.seek(entry.offset)
                line = source.read(entry.length)
                out.write(line if line.endswith(b"\n") else line + b"\n")
        os.replace(temporary, merged)
    except OSError as error:  # a missing directory, a full disk: nothing is left behind
        raise MergeError(f"cannot write {merged}: {error}") from None
    finally:
        for stream in streams:
            stream.close()
        temporary.unlink(missing_ok=True)
