"""The `batchgen` command: options in, one call per command, exit codes out.

Only Click and the standard library are imported up front, and each command's module only
when the command is named or listed, so `--help`, `--version` and usage errors answer at
once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from batchgen import __version__
from batchgen.job.signals import Interrupted, raise_on_signals

# Each command's module in batchgen.cli; the command object in it has the module's name.
COMMANDS = {
    "run": "run",
    "merge": "merge",
    "gpt2": "gpt2",
    "generate": "generate",
    "bench": "bench",
    "report": "report",
    "random-model": "random_model",
}


class LazyGroup(click.Group):
    """A group whose commands are imported when used (Click's documented lazy loading)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)  # as click.Group lists them

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(f"batchgen.cli.{COMMANDS[cmd_name]}")
        return getattr(module, COMMANDS[cmd_name])


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="batchgen")
def cli() -> None:
    """Batch and offline text generation with GPT-2 on Modular MAX."""


def main() -> None:
    """The console script: a Ctrl-C or SIGTERM at any moment ends it with 130/143, one line."""
    raise_on_signals()
    try:
        cli.main(prog_name="batchgen")
    except Interrupted as interrupt:
        click.echo(f"batchgen: interrupted by {interrupt}", err=True)
        # Every line written is already flushed. Exit now: a compile may still be running in
        # the loader thread, and the interpreter's shutdown would wait on it or trip over it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(interrupt.exit_code)
