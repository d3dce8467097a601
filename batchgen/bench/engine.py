"""batchgen's throughput next to Hugging Face and next to itself, measured in one run.

Workloads (`batchgen bench --workloads ...`), all greedy, on the CPU:
- uniform: batches of B ~32-token prompts, 64 new tokens each; the engine next to HF
  `generate` on the same batch, and the engine alone at a larger B.
- step: a decode step at 32 and at 512 tokens of context (batch 8), and the profile of one
  B=32 step: the graph (attention apart from the rest), the host, and the compute roofline.
- mixed: a job of prompts of 8-200 words, max_tokens 8-256, through `batchgen run` with
  default options and with `--schedule static`, next to a careful hand-written HF loop.
- long: 32 prompts of ~500 tokens, 64 new each, through `batchgen run` with default options.
- scoring: echo scoring (`max_tokens: 0`) of 32 prompts of ~128 tokens, next to one HF
  forward pass over the same batch (log-softmax, the prompt's tokens gathered).
- choices: 8 prompts of ~128 tokens with `n: 4` (one prefill each, the cache forked), next to
  the same as 32 separate requests; sampled, 32 new tokens each.
- prefix: 64 prompts sharing a 400-token preamble, tails of 20-60 tokens, 32 new each,
  through `batchgen run` with `--prefix-cache on` and `off`, next to the careful HF loop; and
  50 continuations of one 400-token document scored (echo, max_tokens 0), on and off.
Jobs run as real `batchgen run` processes, timed end to end; each prints its peak memory.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from max.dtype import DType
from transformers import AutoTokenizer

from batchgen.bench import workloads
from batchgen.bench.workloads import hf_careful_loop, hf_generate, run_job_process
from batchgen.engine import Engine, EngineConfig, Request, SamplingParams, SchedulerConfig
from batchgen.engine.scheduler import Row, StepPlan

WORKLOADS = ("uniform", "step", "mixed", "long", "scoring", "choices", "prefix")
# What the fp32 matmuls of this machine class sustain (measured: 360-420 GFLOP/s).
MATMUL_FLOPS = 360e9


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"  # or "gpu": batchgen in bfloat16 on MAX's paged kernels, HF on CUDA
    workloads: tuple[str, ...] = WORKLOADS
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    hf_batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 3
    step_batch: int = 8
    long_context: int = 512
    profile_batch: int = 32
    mixed_lines: int = 128
    long_lines: int = 32
    scoring_prompts: int = 32
    scoring_tokens: int = 128
    choice_prompts: int = 8
    choices: int = 4
    prefix_lines: int = 64
    preamble_tokens: int = 400
    continuations: int = 50
    seed: int = 0


@dataclass(frozen=True)
class Bar:
    """One figure of a workload: batchgen's (in some setting) or its baseline's."""

    label: str
    value: float
    baseline: bool = False


@dataclass(frozen=True)
class Workload:
    """A workload's figures in one unit, as `--plot` draws them side by side."""

    title: str
    unit: str
    bars: list[Bar]


@dataclass
class BenchFigures:
    """What a bench run measured, for --plot: tokens/s by batch size, and each workload."""

    batches: list[tuple[int, float, float | None]] = field(default_factory=list)  # B, ours, HF
    workloads: list[Workload] = field(default_factory=list)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> None:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate([Request(p, params) for p in prompts], schedule=_all_at_once(prompts))


def _all_at_once(prompts: list[list[int]]) -> SchedulerConfig:
    """Every row admitted and prefilled in the first step, as one batch; no prefix cache,
    so that each timed repeat computes what the first did."""
    return SchedulerConfig(
        max_rows=len(prompts), step_tokens=sum(map(len, prompts)), prefix_cache=False
    )


