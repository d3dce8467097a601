"""The batch job: input lines -> requests -> batches -> engine -> result lines, streamed."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from batchgen.engine import ContextLengthError, Engine, Request
from batchgen.job.batching import JobRequest, pack
from batchgen.job.inputs import Defaults, JobLine, JsonId, LineError, parse_line
from batchgen.job.ledger import Claim, Done
from batchgen.job.metrics import BatchStats, RunStats
from batchgen.job.outputs import JobWriter, Result, error_line, result_line
from batchgen.job.signals import Interrupted, SignalGuard


@dataclass(frozen=True)
class RunConfig:
    """How a job is packed and reported."""

    batch_size: int = 16
    window: int = 1024  # requests looked at together when grouping by length
    token_ids: bool = False  # also write each completion's token ids
    model_name: str = "gpt2"


def run_job(
    lines: Iterable[tuple[int, bytes]],
    engine: Engine,
    defaults: Defaults,
    config: RunConfig,
    output: Claim,
    metrics: Claim | None = None,
    progress: tqdm | None = None,
) -> dict[str, Any]:
    """Run every line `output` does not already hold, one output line per input line.

    Returns the run summary. A first SIGINT/SIGTERM abandons the batch in flight and ends the
    run early ("interrupted" names the signal); OUTPUT holds only whole lines either way. An
    engine failure propagates, also leaving only whole lines.
    """
    stats = RunStats()
    requests = _requests(lines, engine, defaults, output.done, stats)
    setup_s = 0.0  # compiling the sampler mid-run is setup, not generation
    interrupted: str | None = None
    with SignalGuard() as signals:
        with signals.shielded():  # the caller closes the claims
            writer = JobWriter(output.open())
            metrics_writer = JobWriter(metrics.open()) if metrics else None
        start = time.perf_counter()
        try:
            for work in pack(requests, config.batch_size, config.window):
                signals.check()
                if isinstance(work, LineError):
                    stats.failed += 1
                    with signals.shielded():
                        writer.write([error_line(work)])
                    _advance(progress, 1, stats, start)
                    continue
                if any(not item.request.params.greedy for item in work):
                    compile_start = time.perf_counter()
                    engine.compile_sampler()  # a no-op once compiled
                    setup_s += time.perf_counter() - compile_start
                results, batch = _run_batch(engine, work, len(stats.latencies_ms), signals)
                written = [result_line(r, config.model_name, config.token_ids) for r in results]
                with signals.shielded():
                    writer.write([line for line, _ in written])
                    if metrics_writer:
                        metrics_writer.write_record({"type": "batch", **batch.record()})
                stats.add_batch(batch, failed=sum(not ok for _, ok in written))
                _advance(progress, len(results), stats, start)
            signals.check()
        except Interrupted as error:
            interrupted = str(error)
        run_s = time.perf_counter() - start - setup_s
        summary = stats.summary(run_s, _setup(engine, config, interrupted))
        if metrics_writer:
            with signals.shielded():
                metrics_writer.write_record(summary)
    return summary


def _requests(
    lines: Iterable[tuple[int, bytes]],
    engine: Engine,
    defaults: Defaults,
    done: Done,
    stats: RunStats,
) -> Iterator[JobRequest | LineError]:
    """Parse, deduplicate, skip what OUTPUT already has, tokenize and check each line."""
    seen: set[JsonId] = set()
    # No token is longer than the vocabulary's longest, so a prompt of more characters than
    # this cannot fit; it is refused untokenized (a multi-MB prompt takes seconds to tokenize).
    max_chars = engine.config.n_positions * max(map(len, engine.vocab_bytes))
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
            yield _tokenize(item, engine, max_chars)


def _tokenize(job: JobLine, engine: Engine, max_chars: int) -> JobRequest | LineError:
    """The line's request, or its error line when the prompt cannot run on this model."""
    context = engine.config.n_positions
    if isinstance(job.prompt, str):
        if len(job.prompt) > max_chars:
            message = f"prompt ({len(job.prompt)} characters) exceeds the model's context"
            return LineError(job.line, job.id, job.form, "prompt", f"{message} of {context} tokens")
        try:
            ids = engine.tokenizer(job.prompt, verbose=False).input_ids
        except Exception as error:  # noqa: BLE001 - a prompt the tokenizer rejects is one line's
            return LineError(job.line, job.id, job.form, "prompt", f"cannot be tokenized: {error}")
    else:
        ids = job.prompt
    request = Request(ids, job.params)
    try:
        engine.check(request)
    except ContextLengthError as error:
        field = "max_tokens" if len(ids) < context else "prompt"
        return LineError(job.line, job.id, job.form, field, str(error))
    except ValueError as error:
        return LineError(job.line, job.id, job.form, "prompt", str(error))
    return JobRequest(job, request)


def _run_batch(
    engine: Engine, batch: list[JobRequest], index: int, signals: SignalGuard
) -> tuple[list[Result], BatchStats]:
    """Decode one batch; a signal abandons it between steps (none of it is written yet)."""
    out = engine.generate([item.request for item in batch], lambda _step: signals.check())
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
    results = [
        Result(item.job, c.text, c.finish_reason, c.prompt_tokens, c.token_ids, record)
        for item, c in zip(batch, out.completions, strict=True)
    ]
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
