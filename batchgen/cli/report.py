"""`batchgen report`: pictures of runs, from their metrics files and OUTPUT files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click


class BadFile(click.ClickException):
    """A file the report cannot read or may not write: not worth a retry."""

    exit_code = 2


@click.command()
@click.argument(
    "files", metavar="METRICS [OUTPUT...]...", nargs=-1, required=True,
    type=click.Path(dir_okay=False, path_type=Path),
)  # fmt: skip
@click.option(
    "-o", "--output", "html", type=click.Path(dir_okay=False, path_type=Path),
    help="The HTML page: one file, opens offline (nothing is fetched).",
)  # fmt: skip
@click.option(
    "--png", "png_dir", type=click.Path(file_okay=False, path_type=Path),
    help="Also (or instead) write each figure as DIR/<figure>.png.",
)  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing page or images.")
def report(files: tuple[Path, ...], html: Path | None, png_dir: Path | None, overwrite: bool):
    """Draw runs: throughput and how full the engine was over time from each METRICS file
    (`batchgen run --metrics`), and per-request latency, tokens and errors from the OUTPUT
    (and --errors) files named after it. Several METRICS files are overlaid, to compare.

    \b
    batchgen report metrics.jsonl out.jsonl -o report.html
    batchgen report a-metrics.jsonl a.jsonl b-metrics.jsonl b.jsonl -o compare.html --png figs/

    Exit 2, writing nothing, when a file is not batchgen's (its line and field are named).
    """
    if html is None and png_dir is None:
        raise click.UsageError("name the page (-o report.html), the images (--png DIR), or both")
    if importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException(
            "batchgen report draws with matplotlib: pip install 'batchgen[report]'"
        )
    from batchgen.report.runs import ReportError
    from batchgen.report.writer import write_report

    try:
        written = write_report(list(files), html, png_dir, overwrite)
    except ReportError as error:
        raise BadFile(str(error)) from None
    for path, size in written:
        click.echo(f"batchgen report: {path} ({size / 1024:,.0f} KiB)", err=True)
