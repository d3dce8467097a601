"""What an output file already holds (the resume scan), the no-clobber rule and the run's lock.

A file is claimed before the model loads (checked, scanned and locked, never written) and
opened for writing only once the run can start, so a run that cannot start leaves it as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from batchgen.job import records
from batchgen.job.records import JsonId

Kind = Literal["output", "metrics"]
# How every line batchgen writes begins (orjson puts the first key first, without spaces).
_LINE_HEADS: dict[Kind, bytes] = {"output": records.OUTPUT_HEAD, "metrics": b'{"type":'}
# Metrics lines: a window of the engine's work, a summary; "batch" lines before 0.3.
_METRICS_TYPES = ("window", "batch", "summary")


class ClaimError(Exception):
    """A file cannot be used for this run; it has not been touched."""


@dataclass
class Done:
    """What an existing OUTPUT already accounts for: ids with results, lines with errors."""

    ids: set[JsonId] = field(default_factory=set)
    error_lines: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.ids) + len(self.error_lines)

    def joined(self, other: Done) -> Done:
        """What this file and another (OUTPUT and its error file) account for together."""
        return Done(self.ids | other.ids, self.error_lines | other.error_lines)

    def covers(self, number: int, line_id: JsonId | None) -> bool:
        return number in self.error_lines or (line_id is not None and line_id in self.ids)


@dataclass(frozen=True)
class Scan:
    """A read-only scan of a file to resume: what it holds and how to make it whole."""

    done: Done
    size: int  # bytes in the file when scanned
    whole: int  # bytes of whole batchgen lines; a torn last line lies beyond
    newline_missing: bool  # the last whole line lacks its newline


def scan(stream: IO[bytes], name: str, kind: Kind = "output") -> Scan:
    """Read what a batchgen file holds, without changing it; ClaimError if it is not one.

    A last line that is not JSON and has no newline is torn (a crash mid-write) when the
    lines before it are batchgen's, or when it is the only line and begins like one.
    """
    done = Done()
    whole = size = 0
    newline_missing = False
    for number, raw in enumerate(stream, start=1):
        size += len(raw)
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            if raw.endswith(b"\n") or (number == 1 and not _begins_like(raw, kind)):
                raise ClaimError(f"{name}:{number}: not a batchgen {kind} line") from None
            break  # the torn last line: cut when the file is opened; its request runs again
        if kind == "output":
            _account(done, record, name, number)
        elif not (isinstance(record, dict) and record.get("type") in _METRICS_TYPES):
            raise ClaimError(f"{name}:{number}: not a batchgen metrics line")
        whole += len(raw)
        newline_missing = not raw.endswith(b"\n")
    return Scan(done, size, whole, newline_missing)


def _begins_like(raw: bytes, kind: Kind) -> bool:
    head = _LINE_HEADS[kind]
    return raw.startswith(head) or head.startswith(raw)


def _account(done: Done, record: Any, name: str, number: int) -> None:
    key = records.accounted(record)
    if key is None:
        raise ClaimError(f"{name}:{number}: not a batchgen output line")
    if key[0] == "id":
        done.ids.add(key[1])
    elif key[0] == "line":
        done.error_lines.add(key[1])


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links too)."""
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


class Claim:
    """A file reserved for this run: checked and locked by `claim`, written after `open`."""

    def __init__(self, path: Path | None, scanned: Scan | None, lock: IO[bytes] | None):
        self.path = path  # None: standard output
        self.done = scanned.done if scanned else Done()
        self._scan = scanned
        self._lock = lock
        self._stream: IO[bytes] | None = None

    def open(self) -> IO[bytes]:
        """Open for appending: cut a torn last line, truncate under --overwrite, or create."""
        if self.path is None:
            return sys.stdout.buffer
        try:
            self._stream = self._open_file(self.path)
        except FileExistsError:
            raise ClaimError(f"{self.path} appeared while the model loaded") from None
        except OSError as error:
            raise ClaimError(f"cannot write {self.path}: {error.strerror}") from None
        return self._stream

    def _open_file(self, path: Path) -> IO[bytes]:
        if self._lock is None:  # the file did not exist when claimed
            stream = self._lock = path.open("xb")
            _lock(stream, path)
        elif self._scan is not None:
            stream = path.open("r+b")
            if os.fstat(stream.fileno()).st_size != self._scan.size:
                raise ClaimError(f"{path} changed while the model loaded")
            stream.truncate(self._scan.whole)
            stream.seek(self._scan.whole)
            if self._scan.newline_missing:
                stream.write(b"\n")
        else:
            stream = path.open("wb")
        return stream

    def close(self) -> None:
        for stream in {id(s): s for s in (self._stream, self._lock) if s}.values():
            stream.close()


def claim(path: Path | None, *, resume: bool, overwrite: bool, kind: Kind = "output") -> Claim:
    """Check a file against clobbering, lock it if it exists, and scan it to resume.

    Refused (ClaimError): it exists without --resume/--overwrite, another run holds it, it
    is not batchgen's to resume, or its directory is missing. Nothing is written here.
    """
    if path is None:
        return Claim(None, None, None)
    if not path.exists():
        if not path.parent.is_dir():
            raise ClaimError(f"{path}: directory {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise ClaimError(f"{path}: directory {path.parent} is not writable")
        return Claim(path, None, None)
    if not (resume or overwrite):
        raise ClaimError(
            f"{path} exists: pass --resume to continue it or --overwrite to replace it"
        )
    if not os.access(path, os.W_OK):
        raise ClaimError(f"{path} is not writable")
    try:
        lock = path.open("rb")
    except OSError as error:
        raise ClaimError(f"cannot read {path}: {error.strerror}") from None
    try:
        _lock(lock, path)
        scanned = scan(lock, str(path), kind) if resume else None
    except BaseException:
        lock.close()
        raise
    return Claim(path, scanned, lock)


def _lock(stream: IO[bytes], path: Path) -> None:
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ClaimError(
            f"{path} is being written by another batchgen run; wait for it to end"
        ) from None
