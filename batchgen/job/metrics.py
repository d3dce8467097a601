"""Per-batch timing, the run summary of a job, and the summary as text."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BatchStats:
    """Timing of one batch; it rides on each of the batch's result lines."""

    index: int
    size: int
    padded_length: int
    prompt_tokens: int
    generated_tokens: int
    prefill_ms: float
    decode_ms: float

    @property
    def latency_ms(self) -> float:
        return self.prefill_ms + self.decode_ms

    def record(self) -> dict[str, Any]:
        tokens_per_s = 1e3 * self.generated_tokens / self.latency_ms if self.latency_ms else 0.0
        record = asdict(self)
        record["prefill_ms"] = round(self.prefill_ms, 2)
        record["decode_ms"] = round(self.decode_ms, 2)
        record["tokens_per_s"] = round(tokens_per_s, 1)
        return record


@dataclass
class RunStats:
    """Counts and timings accumulated over a run."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already in OUTPUT (--resume)
    failed_earlier: int = 0  # skipped lines whose OUTPUT line is an error
    prompt_tokens: int = 0
    generated_tokens: int = 0
    padded_slots: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def add_batch(self, batch: BatchStats, failed: int = 0) -> None:
        """Count a decoded batch; `failed` of its results could not be written as results."""
        self.ok += batch.size - failed
        self.failed += failed
        self.prompt_tokens += batch.prompt_tokens
        self.generated_tokens += batch.generated_tokens
        self.padded_slots += batch.size * batch.padded_length
        self.latencies_ms.append(batch.latency_ms)

    def summary(self, run_s: float, setup: dict[str, Any]) -> dict[str, Any]:
        """The final metrics line: throughput over generation wall time, setup kept apart."""
        latencies = np.array(self.latencies_ms or [0.0])
        p50, p90, p99 = (float(p) for p in np.percentile(latencies, [50, 90, 99]))
        efficiency = self.prompt_tokens / self.padded_slots if self.padded_slots else 1.0
        return {
            "type": "summary",
            "requests_ok": self.ok,
            "requests_failed": self.failed,
            "requests_skipped": self.skipped,
            "requests_failed_earlier": self.failed_earlier,
            "batches": len(self.latencies_ms),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "run_s": round(run_s, 3),
            "requests_per_s": round(self.ok / run_s, 2) if run_s else 0.0,
            "generated_tokens_per_s": round(self.generated_tokens / run_s, 1) if run_s else 0.0,
            "batch_latency_ms": {"p50": round(p50, 1), "p90": round(p90, 1), "p99": round(p99, 1)},
            "padding_efficiency": round(efficiency, 4),
            **setup,
        }


def summary_text(summary: dict[str, Any], output_name: str) -> str:
    """The run summary for a person (stderr)."""
    latency = summary["batch_latency_ms"]
    head = f"batchgen run: {summary['requests_ok']} ok, {summary['requests_failed']} failed"
    if summary["requests_skipped"]:
        head += (
            f", {summary['requests_skipped']} skipped as already in {output_name} "
            f"({summary['requests_failed_earlier']} of them errors)"
        )
    lines = [
        head,
        f"  {summary['model']} on {summary['device']} {summary['dtype']}: {_setup_text(summary)}",
        f"  {summary['generated_tokens']} tokens in {summary['batches']} batches, "
        f"{summary['run_s']:.2f} s: {summary['requests_per_s']} requests/s, "
        f"{summary['generated_tokens_per_s']} tokens/s",
        f"  batch latency p50 {latency['p50']} ms, p90 {latency['p90']} ms, "
        f"p99 {latency['p99']} ms; padding efficiency {100 * summary['padding_efficiency']:.1f}%",
    ]
    if summary["requests_failed"] or summary["requests_failed_earlier"]:
        lines.append(f"  failed lines have error lines in {output_name}: exit code 3")
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
