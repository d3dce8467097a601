"""The `batchgen` command line."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from batchgen.engine import Engine, EngineConfig, Request
from batchgen.sampling import SamplingParams


def engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every model-running command shares: which model, where, in what dtype."""
    options = [
        click.option(
            "--model",
            default="gpt2",
            show_default=True,
            help="Hugging Face model name or local checkpoint directory.",
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "gpu"]),
            default="auto",
            show_default=True,
            help="auto picks the GPU when MAX sees one.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16"]),
            default="auto",
            show_default=True,
            help="auto is bfloat16 on GPU, float32 on CPU.",
        ),
    ]
    return _with_options(command, options)


def sampling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Per-request decoding options."""
    options = [
        click.option("--max-tokens", default=20, show_default=True, help="New tokens at most."),
        click.option("--temperature", default=0.0, show_default=True, help="0 decodes greedily."),
        click.option("--top-k", default=0, show_default=True, help="0 keeps every token."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus mass kept."),
        click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
    ]
    return _with_options(command, options)


def _with_options(
    command: Callable[..., Any], options: list[Callable[[Any], Any]]
) -> Callable[..., Any]:
    """Apply click options so that --help lists them in the order given."""
    for option in reversed(options):
        command = option(command)
    return command


def load_engine(model: str, device: str, dtype: str) -> Engine:
    try:
        return Engine.from_pretrained(model, EngineConfig(device=device, dtype=dtype))
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot load model {model!r}: {error}") from error


@click.group()
@click.version_option(package_name="batchgen")
def main() -> None:
    """Batch and offline text generation with GPT-2 on Modular MAX."""
    from transformers.utils import logging

    logging.disable_progress_bar()


@main.command()
@click.argument("prompt")
@engine_options
@sampling_options
def generate(
    prompt: str,
    model: str,
    device: str,
    dtype: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
) -> None:
    """Continue one PROMPT and print it with its continuation."""
    from batchgen.weights import load_tokenizer

    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    engine = load_engine(model, device, dtype)
    tokenizer = load_tokenizer(model)
    try:
        out = engine.generate([Request(tokenizer(prompt).input_ids, params)])
    except ValueError as error:  # context too long, empty prompt
        raise click.ClickException(str(error)) from error
    completion = out.completions[0]
    click.echo(prompt + tokenizer.decode(completion.token_ids, skip_special_tokens=True))
    click.echo(
        f"[{completion.completion_tokens} tokens, finish {completion.finish_reason}, "
        f"prefill {1e3 * out.prefill_s:.0f} ms, decode {1e3 * out.decode_s:.0f} ms, "
        f"{engine.device.label} {engine.dtype}]",
        err=True,
    )


@main.command()
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Local GPT-2 checkpoint; default: a seeded random one of the 124M shape.",
)
@click.option("--repeats", default=3, show_default=True, help="Timed runs per figure.")
@click.option("--batch-sizes", default="1,8,32", show_default=True)
def bench(model: Path | None, repeats: int, batch_sizes: str) -> None:
    """Print engine tokens/s next to Hugging Face generate, measured in the same run."""
    from batchgen import bench as bench_module

    config = bench_module.BenchConfig(
        batch_sizes=tuple(int(b) for b in batch_sizes.split(",")), repeats=repeats
    )
    if model is not None:
        bench_module.run(model, config, click.echo)
        return
    from batchgen.testing import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        bench_module.run(write_random_checkpoint(Path(tmp), "124M"), config, click.echo)


@main.command("random-model")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(["tiny", "124M"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True)
def random_model(path: Path, shape: str, seed: int) -> None:
    """Write a seeded random-weight GPT-2 with the GPT-2 tokenizer to PATH (offline smoke tests)."""
    from batchgen.testing import write_random_checkpoint

    click.echo(write_random_checkpoint(path, shape, seed))