def decode_step_ms(engine: Engine, batch: int, context: int, seed: int) -> float:
    """The median wall time of an engine step that decodes `batch` rows at ~`context`."""
    prompts = workloads.uniform_prompts(batch, context, seed)
    requests = [Request(p, SamplingParams(max_tokens=17, ignore_eos=True)) for p in prompts]
    stamps: list[float] = []
    for _ in range(2):  # the first run warms this shape up
        stamps.clear()
        engine.generate(requests, lambda _: stamps.append(time.perf_counter()),
                        _all_at_once(prompts))  # fmt: skip
    return 1e3 * statistics.median(b - a for a, b in itertools.pairwise(stamps))


def run(
    model_dir: Path, config: BenchConfig, print_fn: Callable[[str], None] = print
) -> BenchFigures:
    """Run the chosen workloads, printing each figure as it comes; all of them returned."""
    rows = max(config.batch_sizes + (config.profile_batch, config.step_batch))
    # On the CPU, room for the largest batch; a GPU's default budget holds far more.
    cache_gb = 1.1 * rows * _slot_bytes(model_dir) / 2**30 if config.device == "cpu" else None
    engine_config = EngineConfig(
        device=config.device,  # type: ignore[arg-type]
        kv_cache_gb=cache_gb,
        scheduler=SchedulerConfig(max_rows=rows, prefix_cache=False),
    )
    engine = Engine.from_pretrained(model_dir, engine_config)
    c = engine.config
    dtype = str(engine.dtype).removeprefix("DType.")
    print_fn(f"model: {model_dir}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} dim")
    print_fn(
        f"MAX on {engine.device.label} {dtype}, {engine.cache.kind} KV cache; torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads"
    )
    print_fn(
        f"load {engine.timings.load_s:.1f} s, compile {engine.timings.compile_s:.1f} s; "
        f"weights {engine.weights_bytes / 2**20:.0f} MiB, KV cache "
        f"{engine.cache.nbytes / 2**20:.0f} MiB, RSS now {workloads.peak_rss_mb():.0f} MiB"
    )
    wants_hf = {"uniform", "mixed", "scoring", "prefix"} & set(config.workloads)
    hf = workloads.hf_model(model_dir, config.device) if wants_hf else None
    figures = BenchFigures()
    measured = figures.workloads.append
    with tempfile.TemporaryDirectory() as scratch:
        for name in config.workloads:
            print_fn("")
            if name == "uniform":
                figures.batches = uniform(engine, hf, config, print_fn)
                measured(uniform_workload(figures.batches, config))
            elif name == "step":
                step(engine, config, print_fn)
                if engine.cache.kind == "slots":  # and what float16 keys and values buy
                    half = replace(engine_config, kv_cache_dtype="float16")
                    print_fn("with --kv-cache-dtype float16:")
                    step(Engine.from_pretrained(model_dir, half), config, print_fn)
            elif name == "mixed":
                measured(mixed(model_dir, hf, config, Path(scratch), print_fn))
            elif name == "long":
                measured(long_prompts(model_dir, config, Path(scratch), print_fn))
            elif name == "scoring":
                measured(scoring(engine, hf, config, print_fn))
            elif name == "choices":
                measured(choices(engine, config, print_fn))
            elif name == "prefix":
                figures.workloads += shared_prefixes(model_dir, hf, config, Path(scratch), print_fn)
    print_fn(f"\npeak RSS of this process: {workloads.peak_rss_mb():.0f} MiB")
    return figures


