"""Per-request timing, per-window engine figures, the run summary of a job, and its text."""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from batchgen.engine import Timing, WindowStats


def timing_record(timing: Timing) -> dict[str, Any]:
    """A result line's `timing`: where that request's time went."""
    return {
        "queue_ms": round(timing.queue_ms, 2),
        "prefill_ms": round(timing.prefill_ms, 2),
        "first_token_ms": round(timing.first_token_ms, 2),
        "decode_ms": round(timing.decode_ms, 2),
        "total_ms": round(timing.total_ms, 2),
        "tokens_per_s": round(timing.tokens_per_s, 1),
        "cached_tokens": timing.cached_tokens,
    }


def window_record(stats: WindowStats, requests: int) -> dict[str, Any]:
    """A result line's `window`, and the metrics file's window line: the engine's work from
    the previous window to the step in which `requests` requests finished."""
    ms = 1e3 * stats.seconds
    record = asdict(stats)
    del record["seconds"]
    record.update(
        requests=requests,
        mean_rows=round(stats.mean_rows, 2),
        occupancy=round(stats.occupancy, 4),
        waiting=round(stats.waiting, 2),
        ms=round(ms, 2),
        tokens_per_s=round(1e3 * stats.generated_tokens / ms, 1) if ms else 0.0,
    )
    return record


def window_from_record(record: dict[str, Any]) -> WindowStats:
    """The WindowStats a window record was written from (the Ray driver reads them back)."""
    values = {f.name: record[f.name] for f in fields(WindowStats) if f.name != "seconds"}
    return WindowStats(**values, seconds=record["ms"] / 1e3)


@dataclass
class RunStats:
    """Counts and timings accumulated over a run."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already in OUTPUT (--resume)
    failed_earlier: int = 0  # skipped lines whose OUTPUT line is an error
    windows: int = 0
    steps: int = 0
    prompt_tokens: int = 0  # prefilled (computed)
    reused_tokens: int = 0  # taken from the prefix cache or a fork instead
    generated_tokens: int = 0
    row_steps: float = 0.0  # active rows summed over steps
    occupancy_steps: float = 0.0  # cache occupancy summed over steps
    waiting_steps: float = 0.0  # requests waiting to be admitted, summed over steps
    # Per request, 8 bytes each: a million-line job holds 16 MB of them.
    total_ms: array = field(default_factory=lambda: array("d"))
    first_token_ms: array = field(default_factory=lambda: array("d"))

    def add_window(self, stats: WindowStats, timings: list[Timing], failed: int = 0) -> None:
        """Count a window's finished requests; `failed` of them could not be written."""
        self.ok += len(timings) - failed
        self.failed += failed
        self.windows += 1
        self.steps += stats.steps
        self.prompt_tokens += stats.prompt_tokens
        self.reused_tokens += stats.reused_tokens
        self.generated_tokens += stats.generated_tokens
        self.row_steps += stats.mean_rows * stats.steps
        self.occupancy_steps += stats.occupancy * stats.steps
        self.waiting_steps += stats.waiting * stats.steps
        self.total_ms.extend(t.total_ms for t in timings)
        self.first_token_ms.extend(t.first_token_ms for t in timings)

    def summary(self, run_s: float, setup: dict[str, Any]) -> dict[str, Any]:
        """The final metrics line: throughput over generation wall time, setup kept apart."""
        prompt = self.prompt_tokens + self.reused_tokens
        return {
            "type": "summary",
            "requests_ok": self.ok,
            "requests_failed": self.failed,
            "requests_skipped": self.skipped,
            "requests_failed_earlier": self.failed_earlier,
            "windows": self.windows,
            "steps": self.steps,
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "prefix_hit_rate": round(self.reused_tokens / prompt, 4) if prompt else 0.0,
            "generated_tokens": self.generated_tokens,
            "run_s": round(run_s, 3),
            "requests_per_s": round(self.ok / run_s, 2) if run_s else 0.0,
            "generated_tokens_per_s": round(self.generated_tokens / run_s, 1) if run_s else 0.0,
            "latency_ms": _percentiles(self.total_ms),
            "first_token_ms": _percentiles(self.first_token_ms),
            "mean_rows": round(self.row_steps / self.steps, 2) if self.steps else 0.0,
            "occupancy": round(self.occupancy_steps / self.steps, 4) if self.steps else 0.0,
            "waiting": round(self.waiting_steps / self.steps, 2) if self.steps else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            **setup,
        }


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux's VmHWM; None elsewhere). Not getrusage:
    a process started by a large one inherits its parent's peak there."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _percentiles(values: array) -> dict[str, float]:
    data = np.frombuffer(values, np.float64) if len(values) else np.zeros(1)
    p50, p90, p99 = (float(p) for p in np.percentile(data, [50, 90, 99]))
    return {"p50": round(p50, 1), "p90": round(p90, 1), "p99": round(p99, 1)}


def summary_text(summary: dict[str, Any], output_name: str, errors_name: str | None = None) -> str:
    """The run summary for a person (stderr); `errors_name`: the error file, if any."""
    held_in = f"{output_name} or {errors_name}" if errors_name else output_name
    errors_name = errors_name or output_name
    latency, first = summary["latency_ms"], summary["first_token_ms"]
    head = f"batchgen run: {summary['requests_ok']} ok, {summary['requests_failed']} failed"
    if summary["requests_skipped"]:
        head += (
            f", {summary['requests_skipped']} skipped as already in {held_in} "
            f"({summary['requests_failed_earlier']} of them errors)"
        )
    where = (
        f"  {summary['model']} on {summary['device']} {summary['dtype']}, "
        f"{summary['kv_cache']} KV cache: {_setup_text(summary)}"
        if summary["device"]
        else f"  {summary['model']} not loaded: no line could run"
    )
    lines = [
        head,
        where,
        f"  {summary['generated_tokens']} tokens in {summary['steps']} steps, "
        f"{summary['run_s']:.2f} s: {summary['requests_per_s']} requests/s, "
        f"{summary['generated_tokens_per_s']} tokens/s; {summary['mean_rows']} rows a step"
        + (f", peak RSS {summary['peak_rss_mb']:.0f} MiB" if summary["peak_rss_mb"] else ""),
        f"  latency p50 {latency['p50']} ms, p90 {latency['p90']} ms, p99 {latency['p99']} ms; "
        f"first token p50 {first['p50']} ms, p99 {first['p99']} ms"
        if summary["requests_ok"]
        else "  no requests ran: no latency figures",
    ]
    if summary.get("reused_tokens"):
        prompt = summary["reused_tokens"] + summary["prompt_tokens"]
        lines.append(
            f"  prefix cache: {summary['reused_tokens']} of {prompt} prompt tokens reused "
            f"({100 * summary['prefix_hit_rate']:.1f}%), {summary['prompt_tokens']} prefilled"
        )
    if summary["requests_failed"] or summary["requests_failed_earlier"]:
        lines.append(f"  failed lines have error lines in {errors_name}: exit code 3")
    if summary["interrupted"]:
        lines.append(f"  interrupted by {summary['interrupted']}: rerun with --resume to finish")
    return "\n".join(lines)


def _setup_text(summary: dict[str, Any]) -> str:
    if summary["compile_s"] is None:
        return "each actor loaded and compiled the model (inside the run time below)"
    return (
        f"load {summary['load_s']:.2f} s, compile {summary['compile_s']:.2f} s, "
        f"sampler compile {summary['sampler_compile_s']:.2f} s"
    )
