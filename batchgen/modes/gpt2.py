"""`batchgen gpt2`: which of the MAX tutorial's modes runs, on an engine already loaded."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from batchgen.engine import Engine
from batchgen.modes import interactive

BENCHMARK_PROMPT = "The history of artificial intelligence began"


@dataclass(frozen=True)
class Mode:
    """The mode and its settings (the command's defaults); max_new_tokens None: the mode's."""

    prompt: str | None
    chat: bool
    benchmark: bool
    max_new_tokens: int | None
    temperature: float
    chat_temperature: float
    seed: int | None
    batch_sizes: tuple[int, ...]
    runs: int


def run_mode(engine: Engine, model: str, mode: Mode, echo: Callable[[str], None]) -> None:
    """The banner, then the mode; ValueError when --prompt cannot run (too long, empty)."""
    for line in interactive.banner(engine, model):
        echo(line)
    if mode.benchmark:
        from batchgen.modes.benchmark import tutorial_benchmark

        ids = engine.tokenizer(BENCHMARK_PROMPT).input_ids
        new_tokens = mode.max_new_tokens or 32
        tutorial_benchmark(engine, ids, new_tokens, mode.runs, mode.batch_sizes, echo)
    elif mode.chat:
        from rich.console import Console

        from batchgen.modes.chat import chat

        chat(engine, mode.chat_temperature, mode.max_new_tokens or 100, mode.seed, Console())
    elif mode.prompt is not None:
        decoding = interactive.Decoding(mode.max_new_tokens or 20, mode.temperature, mode.seed)
        text = interactive.generate_text(engine, mode.prompt, decoding.params(0))
        echo(f"Generated text:\n{mode.prompt}{text}")
    else:
        decoding = interactive.Decoding(mode.max_new_tokens or 50, mode.temperature, mode.seed)
        read = input if sys.stdin.isatty() else interactive.PipeInput()
        interactive.prompt_loop(engine, decoding, read, echo)
