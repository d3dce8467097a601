"""One job through `batchgen run` locally and on Ray (this machine), and the writer's cost.

Both runs are real `batchgen run` processes, timed end to end (start-up and compiles
included), so the figures show what Ray adds on one machine before it can add machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import orjson

from batchgen.engine import SchedulerConfig, Timing, WindowStats
from batchgen.job import ledger
from batchgen.job.inputs import Defaults
from batchgen.job.metrics import RunStats, window_record
from batchgen.job.runner import JobSink, LineBatch, LineFilter
from batchgen.job.shards import Shard
from batchgen.job.signals import SignalGuard

PROMPT = "The history of natural language processing began in the 1950s, when"


@dataclass(frozen=True)
class ScaleBenchConfig:
    lines: int = 128
    max_tokens: int = 32
    batch_size: int = SchedulerConfig.max_rows  # the engine's default
    actors: int = 2
    writer_lines: int = 100_000


def run(model: Path, config: ScaleBenchConfig, print_fn: Callable[[str], None] = print) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        job = folder / "in.jsonl"
        lines = [
            {"id": i, "prompt": f"{PROMPT} {i}", "ignore_eos": True} for i in range(config.lines)
        ]
        job.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        print_fn(
            f"{config.lines} lines, {config.max_tokens} new tokens each (greedy, ignore_eos), "
            f"batch {config.batch_size}, model {model}"
        )
        print_fn(f"{'backend':<22} {'wall s':>7} {'tok/s (wall)':>13} {'tok/s (run_s)':>14}")
        ray_args = ["--backend", "ray", "--actors", str(config.actors)]
        for label, extra in (("local", []), (f"ray, {config.actors} actors", ray_args)):
            wall, summary = _timed_run(model, job, folder / f"out-{len(extra)}", config, extra)
            tokens = summary["generated_tokens"]
            print_fn(
                f"{label:<22} {wall:>7.1f} {tokens / wall:>13.1f} "
                f"{summary['generated_tokens_per_s']:>14.1f}"
            )
        n = config.writer_lines
        us = _filter_us_per_line(n)
        print_fn(f"reading, shard 0/4: {us:.2f} us per input line (parse + id hash; {n:,} lines)")
        for label, ray in (("local", False), ("ray driver", True)):
            us = _writer_us_per_line(folder / f"writer-{label}.jsonl", n, ray)
            print_fn(f"writer, {label}: {us:.2f} us per result line ({n:,} lines, batches of 16)")


def _timed_run(
    model: Path, job: Path, out: Path, config: ScaleBenchConfig, extra: list[str]
) -> tuple[float, dict]:
    metrics = out.with_suffix(".metrics")
    argv = [
        sys.executable, "-m", "batchgen", "run", str(job), str(out), "--model", str(model),
        "--device", "cpu", "--max-tokens", str(config.max_tokens), "--batch-size",
        str(config.batch_size), "--metrics", str(metrics), "--quiet", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    # An explicit env: importing MAX setenv()s PYTHONEXECUTABLE behind os.environ's back.
    done = subprocess.run(argv, env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"batchgen run {' '.join(extra)} failed:\n{done.stderr}")
    return wall, orjson.loads(metrics.read_bytes().splitlines()[-1])


def _filter_us_per_line(n: int) -> float:
    """What a shard spends on every input line, its own or not: parsing it to hash its id."""
    raws = [orjson.dumps({"id": f"req-{i}", "prompt": f"{PROMPT} {i}"}) for i in range(n)]
    admit = LineFilter(Defaults(), ledger.Done(), RunStats(), Shard(0, 4)).admit
    start = time.perf_counter()
    for number, raw in enumerate(raws, start=1):
        admit(number, raw)
    return 1e6 * (time.perf_counter() - start) / n


def _writer_us_per_line(path: Path, n: int, ray: bool) -> float:
    """What the writer spends per result line it is handed: the local run's JobSink, or the
    Ray driver's (which also groups a block's rows by engine window and reads their timing)."""
    from batchgen.scale.ray_data import block_batches

    text = " and then the model wrote a sentence of quite ordinary length."
    record = {"id": 12345, "text": text, "finish_reason": "length", "usage": {}, "timing": {}}
    line = orjson.dumps(record) + b"\n"
    stats = WindowStats(0, 4, 16.0, 0.5, 256, 64, 0.4)
    timing = Timing(1.0, 30.0, 300.0, 32)
    window = orjson.dumps({"worker": "host:1", **window_record(stats, 16)})
    rows = {"window": [window] * 16, "timing": [orjson.dumps(asdict(timing))] * 16}
    block = {"output": [line] * 16, "ok": [True] * 16, "line": list(range(16)), **rows}
    claim = ledger.claim(path, resume=False, overwrite=False)
    try:
        with SignalGuard() as signals:
            sink = JobSink((claim, None, None), RunStats(), signals, None)
            start = time.perf_counter()
            for _ in range(n // 16):
                if ray:
                    for batch in block_batches(block):
                        sink.write(batch)
                else:
                    batch = LineBatch(block["output"], block["line"], block["ok"], stats)
                    sink.write(replace(batch, timings=[timing] * 16))
            elapsed = time.perf_counter() - start
    finally:
        claim.close()
    return 1e6 * elapsed / (16 * (n // 16))