def uniform(
    engine: Engine, hf, config: BenchConfig, print_fn: Callable[[str], None]
) -> list[tuple[int, float, float | None]]:
    """(batch, batchgen tok/s, HF tok/s or None) per batch size."""
    print_fn(
        f"uniform: prompts ~{config.prompt_tokens} tokens, {config.new_tokens} new tokens, "
        f"greedy, median of {config.repeats}"
    )
    print_fn(f"{'batch':>5} {'batchgen tok/s':>15} {'HF tok/s':>10} {'ratio':>6}")
    points: list[tuple[int, float, float | None]] = []
    for batch in config.batch_sizes:
        prompts = workloads.uniform_prompts(batch, config.prompt_tokens, config.seed)
        max_generate(engine, prompts, 4)  # warm-up
        n, repeats = config.new_tokens, config.repeats
        ours = batch * n / median_time(functools.partial(max_generate, engine, prompts, n), repeats)
        if batch not in config.hf_batch_sizes:
            print_fn(f"{batch:>5} {ours:>15.1f} {'-':>10} {'-':>6}")
            points.append((batch, ours, None))
            continue
        hf_generate(hf, prompts, 4)
        theirs = batch * n / median_time(functools.partial(hf_generate, hf, prompts, n), repeats)
        print_fn(f"{batch:>5} {ours:>15.1f} {theirs:>10.1f} {ours / theirs:>5.2f}x")
        points.append((batch, ours, theirs))
    return points


def uniform_workload(
    points: list[tuple[int, float, float | None]], config: BenchConfig
) -> Workload:
    """The largest batch HF also ran, as a workload's bars."""
    batch, ours, theirs = max((p for p in points if p[2] is not None), default=points[-1])
    bars = [Bar(f"batchgen, batch {batch}", ours)]
    if theirs is not None:
        bars.append(Bar("HF generate", theirs, baseline=True))
    title = f"uniform: ~{config.prompt_tokens}-token prompts, {config.new_tokens} new"
    return Workload(title, "generated tok/s", bars)


def step(engine: Engine, config: BenchConfig, print_fn: Callable[[str], None]) -> None:
    batch, short_ctx, long_ctx = config.step_batch, config.prompt_tokens, config.long_context
    short = decode_step_ms(engine, batch, short_ctx, config.seed)
    long = decode_step_ms(engine, batch, long_ctx, config.seed)
    print_fn(
        f"decode step, batch {batch}: {short:.1f} ms at {short_ctx} tokens of context, "
        f"{long:.1f} ms at {long_ctx} ({long / short:.2f}x)"
    )
    for context in (128, long_ctx):
        profile(engine, config.profile_batch, context, config.seed, print_fn)


def profile(
    engine: Engine, batch: int, context: int, seed: int, print_fn: Callable[[str], None]
) -> None:
    """Where one decode step of `batch` rows at `context` goes: building its inputs, the
    graph (and in it the attention op alone, on the slot cache), the rest of the host."""
    step_ms = decode_step_ms(engine, batch, context, seed)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(batch):
        row = Row(index, rng.integers(0, 50000, context).tolist(), SamplingParams(), 0, 0.0)
        assert engine.cache.admit(row.key, row.tokens)
        row.computed, row.generated = context, [5]
        rows.append(row)
    plan = StepPlan(rows, [])
    runner = engine.runner
    try:
        inputs_ms = 1e3 * median_time(lambda: runner.inputs(plan), 9)
        arguments = runner.inputs(plan)
        graph_ms = 1e3 * median_time(lambda: runner.graph(*arguments)[0].to_numpy(), 9)
    finally:
        for row in rows:
            engine.cache.release(row.key)
    attention_ms = _attention_ms(engine, batch, context) if engine.cache.kind == "slots" else None
    tokens_per_s = 1e3 * batch / step_ms
    c = engine.config
    # Two FLOPs per weight a token meets: the blocks' matmuls and the tied LM head.
    flop_per_token = 2 * (c.n_layer * (4 * c.n_embd**2 + 2 * c.n_embd * c.mlp_dim))
    roofline = MATMUL_FLOPS / (flop_per_token + 2 * c.vocab_size * c.n_embd)
    parts = [f"inputs {inputs_ms:.1f} ms", f"graph {graph_ms:.1f} ms"]
    if attention_ms is not None:
        itemsize = engine.cache.dtype.size_in_bytes
        gigabytes = 2 * batch * (context + 1) * engine.config.n_embd * itemsize / 1e9
        per_layer = attention_ms / engine.config.n_layer
        parts.append(
            f"of which attention {attention_ms:.1f} ms ({gigabytes * 1e3 / per_layer:.1f} GB/s of "
            f"K/V read) and matmuls and the rest {graph_ms - attention_ms:.1f} ms"
        )
    parts.append(f"other host work {max(step_ms - graph_ms - inputs_ms, 0.0):.1f} ms")
    print_fn(
        f"profile, decode step of {batch} rows at {context}: {step_ms:.1f} ms = "
        + ", ".join(parts)
        + f"; {tokens_per_s:.0f} tok/s, {100 * tokens_per_s / roofline:.0f}% of the "
        f"~{roofline:.0f} tok/s compute roofline (fp32 matmuls at 360 GFLOP/s)"
    )


