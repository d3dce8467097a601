"""The batch job: input lines -> requests -> batches -> engine -> result lines, streamed."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from batchgen.batching import JobRequest, pack
from batchgen.engine import ContextLengthError, Engine, Request, Step
from batchgen.jobfile import (
    Defaults,
    Done,
    JobLine,
    JobWriter,
    JsonId,
    LineError,
    Result,
    error_record,
    parse_line,
    result_record,
)
from batchgen.metrics import BatchStats, RunStats
from batchgen.textstream import TextStream, decode, token_bytes


@dataclass(frozen=True)
class RunConfig:
    """How a job is packed and reported."""

    batch_size: int = 16
    window: int = 1024  # requests looked at together when grouping by length
    token_ids: bool = False  # also write each completion's token ids
    model_name: str = "gpt2"


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the batch in flight was abandoned."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """Turn the first SIGINT/SIGTERM into a flag checked between steps; a second one aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def run_job(
    lines: Iterable[tuple[int, bytes]],
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    defaults: Defaults,
    config: RunConfig,
    writer: JobWriter,
    metrics: JobWriter | None = None,
    done: Done | None = None,
    progress: tqdm | None = None,
) -> dict[str, Any]:
    """Run every line not already `done`, one output line per input line; return the summary.

    A first SIGINT/SIGTERM abandons the batch in flight and ends the run early: the summary's
    "interrupted" then names the signal. OUTPUT holds only whole lines either way.
    """
    stats = RunStats()
    vocab_bytes = token_bytes(tokenizer)
    requests = _requests(lines, engine, tokenizer, defaults, done or Done(), stats)
    start = time.perf_counter()
    setup_s = 0.0  # compiling the sampler mid-run is setup, not generation
    interrupted: str | None = None
    with SignalGuard() as signals:
        try:
            for work in pack(requests, config.batch_size, config.window):
                signals.check()
                if isinstance(work, LineError):
                    stats.failed += 1
                    writer.write([error_record(work)])
                    _advance(progress, 1, stats, start)
                    continue
                if any(not item.request.params.greedy for item in work):
                    compile_start = time.perf_counter()
                    engine.compile_sampler()  # a no-op once compiled
                    setup_s += time.perf_counter() - compile_start
                results, batch = _run_batch(
                    engine, work, len(stats.latencies_ms), vocab_bytes, signals.check
                )
                writer.write(
                    [result_record(r, config.model_name, config.token_ids) for r in results]
                )
                if metrics is not None:
                    metrics.write([{"type": "batch", **batch.record()}])
                stats.add_batch(batch)
                _advance(progress, len(results), stats, start)
        except Interrupted as error:
            interrupted = str(error)
    run_s = time.perf_counter() - start - setup_s
    summary = stats.summary(run_s, _setup(engine, config, interrupted))
    if metrics is not None:
        metrics.write([summary])
    return summary


def _requests(
    lines: Iterable[tuple[int, bytes]],
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    defaults: Defaults,
    done: Done,
    stats: RunStats,
) -> Iterator[JobRequest | LineError]:
    """Parse, deduplicate, skip what OUTPUT already has, tokenize and check each line."""
    seen: set[JsonId] = set()
    for number, raw in lines:
        item = parse_line(number, raw, defaults)
        first = item.id is None or item.id not in seen
        if item.id is not None:
            seen.add(item.id)
        if done.covers(number, item.id if first else None):
            stats.skipped += 1
            stats.failed_earlier += number in done.error_lines
            continue
        if isinstance(item, LineError):
            yield item
        elif not first:
            yield LineError(
                number, item.id, item.form, "id", f"duplicate id {item.id!r}: not run again"
            )
        else:
            yield _tokenize(item, engine, tokenizer)


def _tokenize(
    job: JobLine, engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> JobRequest | LineError:
    ids = tokenizer(job.prompt).input_ids if isinstance(job.prompt, str) else job.prompt
    request = Request(ids, job.params)
    try:
        engine.check(request)
    except ContextLengthError as error:
        fits = len(ids) < engine.config.n_positions
        return LineError(job.line, job.id, job.form, "max_tokens" if fits else "prompt", str(error))
    except ValueError as error:
        return LineError(job.line, job.id, job.form, "prompt", str(error))
    return JobRequest(job, request)


def _run_batch(
    engine: Engine,
    batch: list[JobRequest],
    index: int,
    vocab_bytes: list[bytes],
    check_signal: Callable[[], None],
) -> tuple[list[Result], BatchStats]:
    """Decode one batch, stopping rows at their stop strings."""
    streams = {
        row: TextStream(vocab_bytes, item.job.stop)
        for row, item in enumerate(batch)
        if item.job.stop
    }

    def on_step(step: Step) -> list[int]:
        check_signal()  # abandon the batch: nothing of it has been written yet
        for row, stream in streams.items():
            if step.active[row]:
                stream.push(int(step.tokens[row]))
        return [row for row, stream in streams.items() if stream.stopped and step.active[row]]

    out = engine.generate([item.request for item in batch], on_step)
    stats = BatchStats(
        index=index,
        size=len(batch),
        padded_length=out.padded_length,
        prompt_tokens=sum(c.prompt_tokens for c in out.completions),
        generated_tokens=sum(c.completion_tokens for c in out.completions),
        prefill_ms=1e3 * out.prefill_s,
        decode_ms=1e3 * out.decode_s,
    )
    record = stats.record()
    results = []
    for row, (item, completion) in enumerate(zip(batch, out.completions, strict=True)):
        stream = streams.get(row)
        if stream is None:
            text, reason = decode(vocab_bytes, completion.token_ids), completion.finish_reason
        elif stream.stopped:
            text, reason = stream.text, "stop"
        else:
            text, reason = stream.text + stream.finish(), completion.finish_reason
        results.append(
            Result(item.job, text, reason, completion.prompt_tokens, completion.token_ids, record)
        )
    return results, stats


def _advance(progress: tqdm | None, n: int, stats: RunStats, start: float) -> None:
    if progress is not None:
        elapsed = max(time.perf_counter() - start, 1e-9)
        progress.set_postfix_str(f"{stats.generated_tokens / elapsed:.0f} tok/s", refresh=False)
        progress.update(n)


def _setup(engine: Engine, config: RunConfig, interrupted: str | None) -> dict[str, Any]:
    """Where the run ran and what it cost before generating; kept apart from throughput."""
    return {
        "model": config.model_name,
        "device": engine.device.label,
        "dtype": str(engine.dtype).removeprefix("DType."),
        "load_s": round(engine.timings.get("load_s", 0.0), 3),
        "compile_s": round(engine.timings["compile_s"], 3),
        "sampler_compile_s": round(engine.timings.get("sampler_compile_s", 0.0), 3),
        "interrupted": interrupted,  # the signal's name, or None
    }
