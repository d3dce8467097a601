"""The MAX tutorial's benchmark (`batchgen gpt2 --benchmark`): timed generation, then batched."""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

from batchgen.bench.engine import median_time
from batchgen.engine import Engine, Request, SamplingParams, SchedulerConfig


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
    # Every run computes the prompt again: repeats must not time prefix-cache hits.
    schedule = replace(engine.schedule, prefix_cache=False)
    engine.generate([request], schedule=schedule)  # warm-up
    first_ms, token_ms, total_s = [], [], []
    for _ in range(runs):
        start, stamps = _timed_steps(engine, request, schedule)
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
        engine.generate(requests, schedule=schedule)  # warm-up at this batch size
        seconds = median_time(functools.partial(engine.generate, requests, schedule=schedule), runs)
        tokens_per_s = batch * new_tokens / seconds
        print_fn(
            f"{batch:>7} {tokens_per_s:>10.1f} {1e3 * seconds / new_tokens:>8.2f} "
            f"{tokens_per_s / single:>11.2f}x"
        )


def _timed_steps(
    engine: Engine, request: Request, schedule: SchedulerConfig
) -> tuple[float, list[float]]:
    """Start time and the time each token arrived, for one request."""
    stamps: list[float] = []
    start = time.perf_counter()
    engine.generate([request], lambda _step: stamps.append(time.perf_counter()), schedule)
    return start, stamps
