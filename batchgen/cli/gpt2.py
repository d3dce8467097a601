"""`batchgen gpt2`: the MAX GPT-2 tutorial's modes (batchgen.modes.gpt2 runs them)."""

from __future__ import annotations

from typing import Any

import click

from batchgen.cli.options import SEED, engine_options, finite, load_engine, parse_batch_sizes
from batchgen.job.signals import restore_default_signals


@click.command("gpt2")
@engine_options
@click.option("--prompt", help="Generate once from PROMPT and exit.")
@click.option("--chat", is_flag=True, help="Rich terminal chat, Human vs GPT-2, streamed.")
@click.option("--benchmark", is_flag=True, help="Timed generation, then the same batched.")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    help="Default: 50 in the prompt loop, 20 with --prompt, 100 in chat, 32 in the benchmark.",
)
@click.option(
    "--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
    callback=finite, help="0 decodes greedily.",
)  # fmt: skip
@click.option(
    "--chat-temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
    callback=finite, help="Temperature in chat.",
)  # fmt: skip
@click.option("--seed", type=SEED, help="Session seed: every mode reproduces its output with it.")
@click.option("--batch-sizes", default="1,4,16", show_default=True, help="Benchmark batches.")
@click.option(
    "--runs", type=click.IntRange(min=1), default=3, show_default=True,
    help="Benchmark timed runs.",
)  # fmt: skip
def gpt2(
    model: str,
    prompt: str | None,
    chat: bool,
    benchmark: bool,
    max_new_tokens: int | None,
    temperature: float,
    chat_temperature: float,
    seed: int | None,
    batch_sizes: str,
    runs: int,
    **engine_settings: Any,
) -> None:
    """The MAX GPT-2 tutorial's modes: a prompt loop (default), --prompt, --chat, --benchmark."""
    if sum((prompt is not None, chat, benchmark)) > 1:
        raise click.UsageError("choose one of --prompt, --chat and --benchmark")
    sizes = parse_batch_sizes(batch_sizes)
    from batchgen.modes.gpt2 import Mode, run_mode

    mode = Mode(prompt, chat, benchmark, max_new_tokens, temperature, chat_temperature, seed,
                sizes, runs)  # fmt: skip
    click.echo(f"Loading {model} ...")
    engine = load_engine(model, **engine_settings)
    restore_default_signals()  # from here Ctrl-C leaves the loop or the chat as it always has
    try:
        run_mode(engine, model, mode, click.echo)
    except ValueError as error:
        if prompt is None:
            raise
        raise click.ClickException(str(error)) from error
