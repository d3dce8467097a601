"""batchgen against main's engine (a git worktree of an earlier commit), on this machine.

    .venv/bin/python bench/compare.py [--baseline REF] [--model DIR] [--repeats N]

Every figure comes from real processes that run one engine each, old and new alternating,
so that a busy moment of the machine falls on both; the gates are ratios of medians. Jobs
go through `batchgen run` with each side's default options, end to end; the uniform and
decode-step figures through each side's Python API (`Engine.generate`, which both have).
The HF baselines run in this process. Prints the gate table of issue 16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Run inside each side's process: only the API both engines share.
DRIVER = r"""
import itertools, json, random, statistics, sys, time
from batchgen.engine import Engine, EngineConfig, Request, SamplingParams
try:
    from batchgen.engine import SchedulerConfig
except ImportError:  # main's engine: one static batch per generate()
    SchedulerConfig = None
model, spec = sys.argv[1], json.loads(sys.argv[2])
config = EngineConfig(device="cpu")
if SchedulerConfig is not None:
    config = EngineConfig(device="cpu", scheduler=SchedulerConfig(max_rows=64, step_tokens=4096))
engine = Engine.from_pretrained(model, config)
def prompts(batch, mean, seed=0):
    rng = random.Random(seed + batch)
    spread = max(1, mean // 8)
    lengths = [rng.randint(mean - spread, mean + spread) for _ in range(batch)]
    return [[rng.randrange(50000) for _ in range(n)] for n in lengths]
def requests(batch, mean, new):
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    return [Request(p, params) for p in prompts(batch, mean)]
results = {}
for batch in spec["uniform"]:
    work = requests(batch, 32, 64)
    engine.generate(requests(batch, 32, 4))
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        engine.generate(work)
        times.append(time.perf_counter() - start)
    results[f"uniform {batch}"] = batch * 64 / statistics.median(times)
for context in spec["step"]:
    work = requests(8, context, 17)
    stamps = []
    for _ in range(2):
        stamps.clear()
        engine.generate(work, lambda _: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    results[f"step {context}"] = 1e3 * statistics.median(steps)
print(json.dumps(results))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="0cfc175", help="main's commit before the change")
    parser.add_argument("--model", type=Path, help="default: a seeded random 124M checkpoint")
    parser.add_argument("--repeats", type=int, default=2, help="alternations old/new")
    parser.add_argument("--mixed-lines", type=int, default=128)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF baselines")
    args = parser.parse_args()

    from batchgen.bench import workloads
    from batchgen.random_checkpoint import write_random_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model = args.model or write_random_checkpoint(folder / "gpt2-124m", "124M")
        baseline = folder / "baseline"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
            check=True,
            capture_output=True,
        )
        try:
            sides = {"main": str(baseline), "batchgen": str(REPO)}
            figures = measure(sides, model, folder, args, workloads)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)],
                check=False,
            )
        if not args.no_hf:
            figures["hf"] = hf_figures(model, args, workloads)
        report(figures, args.baseline)


def measure(sides, model, folder, args, workloads) -> dict[str, dict[str, list[float]]]:
    jobs = {
        "mixed": workloads.write_job(folder / "mixed.jsonl", workloads.mixed_job(args.mixed_lines)),
        "long": workloads.write_job(folder / "long.jsonl", workloads.long_job()),
    }
    spec = {"uniform": [1, 8, 32], "step": [32, 512], "repeats": 3}
    figures: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    for round_ in range(args.repeats):
        for side, path in sides.items():
            for name, job in jobs.items():
                run = workloads.run_job_process(job, model, folder, pythonpath=path)
                _add(figures[side], f"{name} s", run.wall_s)
                _add(figures[side], f"{name} peak MiB", run.peak_rss_mb)
                print(f"[{round_}] {side} {name}: {run.wall_s:.1f} s", flush=True)
            done = subprocess.run(
                [sys.executable, "-c", DRIVER, str(model), json.dumps(spec)],
                env={**os.environ, "PYTHONPATH": path},
                cwd=folder,  # `python -c` puts the working directory first on sys.path
                capture_output=True,
                text=True,
                check=True,
            )
            for key, value in json.loads(done.stdout.splitlines()[-1]).items():
                _add(figures[side], key, value)
            print(f"[{round_}] {side} uniform and step: {done.stdout.strip()}", flush=True)
    return figures


