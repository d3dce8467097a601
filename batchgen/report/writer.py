"""`batchgen report`'s files: every check first, then the page and the images, each whole."""

from __future__ import annotations

import os
from pathlib import Path

from batchgen.job.ledger import same_file
from batchgen.report.figures import figure_names, png, report_figures
from batchgen.report.page import page
from batchgen.report.runs import ReportError, read_runs


def write_report(
    inputs: list[Path], html: Path | None, png_dir: Path | None, overwrite: bool = False
) -> list[tuple[Path, int]]:
    """Read the runs, draw them, write the page and/or the images (each file and its bytes
    returned); ReportError, with no file changed, when one cannot be read or written."""
    runs = read_runs(inputs)
    targets = [html] if html else []
    if png_dir:
        targets += [png_dir / f"{name}.png" for name in figure_names(runs)]
    for target in targets:
        if any(same_file(target, given) for given in inputs if target.exists()):
            raise ReportError(f"{target} is one of the files read: name another")
        if target.exists() and not overwrite:
            raise ReportError(f"{target} exists: pass --overwrite to replace it")
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
    _write_all(contents)
    return [(path, len(data)) for path, data in contents]


def _write_all(contents: list[tuple[Path, bytes]]) -> None:
    """Each file into a temporary beside it, then all renamed into place: a write that fails
    (a full disk) leaves every target as it was, and no reader sees half a page."""
    temporaries = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path, _ in contents]
    try:
        for (path, data), temporary in zip(contents, temporaries, strict=True):
            try:
                temporary.write_bytes(data)
            except OSError as error:
                raise ReportError(f"cannot write {path}: {error.strerror or error}") from None
        for (path, _), temporary in zip(contents, temporaries, strict=True):
            try:
                os.replace(temporary, path)
            except OSError as error:
                raise ReportError(f"cannot replace {path}: {error.strerror or error}") from None
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
