"""The MAX GPT-2 tutorial's modes on the batched engine: banner, one prompt, a prompt loop."""

from __future__ import annotations

import itertools
import os
import select
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from batchgen.engine import Engine, Request, SamplingParams
from batchgen.engine.model import GPT2Config
from batchgen.engine.sampling import derive_seed

QUIT_WORDS = frozenset({"quit", "exit", "q"})


@dataclass(frozen=True)
class Decoding:
    """How the tutorial modes decode: sampled at a temperature, reproducible with a seed."""

    max_new_tokens: int
    temperature: float
    seed: int | None

    def params(self, turn: int) -> SamplingParams:
        """Turn n of a session gets its own seed, derived from the session's."""
        seed = None if self.seed is None else derive_seed(self.seed, turn)
        return SamplingParams(self.max_new_tokens, self.temperature, seed=seed)


def parameter_count(config: GPT2Config) -> int:
    """Weights of a GPT-2 (lm_head is tied to the token embedding)."""
    e = config.n_embd
    per_block = (
        4 * e + (e * 3 * e + 3 * e) + (e * e + e) + 2 * (e * config.mlp_dim) + config.mlp_dim + e
    )
    embeddings = (config.vocab_size + config.n_positions) * e
    return embeddings + config.n_layer * per_block + 2 * e


def banner(engine: Engine, model: str) -> list[str]:
    """Device, model summary and setup timings, as the tutorial prints them."""
    c, t = engine.config, engine.timings
    dtype = str(engine.dtype).removeprefix("DType.")
    return [
        f"Device: {engine.device.label}, dtype: {dtype}",
        f"Model: {model}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} embedding dim, "
        f"{c.n_positions} context, {parameter_count(c) / 1e6:.1f}M parameters",
        "Model init: lazy (no random weights materialised)",
        f"Weights loaded: {t.load_s:.2f} s",
        f"To device + compile: {t.compile_s:.2f} s ({engine.cache.kind} KV cache)",
    ]


def generate_text(engine: Engine, prompt: str, params: SamplingParams) -> str:
    """The prompt's continuation (special tokens dropped)."""
    out = engine.generate([Request(engine.tokenizer(prompt).input_ids, params)])
    return out.completions[0].text


class PipeInput:
    """input() for a piped stdin that a Ctrl-C landing just before the read still ends
    (input() would block on: the signal is handled, read() never interrupted)."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.pending = b""
        self.woken, wake = os.pipe()
        os.set_blocking(wake, False)
        signal.set_wakeup_fd(wake, warn_on_full_buffer=False)

    def __call__(self, prompt: str) -> str:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.fd, self.woken], [], [])
            if self.woken in ready:
                os.read(self.woken, 512)  # the signal's handler raises once this returns
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                if not self.pending:
                    raise EOFError
                self.pending += b"\n"  # a last line without its newline
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode(errors="replace")


def prompt_loop(
    engine: Engine,
    decoding: Decoding,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
) -> None:
    """Ask for prompts until quit/exit/q, EOF or Ctrl-C; an empty line asks again."""
    write("Type quit, exit or q (or Ctrl-D) to leave.")
    for turn in itertools.count():
        try:
            prompt = read("\nEnter your prompt: ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if prompt.strip().lower() in QUIT_WORDS:
            return
        if not prompt.strip():
            continue
        try:
            text = generate_text(engine, prompt, decoding.params(turn))
        except ValueError as error:  # prompt too long for the context
            write(f"Error: {error}")
            continue
        except KeyboardInterrupt:  # Ctrl-C while generating leaves as it does at the prompt
            write("")
            return
        write(f"Generated text:\n{prompt}{text}")
