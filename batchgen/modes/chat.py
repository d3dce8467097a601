"""The terminal chat: Human vs GPT-2, each reply streamed token by token in a rich live panel."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from batchgen.engine import Engine, Request, SamplingParams, Step
from batchgen.engine.sampling import derive_seed
from batchgen.engine.textstream import TextStream
from batchgen.engine.transcript import STOP_STRINGS
from batchgen.modes.interactive import QUIT_WORDS


@dataclass(frozen=True)
class Turn:
    human: str
    ai: str


def build_prompt(
    history: Sequence[Turn], message: str, tokenizer: PreTrainedTokenizerBase, budget: int
) -> tuple[list[int], int]:
    """The "Human: ...\\nAI:" transcript as token ids within `budget`, and the turns dropped.

    The oldest turns go first; a message too long on its own keeps its last `budget` tokens.
    """
    for dropped in range(len(history) + 1):
        turns = history[dropped:]
        text = "".join(f"Human: {t.human}\nAI: {t.ai}\n" for t in turns)
        ids = tokenizer(f"{text}Human: {message}\nAI:").input_ids
        if len(ids) <= budget:
            return ids, dropped
    return ids[-budget:], len(history)


class ReplyStream:
    """Feeds one reply's tokens to a TextStream and shows the text each time it grows.

    The engine ends the row at a stop string; this stream holds back any text that could
    still begin one, so the panel never shows part of "\nHuman:".
    """

    def __init__(self, vocab_bytes: Sequence[bytes], show: Callable[[str], None]):
        self.stream = TextStream(vocab_bytes, STOP_STRINGS)
        self._show = show

    def on_step(self, step: Step) -> None:
        """The engine's per-step callback for a request alone in its call."""
        token = step.token_of(0)
        if token is not None and self.stream.push(token):
            self._show(self.stream.text.lstrip())

    def finish(self) -> str:
        if self.stream.finish():
            self._show(self.stream.text.lstrip())
        return self.stream.text.strip()


def _panel(text: str) -> Panel:
    return Panel(Text(text), title="GPT-2", title_align="left", border_style="green")


def chat(
    engine: Engine,
    temperature: float,
    max_new_tokens: int,
    seed: int | None,
    console: Console,
) -> None:
    """Chat until quit/exit/q, EOF or Ctrl-C."""
    tokenizer = engine.tokenizer
    budget = engine.config.n_positions - max_new_tokens
    history: list[Turn] = []
    console.print(
        Panel(
            "Chat with GPT-2, a base model continuing a Human/AI transcript. "
            "Type quit, exit or q (or Ctrl-D) to leave.",
            border_style="blue",
        )
    )
    for turn in itertools.count():
        try:
            message = console.input("[bold cyan]Human:[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if message.lower() in QUIT_WORDS:
            return
        if not message:
            continue
        ids, dropped = build_prompt(history, message, tokenizer, budget)
        history = history[dropped:]
        if dropped:
            console.print(f"[dim](dropped the {dropped} oldest turn(s) to fit the context)[/]")
        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            seed=None if seed is None else derive_seed(seed, turn),
            stop=STOP_STRINGS,
        )
        with Live(_panel(""), console=console, refresh_per_second=24) as live:
            reply = ReplyStream(engine.vocab_bytes, lambda text: live.update(_panel(text)))
            try:
                engine.generate([Request(ids, params)], reply.on_step)
            except KeyboardInterrupt:
                console.print()
                return
            reply_text = reply.finish()
        if not console.is_terminal:
            console.print()  # a live panel left on a pipe ends without a newline
        history.append(Turn(message, reply_text))
