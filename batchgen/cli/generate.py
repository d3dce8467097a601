"""`batchgen generate`: continue one prompt, timing on stderr."""

from __future__ import annotations

from typing import Any

import click

from batchgen.cli.options import SEED, engine_options, load_engine, sampling_options


@click.command()
@click.argument("prompt")
@engine_options
@sampling_options
@click.option("--seed", type=SEED, default=None, help="Seed for reproducible sampling.")
def generate(prompt: str, **settings: Any) -> None:
    """Continue one PROMPT and print it with its continuation."""
    from batchgen.engine import Request, SamplingParams
    from batchgen.job.options import grouped

    groups = grouped(settings)  # the same map from options to fields as `batchgen run`'s
    params = SamplingParams(**groups["sampling"], seed=groups["job"].get("seed"))
    engine = load_engine(groups["job"]["model"], **groups["engine"])
    try:
        out = engine.generate([Request(engine.tokenizer(prompt).input_ids, params)])
    except ValueError as error:  # context too long, empty prompt
        raise click.ClickException(str(error)) from error
    completion = out.completions[0]
    timing = completion.timing
    click.echo(prompt + completion.text)
    click.echo(
        f"[{completion.completion_tokens} tokens, finish {completion.finish_reason}, "
        f"prefill {timing.prefill_ms:.0f} ms, decode {timing.decode_ms:.0f} ms, "
        f"{engine.device.label} {str(engine.dtype).removeprefix('DType.')}, "
        f"{engine.cache.kind} KV cache]",
        err=True,
    )