def hf_figures(model, args, workloads) -> dict[str, list[float]]:
    from transformers import AutoTokenizer

    hf = workloads.hf_model(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    figures: dict[str, list[float]] = {}
    prompts = workloads.uniform_prompts(32, 32)
    workloads.hf_generate(hf, prompts, 4)
    for _ in range(3):
        start = time.perf_counter()
        workloads.hf_generate(hf, prompts, 64)
        _add(figures, "uniform 32", 32 * 64 / (time.perf_counter() - start))
    start = time.perf_counter()
    workloads.hf_careful_loop(hf, tokenizer, workloads.mixed_job(args.mixed_lines))
    _add(figures, "mixed s", time.perf_counter() - start)
    print(f"hf: {figures}", flush=True)
    return figures


def _add(figures: dict[str, list[float]], key: str, value: float) -> None:
    figures.setdefault(key, []).append(value)


def report(figures, baseline: str) -> None:
    def med(side: str, key: str) -> float:
        return statistics.median(figures[side][key])

    def ratio_row(label: str, key: str, faster_is_lower: bool, target: float) -> None:
        old, new = med("main", key), med("batchgen", key)
        ratio = old / new if faster_is_lower else new / old
        verdict = "met" if ratio >= target else "MISSED"
        print(f"| {label} | {old:.1f} | {new:.1f} | {ratio:.2f}x | >= {target}x: {verdict} |")

    print(f"\n| gate (main = {baseline}) | main | batchgen | ratio | target |")
    print("|---|---|---|---|---|")
    ratio_row("mixed job, defaults, end to end (s)", "mixed s", True, 2.0)
    if "hf" in figures:
        hf_s, new = statistics.median(figures["hf"]["mixed s"]), med("batchgen", "mixed s")
        verdict = "met" if hf_s / new >= 3.5 else "MISSED"
        print(f"| mixed job vs HF careful loop (s) | HF {hf_s:.1f} | {new:.1f} | "
              f"{hf_s / new:.2f}x | >= 3.5x: {verdict} |")  # fmt: skip
    ratio_row("long prompts, 32 x ~500, 64 new (s)", "long s", True, 1.1)
    for batch in (1, 8, 32):
        ratio_row(f"uniform B={batch} (tok/s)", f"uniform {batch}", False, 1.0)
    if "hf" in figures:
        hf_tps, new = statistics.median(figures["hf"]["uniform 32"]), med("batchgen", "uniform 32")
        verdict = "met" if new / hf_tps >= 2.0 else "MISSED"
        print(f"| uniform B=32 vs HF generate (tok/s) | HF {hf_tps:.1f} | {new:.1f} | "
              f"{new / hf_tps:.2f}x | >= 2x: {verdict} |")  # fmt: skip
    for side in ("main", "batchgen"):
        step = med(side, "step 512") / med(side, "step 32")
        print(f"| decode step 512 vs 32, batch 8 ({side}) | {med(side, 'step 32'):.1f} ms | "
              f"{med(side, 'step 512'):.1f} ms | {step:.2f}x | <= 1.3x: "
              f"{'met' if step <= 1.3 else 'MISSED'} |")  # fmt: skip
    for name in ("mixed", "long"):
        print(f"| peak RSS, {name} job (MiB) | {med('main', f'{name} peak MiB'):.0f} | "
              f"{med('batchgen', f'{name} peak MiB'):.0f} | | |")  # fmt: skip
    print("\nraw:", json.dumps(figures))


if __name__ == "__main__":
    main()