def _attention_ms(engine: Engine, batch: int, context: int) -> float:
    """batchgen's slot attention op alone, at this step's shape, over all layers."""
    from max.driver import Buffer

    from batchgen.engine.kernels import standalone_slot_attention

    c = engine.config
    rng = np.random.default_rng(0)
    cache_dtype = str(engine.cache.dtype).removeprefix("DType.")
    attend = standalone_slot_attention(c.n_head, cache_dtype)
    shape = (batch, c.n_head, context + 1, c.head_dim)
    cache = [rng.standard_normal(shape, np.float32).astype(cache_dtype) for _ in range(2)]
    new = [rng.standard_normal((batch, c.n_head, c.head_dim), np.float32)] * 3
    rows = [np.arange(batch + 1, dtype=np.uint32), np.arange(batch), np.full(batch, context)]
    rows += [np.arange(batch), np.zeros(batch, np.int64)]  # no shared prefix
    args = [Buffer.from_numpy(a) for a in (*new, *cache)]
    args += [Buffer.from_numpy(np.ascontiguousarray(a)) for a in rows]
    attend(*args)
    return 1e3 * c.n_layer * median_time(lambda: attend(*args).to_numpy(), 9)


def mixed(model_dir: Path, hf, config: BenchConfig, scratch: Path, print_fn) -> Workload:
    lines = workloads.mixed_job(config.mixed_lines, config.seed)
    job = workloads.write_job(scratch / "mixed.jsonl", lines)
    print_fn(
        f"mixed: {len(lines)} prompts of 8-200 words, max_tokens 8-256, greedy, end to end "
        "(batchgen: the whole `batchgen run` process)"
    )
    print_fn(f"{'runner':<34} {'seconds':>8} {'tok/s':>8} {'peak RSS':>9}")
    runs = {
        "batchgen run (defaults)": run_job_process(job, model_dir, scratch, config.device),
        "batchgen run --schedule static": run_job_process(
            job, model_dir, scratch, config.device, ["--schedule", "static"]
        ),
    }
    for label, job_run in runs.items():
        print_fn(
            f"{label:<34} {job_run.wall_s:>8.1f} {job_run.tokens_per_s:>8.1f} "
            f"{job_run.peak_rss_mb:>6.0f} MiB"
        )
    tokens, hf_s = timed_hf_loop(hf, model_dir, lines)
    ours = runs["batchgen run (defaults)"]
    print_fn(f"{'HF careful loop (sorted, batch 32)':<34} {hf_s:>8.1f} {tokens / hf_s:>8.1f}")
    static = runs["batchgen run --schedule static"]
    print_fn(
        f"batchgen defaults: {hf_s / ours.wall_s:.2f}x the HF loop, "
        f"{static.wall_s / ours.wall_s:.2f}x --schedule static"
    )
    bars = [
        Bar("batchgen run", ours.tokens_per_s),
        Bar("--schedule static", static.tokens_per_s),
        Bar("HF careful loop", tokens / hf_s, baseline=True),
    ]
    return Workload(f"mixed: {len(lines)} prompts, end to end", "generated tok/s", bars)


