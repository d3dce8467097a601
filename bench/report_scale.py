"""`batchgen report` on a million-line job: how long it takes, its memory, the page's size.

Writes a synthetic run of the shape a large job leaves (WINDOWS window lines and a summary;
RESULTS result lines, 1% of them error lines, each with its timing, usage and window), then
times `batchgen report` on it as a real process.

    python bench/report_scale.py [--windows 20000] [--results 1000000] [--dir /tmp/scale]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson


def write_run(where: Path, windows: int, results: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    metrics, output = where / "metrics.jsonl", where / "out.jsonl"
    per_window = results // windows
    with metrics.open("wb") as out:
        for index in range(windows):
            ms = float(rng.uniform(20, 80))
            record = {"type": "window", "index": index, "steps": int(rng.integers(1, 4)),
                      "mean_rows": float(rng.uniform(100, 256)),
                      "occupancy": float(rng.uniform(0.3, 0.9)), "prompt_tokens": 2000,
                      "generated_tokens": int(rng.integers(100, 300)), "reused_tokens": 0,
                      "waiting": float(rng.uniform(0, 256)), "requests": per_window,
                      "ms": round(ms, 2), "tokens_per_s": 0.0}  # fmt: skip
            out.write(orjson.dumps(record) + b"\n")
        latency = {"p50": 29.0, "p90": 50.0, "p99": 73.0}
        summary = {"type": "summary", "requests_ok": results, "requests_failed": 0,
                   "requests_skipped": 0, "requests_failed_earlier": 0, "windows": windows,
                   "steps": 2 * windows, "prompt_tokens": 2000 * windows, "reused_tokens": 0,
                   "prefix_hit_rate": 0.0, "generated_tokens": 200 * windows, "run_s": 1000.0,
                   "requests_per_s": 1000.0, "generated_tokens_per_s": 200.0,
                   "latency_ms": latency, "first_token_ms": latency, "mean_rows": 147.0,
                   "occupancy": 0.6, "waiting": 100.0, "peak_rss_mb": 945.0, "model": "gpt2",
                   "device": "cpu", "dtype": "float32", "kv_cache": "slots",
                   "schedule": "continuous", "max_rows": 256, "prefix_cache": True,
                   "load_s": 0.5, "compile_s": 40.0, "sampler_compile_s": 0.0, "shard": None,
                   "interrupted": None}  # fmt: skip
        out.write(orjson.dumps(summary) + b"\n")
    window = {"index": 0, "steps": 2, "mean_rows": 147.0, "occupancy": 0.6, "prompt_tokens": 2000,
              "generated_tokens": 200, "reused_tokens": 0, "waiting": 100.0, "requests": 140,
              "ms": 45.0, "tokens_per_s": 4444.4}  # fmt: skip
    with output.open("wb") as out:
        chunk = 10_000
        for start in range(0, results, chunk):
            queue = rng.exponential(20, chunk)
            prefill = rng.uniform(1, 10, chunk)
            decode = rng.exponential(5, chunk)
            prompt = rng.integers(8, 21, chunk)
            lines = []
            for i in range(chunk):
                number = start + i + 1
                if number % 100 == 0:
                    error = {"field": "max_tokens", "message": f"prompt ({number % 900 + 200} "
                             "tokens) + max_tokens (900) exceeds the model's context of 1024 "
                             "tokens"}  # fmt: skip
                    lines.append({"id": number, "line": number, "error": error})
                    continue
                q, p, d = float(queue[i]), float(prefill[i]), float(decode[i])
                timing = {"queue_ms": round(q, 2), "prefill_ms": round(p, 2),
                          "first_token_ms": round(q + p, 2), "decode_ms": round(d, 2),
                          "total_ms": round(q + p + d, 2), "tokens_per_s": 100.0,
                          "cached_tokens": 0}  # fmt: skip
                usage = {"prompt_tokens": int(prompt[i]), "completion_tokens": 1,
                         "total_tokens": int(prompt[i]) + 1}  # fmt: skip
                lines.append({"id": number, "text": " the", "finish_reason": "length",
                              "usage": usage, "timing": timing, "window": window})  # fmt: skip
            out.write(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return metrics, output


def time_report(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of `batchgen report ARGS`, as a real process."""
    start = time.perf_counter()
    argv = ["/usr/bin/time", "-v", sys.executable, "-m", "batchgen", "report", *args]
    done = subprocess.run([*argv, "--overwrite"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return wall, int(rss.group(1)) / 1024 if rss else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20_000)
    parser.add_argument("--results", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/batchgen-report-scale"))
    options = parser.parse_args()
    options.dir.mkdir(parents=True, exist_ok=True)
    metrics, output = write_run(options.dir, options.windows, options.results)
    print(
        f"metrics: {options.windows:,} windows, {metrics.stat().st_size / 2**20:.1f} MiB; "
        f"OUTPUT: {options.results:,} lines, {output.stat().st_size / 2**20:.0f} MiB"
    )
    page = options.dir / "report.html"
    for label, files in (("metrics only", [metrics]), ("metrics + OUTPUT", [metrics, output])):
        wall, rss = time_report([*map(str, files), "-o", str(page)])
        size = page.stat().st_size / 1024
        print(f"{label:<18} {wall:6.1f} s wall, peak RSS {rss:5.0f} MiB, page {size:5.0f} KiB")


if __name__ == "__main__":
    main()
