"""`batchgen report`'s files: every check first, then the page and the images, each whole."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from batchgen.job.ledger import same_file
from batchgen.report.figures import png, report_figures
from batchgen.report.page import page
from batchgen.report.runs import ReportError, read_runs

FIGURE_NAMES = ("throughput", "engine", "latency", "tokens")  # what --png may write


@dataclass(frozen=True)
class Written:
    runs: int
    figures: int
    files: list[tuple[Path, int]]  # each file written, and its bytes


def write_report(
    inputs: list[Path], html: Path | None, png_dir: Path | None, overwrite: bool = False
) -> Written:
    """Read the runs, draw them, write the page and/or the images; ReportError, with nothing
    written, when a file cannot be read or a target may not be written."""
    targets = [html] if html else []
    if png_dir:
        targets += [png_dir / f"{name}.png" for name in FIGURE_NAMES]
    for target in targets:
        if any(same_file(target, given) for given in inputs if target.exists()):
            raise ReportError(f"{target} is one of the files read: name another")
        if target.exists() and not overwrite:
            raise ReportError(f"{target} exists: pass --overwrite to replace it")
    runs = read_runs(inputs)
    drawn = report_figures(runs)
    contents: list[tuple[Path, bytes]] = []
    if html:
        contents.append((html, page(runs, drawn).encode()))
    if png_dir:
        contents += [(png_dir / f"{item.name}.png", png(item)) for item in drawn]
        try:
            png_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ReportError(f"cannot make {png_dir}: {error.strerror or error}") from None
    for path, data in contents:
        _write_whole(path, data)
    return Written(len(runs), len(drawn), [(path, len(data)) for path, data in contents])


def _write_whole(path: Path, data: bytes) -> None:
    """A temporary file renamed into place: a reader never sees half a page."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as error:
        raise ReportError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)