def timed_hf_loop(hf, model_dir: Path, lines: list[dict]) -> tuple[int, float]:
    """The careful HF loop over a job: the tokens it kept, and its seconds."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    tokens = hf_careful_loop(hf, tokenizer, lines)
    return tokens, time.perf_counter() - start


def long_prompts(model_dir: Path, config: BenchConfig, scratch: Path, print_fn) -> Workload:
    lines = workloads.long_job(config.long_lines)
    job = workloads.write_job(scratch / "long.jsonl", lines)
    job_run = run_job_process(job, model_dir, scratch, config.device)
    print_fn(
        f"long: {len(lines)} prompts of ~500 tokens, 64 new each: batchgen run (defaults) "
        f"{job_run.wall_s:.1f} s end to end, {job_run.tokens_per_s:.1f} tok/s, peak RSS "
        f"{job_run.peak_rss_mb:.0f} MiB"
    )
    bars = [Bar("batchgen run", job_run.tokens_per_s)]  # nothing else runs it: no baseline
    return Workload(f"long: {len(lines)} prompts of ~500 tokens", "generated tok/s", bars)


def scoring(engine: Engine, hf, config: BenchConfig, print_fn: Callable[[str], None]) -> Workload:
    """Scored prompt tokens/s: echo + max_tokens 0 (prefill only, logits where asked)."""
    prompts = workloads.uniform_prompts(config.scoring_prompts, config.scoring_tokens, config.seed)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    requests = [Request(p, params) for p in prompts]
    schedule = _all_at_once(prompts)
    engine.generate(requests, schedule=schedule)  # warm-up
    scored = sum(len(p) - 1 for p in prompts)
    ours = median_time(lambda: engine.generate(requests, schedule=schedule), config.repeats)
    workloads.hf_score(hf, prompts)
    theirs = median_time(lambda: workloads.hf_score(hf, prompts), config.repeats)
    print_fn(
        f"scoring: {len(prompts)} prompts of ~{config.scoring_tokens} tokens (echo, max_tokens "
        f"0), median of {config.repeats}: batchgen {scored / ours:.0f} scored tok/s, HF forward "
        f"pass {scored / theirs:.0f} tok/s ({theirs / ours:.2f}x)"
    )
    bars = [Bar("batchgen (echo)", scored / ours), Bar("HF forward pass", scored / theirs, True)]
    title = f"scoring: {len(prompts)} x ~{config.scoring_tokens} tokens"
    return Workload(title, "scored tok/s", bars)


def choices(engine: Engine, config: BenchConfig, print_fn: Callable[[str], None]) -> Workload:
    """n choices from one prefill (the prompt's K/V forked) next to n separate requests."""
    n = config.choices
    prompts = workloads.uniform_prompts(config.choice_prompts, config.scoring_tokens, config.seed)
    sampled = SamplingParams(max_tokens=32, temperature=0.8, ignore_eos=True)
    together = [Request(p, replace(sampled, n=n, seed=i)) for i, p in enumerate(prompts)]
    apart = [Request(p, replace(sampled, seed=n * i + k)) for i, p in enumerate(prompts)
             for k in range(n)]  # fmt: skip
    schedule = SchedulerConfig(
        max_rows=n * len(prompts), step_tokens=n * sum(map(len, prompts)), prefix_cache=False
    )
    figures = {}
    for label, requests in (("n", together), ("apart", apart)):
        engine.generate(requests, schedule=schedule)  # warm-up
        run = functools.partial(engine.generate, requests, schedule=schedule)
        seconds = median_time(run, config.repeats)
        figures[label] = n * len(prompts) * sampled.max_tokens / seconds
    print_fn(
        f"choices: {len(prompts)} prompts of ~{config.scoring_tokens} tokens, {n} choices of 32 "
        f"sampled tokens each, median of {config.repeats}: n={n} {figures['n']:.0f} tok/s, "
        f"{n * len(prompts)} separate requests {figures['apart']:.0f} tok/s "
        f"({figures['n'] / figures['apart']:.2f}x)"
    )
    bars = [
        Bar(f"n={n}", figures["n"]),
        Bar(f"{n * len(prompts)} requests", figures["apart"], baseline=True),
    ]
    return Workload(f"choices: {len(prompts)} prompts, n={n}", "sampled tok/s", bars)


def shared_prefixes(
    model_dir: Path, hf, config: BenchConfig, scratch: Path, print_fn
) -> list[Workload]:
    """A shared preamble and a shared scored document, with the prefix cache on and off:
    tokens/s over each run's generation time (its summary's run_s: start-up and compile
    apart, as the HF loop's figure has none)."""
    lines = workloads.shared_prefix_job(config.prefix_lines, config.preamble_tokens)
    job = workloads.write_job(scratch / "prefix.jsonl", lines)
    print_fn(
        f"prefix: {len(lines)} prompts sharing a {config.preamble_tokens}-token preamble, "
        "tails of 20-60 tokens, 32 new tokens each, greedy"
    )
    print_fn(f"{'runner':<34} {'run s':>7} {'tok/s':>8} {'reused':>7} {'wall s':>7}")
    runs = {
        label: run_job_process(job, model_dir, scratch, config.device, ["--prefix-cache", flag])
        for label, flag in (("--prefix-cache off", "off"), ("--prefix-cache on", "on"))
    }
    for label, job_run in runs.items():
        summary = job_run.summary
        print_fn(
            f"{'batchgen run ' + label:<34} {summary['run_s']:>7.1f} "
            f"{summary['generated_tokens_per_s']:>8.1f} {summary['prefix_hit_rate']:>6.0%} "
            f"{job_run.wall_s:>7.1f}"
        )
    tokens, hf_s = timed_hf_loop(hf, model_dir, lines)
    print_fn(f"{'HF careful loop (sorted, batch 32)':<34} {hf_s:>7.1f} {tokens / hf_s:>8.1f}")
    on, off = (runs[f"--prefix-cache {flag}"].summary for flag in ("on", "off"))
    print_fn(
        f"prefix cache on: {off['run_s'] / on['run_s']:.2f}x off, "
        f"{hf_s / on['run_s']:.2f}x the HF loop"
    )
    preamble = Workload(
        f"prefix: {len(lines)} prompts sharing {config.preamble_tokens} tokens",
        "generated tok/s (run_s)",
        [
            Bar("prefix cache on", on["generated_tokens_per_s"]),
            Bar("prefix cache off", off["generated_tokens_per_s"]),
            Bar("HF careful loop", tokens / hf_s, baseline=True),
        ],
    )
    lines = workloads.shared_document_job(config.continuations, config.preamble_tokens)
    job = workloads.write_job(scratch / "document.jsonl", lines)
    scored = sum(len(line["prompt"]) - 1 for line in lines)
    figures = {}
    for flag in ("off", "on"):
        summary = run_job_process(job, model_dir, scratch, config.device,
                                  ["--prefix-cache", flag]).summary  # fmt: skip
        figures[flag] = scored / summary["run_s"]
    print_fn(
        f"prefix scoring: one {config.preamble_tokens}-token document, {len(lines)} "
        f"continuations of 5-20 tokens (echo, max_tokens 0): {figures['on']:.0f} scored tok/s "
        f"on, {figures['off']:.0f} off ({figures['on'] / figures['off']:.2f}x)"
    )
    document = Workload(
        f"prefix scoring: 1 document, {len(lines)} continuations",
        "scored tok/s (run_s)",
        [Bar("prefix cache on", figures["on"]), Bar("prefix cache off", figures["off"], True)],
    )
    return [preamble, document]


def _slot_bytes(model_dir: Path) -> int:
    """One full-context slot of float32 keys and values, from the checkpoint's config."""
    from transformers import GPT2Config as HFConfig

    from batchgen.engine.kv_cache import bytes_per_token
    from batchgen.engine.weights import config_from_hf

    config = config_from_hf(HFConfig.from_pretrained(model_dir))
    return bytes_per_token(config, DType.float32) * config.n_positions
