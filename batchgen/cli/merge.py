"""`batchgen merge`: shard outputs into one file, every input line exactly once."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument(
    "parts", metavar="PART...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The INPUT the shards ran: every line of it must be accounted for.",
)
@click.option(
    "-o",
    "--output",
    "merged",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The merged file (written whole or not at all).",
)
@click.option(
    "--order",
    type=click.Choice(["parts", "input"]),
    default="parts",
    show_default=True,
    help="parts: each part's lines in turn; input: INPUT's line order.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing merged file.")
def merge(
    parts: tuple[Path, ...], input_path: Path, merged: Path, order: str, overwrite: bool
) -> None:
    """Merge shard outputs (PART...) into one file holding every line of INPUT exactly once.

    Exit 1, writing nothing, when a line of INPUT has no result or error line in the parts
    (the first few are named); duplicates are reported and kept once.
    """
    from batchgen.job.merge import MergeError
    from batchgen.job.merge import merge as merge_parts

    try:
        report = merge_parts(list(parts), input_path, merged, order, overwrite)
    except MergeError as error:
        raise click.ClickException(str(error)) from None
    for part in report.unmarked:
        click.echo(f"note: {part} has no completion marker (run without --shard?)", err=True)
    if report.duplicates:
        shown = "; ".join(report.duplicates[:5])
        click.echo(f"{len(report.duplicates)} duplicate lines, kept once: {shown}", err=True)
    click.echo(
        f"batchgen merge: {report.lines} lines from {len(parts)} parts into {merged}", err=True
    )
