"""The options several commands share, and the checks and loading they go through."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import click

SEED = click.IntRange(0, 2**64 - 1)
JSONL_FILE = click.Path(dir_okay=False, allow_dash=True)  # "-": stdin or stdout


def given(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings given: an option left out is None, and the dataclass's default applies."""
    return {name: value for name, value in settings.items() if value is not None}


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def on_off(ctx: click.Context, param: click.Parameter, value: str | None) -> bool | None:
    return None if value is None else value == "on"


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
            help="auto (the default) picks the GPU when MAX sees one.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16"]),
            help="auto (the default) is bfloat16 on GPU, float32 on CPU.",
        ),
        click.option(
            "--kv-cache",
            type=click.Choice(["auto", "slots", "paged"]),
            help="slots: batchgen's Mojo attention over a slot per row (CPU, auto there); "
            "paged: MAX's paged kernels (auto, the default, on GPU).",
        ),
        click.option(
            "--kv-cache-gb",
            type=click.FloatRange(min=0, min_open=True),
            help="KV cache memory; default: up to 4 GB (a quarter of free memory at most) on "
            "CPU, half of the free memory on GPU.",
        ),
        click.option(
            "--kv-cache-dtype",
            type=click.Choice(["auto", "float32", "float16"]),
            help="auto (the default): the model's; float16 (slots): half the memory and the "
            "bytes each step reads, maths in float32, logits within ~1e-2 of float32's.",
        ),
    ]
    return with_options(command, options)


def sampling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Per-request decoding options, range-checked before anything loads."""
    options = [
        click.option(
            "--max-tokens",
            type=click.IntRange(min=1),
            help="New tokens at most (default: 16, as OpenAI's).",
        ),
        click.option(
            "--temperature",
            type=click.FloatRange(min=0),
            callback=finite,
            help="0 (the default) decodes greedily.",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(min=0),
            help="0 (the default) keeps every token.",
        ),
        click.option(
            "--top-p",
            type=click.FloatRange(0, 1, min_open=True),
            callback=finite,
            help="Nucleus mass kept (default: 1, all of it).",
        ),
    ]
    return with_options(command, options)


def with_options(
    command: Callable[..., Any], options: list[Callable[[Any], Any]]
) -> Callable[..., Any]:
    """Apply click options so that --help lists them in the order given."""
    for option in reversed(options):
        command = option(command)
    return command


def load_engine(model: str, **engine_settings: Any) -> Any:
    """The engine `engine_options` describe (device, dtype, kv_cache, ...), compiled."""
    from batchgen.engine import EngineConfig
    from batchgen.job import loading
    from batchgen.job.errors import JobError

    try:
        return loading.load_engine(model, EngineConfig(**given(engine_settings)))
    except JobError as error:
        raise click.ClickException(str(error)) from None


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{text!r} is not a list like 1,8,32", param_hint="--batch-sizes")
    return sizes
