"""A run's files read back for the report: its metrics lines, and its result and error lines.

A metrics file starts a run; the OUTPUT (and --errors) files named after it are that run's.
Every line is checked on the way in: a line that is not batchgen's is a ReportError naming
the file, the line and the field, and nothing is drawn.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from batchgen.job import records

# The metrics lines the report reads, as job/metrics.py writes them (window_record and
# RunStats.summary; a test holds the two together). Strict: a number written as a string is
# not batchgen's. Unknown fields are left alone, so files of later versions still read;
# fields added later default where older files lack them.


class _Line(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class WindowLine(_Line):
    """A `{"type": "window"}` line: the engine's work from the previous window to this one."""

    index: int = Field(ge=0)
    steps: int = Field(ge=1)
    requests: int = Field(ge=0)
    mean_rows: float = Field(ge=0)
    occupancy: float = Field(ge=0, le=1)
    prompt_tokens: int = Field(ge=0)
    generated_tokens: int = Field(ge=0)
    ms: float = Field(ge=0)
    reused_tokens: int = Field(default=0, ge=0)
    waiting: float | None = Field(default=None, ge=0)  # older files lack it
    worker: str | None = None  # the Ray actor (host:pid) that ran it


class Percentiles(_Line):
    p50: float
    p90: float
    p99: float


class SummaryLine(_Line):
    """A `{"type": "summary"}` line: one `batchgen run`'s totals and setup."""

    requests_ok: int = Field(ge=0)
    requests_failed: int = Field(ge=0)
    requests_skipped: int = Field(ge=0)
    windows: int = Field(ge=0)
    steps: int = Field(ge=0)
    prompt_tokens: int = Field(ge=0)
    reused_tokens: int = Field(default=0, ge=0)
    generated_tokens: int = Field(ge=0)
    run_s: float = Field(ge=0)
    requests_per_s: float = Field(ge=0)
    generated_tokens_per_s: float = Field(ge=0)
    latency_ms: Percentiles
    first_token_ms: Percentiles
    mean_rows: float = Field(ge=0)
    occupancy: float = Field(ge=0)
    peak_rss_mb: float | None = None
    model: str
    device: str
    dtype: str | None
    kv_cache: str | None
    schedule: str
    max_rows: int
    prefix_cache: bool | None = None
    load_s: float | None
    compile_s: float | None
    sampler_compile_s: float | None
    shard: str | None
    interrupted: str | None


class ReportError(Exception):
    """A file the report cannot read: names the file, the line and the field."""


# A window's figures as columns, one array per field (NaN where a file lacks `waiting`).
WINDOW_COLUMNS = (
    "steps", "requests", "mean_rows", "occupancy", "prompt_tokens", "generated_tokens",
    "reused_tokens", "ms", "waiting",
)  # fmt: skip


@dataclass
class Windows:
    """Consecutive windows of one engine: each field a column, in the order written."""

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["ms"])

    @classmethod
    def of(cls, lines: list[WindowLine]) -> Windows:
        def column(name: str) -> np.ndarray:
            values = [getattr(line, name) for line in lines]
            return np.array([np.nan if v is None else v for v in values], np.float64)

        return cls({name: column(name) for name in WINDOW_COLUMNS})


@dataclass
class Session:
    """One `batchgen run` into the metrics file (a resumed run appends another): its windows
    by engine (one engine locally, one per Ray actor), and its summary if it finished."""

    engines: dict[str, Windows]  # by worker ("" for a local run)
    summary: SummaryLine | None
    old_lines: int = 0  # batchgen 0.2's "batch" and summary lines, which are not drawn


@dataclass
class Requests:
    """What the result and error lines of a run's OUTPUT files say, request by request."""

    queue_ms: array = field(default_factory=lambda: array("d"))
    first_token_ms: array = field(default_factory=lambda: array("d"))
    decode_ms: array = field(default_factory=lambda: array("d"))
    prompt_tokens: array = field(default_factory=lambda: array("d"))
    completion_tokens: array = field(default_factory=lambda: array("d"))
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (field, kind of message)
    examples: dict[tuple[str, str], str] = field(default_factory=dict)  # one message per kind
    files: list[str] = field(default_factory=list)

    def column(self, name: str) -> np.ndarray:
        return np.frombuffer(getattr(self, name), np.float64)


@dataclass
class Run:
    """A metrics file and the OUTPUT files named after it."""

    label: str
    sessions: list[Session]
    requests: Requests | None = None  # None: no OUTPUT file given


TIMING_FIELDS = ("queue_ms", "first_token_ms", "decode_ms")
USAGE_FIELDS = ("prompt_tokens", "completion_tokens")


def read_runs(paths: list[Path]) -> list[Run]:
    """Runs from files on the command line: each metrics file, then its OUTPUT files."""
    runs: list[Run] = []
    named: Counter[str] = Counter()
    for path in paths:
        kind = _kind(path)
        if kind == "metrics":
            named[str(path)] += 1  # a file named twice is two runs, labelled apart
            label = str(path) if named[str(path)] == 1 else f"{path} ({named[str(path)]})"
            runs.append(Run(label, read_metrics(path)))
        elif not runs:
            what = "is empty" if kind == "empty" else "is an OUTPUT file"
            raise ReportError(
                f"{path} {what}, and comes before any metrics file: name a run's metrics file "
                "(--metrics) first, then its OUTPUT files"
            )
        else:
            run = runs[-1]
            run.requests = run.requests or Requests()
            read_output(path, run.requests)
    return runs


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The file's non-blank lines, numbered from 1, read as a stream."""
    try:
        with path.open("rb") as stream:
            for number, raw in enumerate(stream, start=1):
                if raw.strip():
                    yield number, raw
    except OSError as error:
        raise ReportError(f"{path}: cannot be read: {error.strerror or error}") from None


