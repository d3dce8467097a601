"""`batchgen random-model`: a seeded random-weight GPT-2 for offline use."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("random-model")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(["tiny", "124M"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True)
def random_model(path: Path, shape: str, seed: int) -> None:
    """Write a seeded random-weight GPT-2 with the GPT-2 tokenizer to PATH (offline smoke tests)."""
    from transformers.utils import logging

    from batchgen.random_checkpoint import write_random_checkpoint

    logging.disable_progress_bar()
    click.echo(write_random_checkpoint(path, shape, seed))
