"""Engine throughput next to Hugging Face `generate`, measured in one run on the same batches."""

from __future__ import annotations

import functools
import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from batchgen.engine import Engine, EngineConfig, Request, SamplingParams


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 3
    step_batch: int = 8
    long_context: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Row:
    batch: int
    max_tps: float
    hf_tps: float

    @property
    def ratio(self) -> float:
        return self.max_tps / self.hf_tps


def make_prompts(batch: int, mean_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token prompts of mean_len +/- 12%, so batches carry real left padding."""
    rng = np.random.default_rng(seed)
    spread = max(1, mean_len // 8)
    lengths = rng.integers(mean_len - spread, mean_len + spread + 1, size=batch)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> None:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate([Request(p, params) for p in prompts])


def hf_generate(model: GPT2LMHeadModel, prompts: list[list[int]], new_tokens: int) -> None:
    """HF greedy generate with KV cache over a left-padded batch (its documented batch setup)."""
    width = max(len(p) for p in prompts)
    pad = model.config.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
        )


def decode_step_ms(engine: Engine, batch: int, context: int, vocab: int, seed: int) -> float:
    prompts = make_prompts(batch, context, vocab, seed)
    params = SamplingParams(max_tokens=17, ignore_eos=True)
    engine.generate([Request(p, params) for p in prompts])  # warm-up at this shape
    out = engine.generate([Request(p, params) for p in prompts])
    return 1e3 * out.decode_s / out.decode_steps


def run(model_dir: Path, config: BenchConfig, print_fn: Callable[[str], None] = print) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    engine = Engine.from_pretrained(model_dir, EngineConfig(device="cpu", dtype="float32"))
    hf = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    c = engine.config
    vocab = c.vocab_size
    print_fn(f"model: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} dim")
    print_fn(
        f"MAX on {engine.device.label} {engine.dtype}; torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads"
    )
    print_fn(f"load {engine.timings['load_s']:.1f}s, compile {engine.timings['compile_s']:.1f}s")
    print_fn(
        f"greedy, prompts ~{config.prompt_tokens} tokens (left-padded), "
        f"{config.new_tokens} new tokens, median of {config.repeats}"
    )
    print_fn(f"{'batch':>5} {'MAX tok/s':>10} {'HF tok/s':>10} {'ratio':>6}")
    for batch in config.batch_sizes:
        prompts = make_prompts(batch, config.prompt_tokens, vocab, config.seed + batch)
        max_generate(engine, prompts, 4)  # warm-up
        hf_generate(hf, prompts, 4)
        generated = batch * config.new_tokens
        n, repeats = config.new_tokens, config.repeats
        max_s = median_time(functools.partial(max_generate, engine, prompts, n), repeats)
        hf_s = median_time(functools.partial(hf_generate, hf, prompts, n), repeats)
        row = Row(batch, generated / max_s, generated / hf_s)
        print_fn(f"{batch:>5} {row.max_tps:>10.1f} {row.hf_tps:>10.1f} {row.ratio:>5.2f}x")

    short = decode_step_ms(engine, config.step_batch, config.prompt_tokens, vocab, config.seed)
    long = decode_step_ms(engine, config.step_batch, config.long_context, vocab, config.seed)
    print_fn(
        f"decode step, batch {config.step_batch}: {short:.1f} ms at {config.prompt_tokens} "
        f"tokens of context, {long:.1f} ms at {config.long_context} ({long / short:.2f}x)"
    )


def tutorial_benchmark(
    engine: Engine,
    prompt_ids: list[int],
    new_tokens: int,
    runs: int,
    batch_sizes: tuple[int, ...],
    print_fn: Callable[[str], None] = print,
) -> None:
    """The tutorial's timed generation (first token, per token, tokens/s), then batched."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    request = Request(prompt_ids, params)
    engine.generate([request])  # warm-up
    first_ms, token_ms, total_s = [], [], []
    for _ in range(runs):
        start, stamps = _timed_steps(engine, request)
        total_s.append(stamps[-1] - start)
        first_ms.append(1e3 * (stamps[0] - start))
        token_ms += [1e3 * (b - a) for a, b in itertools.pairwise(stamps)]
    total = statistics.mean(total_s)
    single = new_tokens / total
    print_fn(
        f"Benchmark: {len(prompt_ids)}-token prompt, {new_tokens} new tokens, "
        f"greedy, {runs} runs after a warm-up"
    )
    print_fn(f"  first token:  {statistics.mean(first_ms):8.2f} ms")
    print_fn(
        f"  per token:    {statistics.mean(token_ms):8.2f} ms "
        f"± {statistics.stdev(token_ms) if len(token_ms) > 1 else 0.0:.2f} ms"
    )
    print_fn(f"  tokens/s:     {single:8.1f}")
    print_fn(f"  total time:   {1e3 * total:8.1f} ms")
    print_fn(f"{'batch':>7} {'tokens/s':>10} {'ms/step':>8} {'vs 1 request':>12}")
    for batch in batch_sizes:
        requests = [request] * batch
        engine.generate(requests)  # warm-up at this batch size
        seconds = median_time(functools.partial(engine.generate, requests), runs)
        tokens_per_s = batch * new_tokens / seconds
        print_fn(
            f"{batch:>7} {tokens_per_s:>10.1f} {1e3 * seconds / new_tokens:>8.2f} "
            f"{tokens_per_s / single:>11.2f}x"
        )


def _timed_steps(engine: Engine, request: Request) -> tuple[float, list[float]]:
    """Start time and the time each token arrived, for one request."""
    stamps: list[float] = []
    start = time.perf_counter()
    engine.generate([request], on_step=lambda _step: stamps.append(time.perf_counter()))
    return start, stamps