def _kind(path: Path) -> str:
    """The file's kind by its first line: "metrics", "output" or "empty" (after a metrics
    file, an OUTPUT without lines)."""
    for number, raw in _lines(path):
        first = _json(path, number, raw)
        if isinstance(first, dict) and "type" in first:
            return "metrics"
        if records.accounted(first) is not None:
            return "output"
        raise ReportError(
            f"{path}:{number}: neither a batchgen metrics line (--metrics) nor a result or "
            "error line (OUTPUT)"
        )
    return "empty"


def _json(path: Path, number: int, raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ReportError(f"{path}:{number}: not JSON ({error})") from None


def read_metrics(path: Path) -> list[Session]:
    """A metrics file's sessions: windows up to each summary line (the last may have none)."""
    sessions: list[Session] = []
    windows: dict[str, list[WindowLine]] = {}
    old = 0
    for number, raw in _lines(path):
        record = _json(path, number, raw)
        kind = record.get("type") if isinstance(record, dict) else None
        if kind == "window":
            line = _checked(WindowLine, record, path, number)
            windows.setdefault(line.worker or "", []).append(line)
        elif kind == "summary" and "batches" in record and "windows" not in record:
            sessions.append(_session(windows, None, old + 1))  # batchgen 0.2's
            windows, old = {}, 0
        elif kind == "summary":
            summary = _checked(SummaryLine, record, path, number)
            sessions.append(_session(windows, summary, old))
            windows, old = {}, 0
        elif kind == "batch":
            old += 1
        else:
            raise ReportError(
                f"{path}:{number}: field 'type' is {kind!r}: not a batchgen metrics line "
                "(window or summary)"
            )
    if windows or old or not sessions:
        sessions.append(_session(windows, None, old))  # a run that did not finish
    return sessions


def _session(
    windows: dict[str, list[WindowLine]], summary: SummaryLine | None, old: int
) -> Session:
    return Session({worker: Windows.of(w) for worker, w in windows.items()}, summary, old)


def _checked(model: type[_Line], record: dict, path: Path, number: int) -> Any:
    try:
        return model.model_validate(record)
    except ValidationError as error:
        problems = "; ".join(
            f"field '{'.'.join(map(str, e['loc']))}': {e['msg'].lower()}" for e in error.errors()
        )
        raise ReportError(f"{path}:{number}: {problems}") from None


def read_output(path: Path, into: Requests) -> None:
    """Each result's timing and token counts, and each error line's field and message."""
    into.files.append(str(path))
    columns = [getattr(into, name).append for name in (*TIMING_FIELDS, *USAGE_FIELDS)]
    for number, raw in _lines(path):
        record = _json(path, number, raw)
        accounted = records.accounted(record)
        if accounted is None:
            raise ReportError(f"{path}:{number}: not a batchgen result or error line")
        if accounted[0] == "line":
            _count_error(into, *_error(record, path, number))
            continue
        try:
            timing, used = records.timing_of(record), records.usage_of(record)
            values = [timing[name] for name in TIMING_FIELDS]
            values += [used[name] for name in USAGE_FIELDS]
        except (KeyError, TypeError, AttributeError):
            values = []
        # The exact check is per value; a million lines take it in a second.
        if len(values) != len(columns) or not all(
            type(value) in _NUMBERS and value >= 0 for value in values
        ):
            raise ReportError(f"{path}:{number}: {_problem(record)}")
        for append, value in zip(columns, values, strict=True):
            append(value)


_NUMBERS = (int, float)


def _error(record: dict[str, Any], path: Path, number: int) -> tuple[str | None, str]:
    """An error line's (field, message), checked: names what is missing or mistyped."""
    where = "response.body.error" if "custom_id" in record else "error"
    try:
        error = records.error_of(record)
    except (KeyError, TypeError, AttributeError):
        error = None
    if error is None:
        raise ReportError(f"{path}:{number}: field '{where}' is missing or not an error object")
    field_name, message = error
    if not (field_name is None or isinstance(field_name, str)) or not isinstance(message, str):
        name = "param" if "custom_id" in record else "field"
        raise ReportError(f"{path}:{number}: field '{where}.{name}' or '.message' is not a string")
    return field_name, message


def _problem(record: dict[str, Any]) -> str:
    """What is wrong with a result line whose figures cannot be read (the slow path)."""
    for where, names in (("timing", TIMING_FIELDS), ("usage", USAGE_FIELDS)):
        try:
            values = records.timing_of(record) if where == "timing" else records.usage_of(record)
        except (KeyError, TypeError, AttributeError):
            values = None
        if not isinstance(values, dict):
            return f"field '{where}' is missing or not an object"
        for name in names:
            value = values.get(name)
            if type(value) not in _NUMBERS or value < 0:
                return f"field '{where}.{name}' is {value!r}: not a count"
    return "not a batchgen output line"


# Parts of a message that differ from line to line: numbers and quoted values.
_SPECIFICS = re.compile(r"'[^']*'|\"[^\"]*\"|-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _count_error(into: Requests, field_name: str | None, message: str) -> None:
    """Counted by field and kind: the message with its numbers and quoted values blanked."""
    key = (field_name or "(line)", _SPECIFICS.sub("…", message))
    into.errors[key] += 1
    into.examples.setdefault(key, message)
