"""`batchgen run` end to end: the CLI on a small random checkpoint, transformers as the oracle."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from click.testing import CliRunner, Result
from conftest import ON_CPU, PROMPTS, hf_greedy
from test_inputs import MALFORMED

from batchgen.cli import cli
from batchgen.engine import Request, SamplingParams


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def run_cli(*args: Any, input: bytes | None = None) -> Result:
    return CliRunner().invoke(cli, ["run", *map(str, args), *ON_CPU], input=input)


def openai_line(custom_id: str, prompt: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "gpt2", "prompt": prompt, **body},
    }


def results_by_id(path: Path) -> dict[Any, dict[str, Any]]:
    """Each result line in one shape, whichever form it was written in."""
    results = {}
    for record in read_jsonl(path):
        if "custom_id" in record:
            if record["response"]["status_code"] != 200:
                continue
            body = record["response"]["body"]
            results[record["custom_id"]] = {
                "text": body["choices"][0]["text"],
                "finish_reason": body["choices"][0]["finish_reason"],
                "token_ids": record["batchgen"].get("token_ids"),
                "timing": record["batchgen"]["timing"],
                "window": record["batchgen"]["window"],
                "usage": body["usage"],
            }
        elif "error" not in record:
            results[record["id"]] = record
    return results


def test_greedy_results_equal_hf_generate_whatever_the_batch_size(
    tmp_path: Path, tiny_dir: Path, hf_tiny, tokenizer
):
    records = [{"id": f"n{i}", "prompt": p, "max_tokens": 6 + i} for i, p in enumerate(PROMPTS)]
    records += [openai_line(f"o{i}", p, max_tokens=9) for i, p in enumerate(PROMPTS)]
    job = write_jsonl(tmp_path / "in.jsonl", records)
    for batch_size in (1, 4, 12):
        out = tmp_path / f"out-{batch_size}.jsonl"
        result = run_cli(job, out, "--model", tiny_dir, "--batch-size", batch_size, "--token-ids")
        assert result.exit_code == 0, result.output
        got = results_by_id(out)
        assert len(read_jsonl(out)) == len(records) == len(got)
        for i, prompt in enumerate(PROMPTS):
            ids = tokenizer(prompt).input_ids
            for key, n in ((f"n{i}", 6 + i), (f"o{i}", 9)):
                expected = hf_greedy(hf_tiny, ids, n)
                assert got[key]["token_ids"] == expected, (batch_size, key)
                assert got[key]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
                assert got[key]["usage"]["prompt_tokens"] == len(ids)
                assert got[key]["usage"]["completion_tokens"] == len(expected)
        rows = [r["window"]["mean_rows"] for r in got.values()]
        assert max(rows) <= batch_size and (max(rows) > 2 or batch_size == 1)


def test_mixed_per_line_params_share_one_batch(
    tmp_path: Path, tiny_dir: Path, hf_tiny, tokenizer, engine
):
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    greedy = hf_greedy(hf_tiny, ids[0], 12)
    greedy_text = tokenizer.decode(greedy, skip_special_tokens=True)
    stop = tokenizer.decode(greedy[4:6])  # text the greedy continuation is known to contain
    records = [
        {"id": "greedy", "prompt": PROMPTS[0], "max_tokens": 12},
        {"id": "short", "prompt": PROMPTS[1], "max_tokens": 3},
        {"id": "top_k_1", "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 1.0, "top_k": 1},
        {"id": "sampled", "prompt": PROMPTS[3], "max_tokens": 10, "temperature": 0.9,
         "top_p": 0.9, "seed": 11},
        {"id": "stopped", "prompt": PROMPTS[0], "max_tokens": 12, "stop": [stop]},
    ]  # fmt: skip
    job = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    result = run_cli(job, out, "--model", tiny_dir, "--batch-size", 8, "--token-ids")
    assert result.exit_code == 0, result.output
    got = results_by_id(out)
    # All five ran side by side: the first window (3 steps, until "short" finished) had them.
    assert got["short"]["window"]["index"] == 0
    assert (got["short"]["window"]["steps"], got["short"]["window"]["mean_rows"]) == (3, 5)
    assert got["greedy"]["token_ids"] == greedy
    assert got["short"]["token_ids"] == hf_greedy(hf_tiny, ids[1], 3)
    assert got["short"]["finish_reason"] == "length"
    assert got["top_k_1"]["token_ids"] == hf_greedy(hf_tiny, ids[2], 6)
    alone = engine.generate(
        [Request(ids[3], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=11))]
    )
    assert got["sampled"]["token_ids"] == alone.completions[0].token_ids
    assert got["stopped"]["text"] == greedy_text[: greedy_text.index(stop)]
    assert got["stopped"]["finish_reason"] == "stop"
    assert got["stopped"]["token_ids"] == greedy[:6]  # decoding stopped with the stop string


def test_bad_lines_get_error_lines_and_good_lines_still_run(tmp_path: Path, tiny_dir: Path):
    lines = [b'{"id": "good-1", "prompt": "Hello"}']
    lines += [raw for raw, _ in MALFORMED]
    lines += [
        b"",  # blank lines are skipped, not errors
        b'{"id": "long", "prompt": "word", "max_tokens": 1024}',
        b'{"id": "huge", "prompt": [1, 2, 3], "max_tokens": 1022}',
        b'{"id": "oov", "prompt": [1, 99999]}',
        b'{"id": "good-1", "prompt": "again"}',
        b'{"custom_id": "good-2", "body": {"prompt": "Hi", "max_tokens": 4}}',
    ]
    fields = [f for _, f in MALFORMED] + ["max_tokens", "max_tokens", "prompt", "id"]
    job = tmp_path / "in.jsonl"
    job.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(job, out, "--model", tiny_dir, "--batch-size", 4)
    assert result.exit_code == 3, result.output
    records = read_jsonl(out)
    assert len(records) == len(lines) - 1  # one output line per non-blank input line
    errors = {}
    for record in records:
        if "custom_id" in record and record["response"]["status_code"] == 400:
            errors[record["batchgen"]["line"]] = record["response"]["body"]["error"]["param"]
        elif "error" in record and record["error"] is not None:
            errors[record["line"]] = record["error"]["field"]
    bad_numbers = [n for n in range(2, len(lines) + 1) if n != len(MALFORMED) + 2]
    assert errors == dict(zip(bad_numbers[:-1], fields, strict=True))
    assert set(results_by_id(out)) == {"good-1", "good-2"}
    assert f"2 ok, {len(fields)} failed" in result.stderr


def test_existing_output_is_never_clobbered(tmp_path: Path, tiny_dir: Path):
    job = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hello", "max_tokens": 2}])
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"precious\n")
    result = run_cli(job, out, "--model", tiny_dir)
    assert result.exit_code == 1
    assert "exists" in result.output and "--resume" in result.output
    assert out.read_bytes() == b"precious\n"
    result = run_cli(job, out, "--model", tiny_dir, "--resume", "--overwrite")
    assert result.exit_code == 2 and out.read_bytes() == b"precious\n"
    result = run_cli(job, job, "--model", tiny_dir, "--overwrite")
    assert result.exit_code == 2 and "INPUT" in result.output
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b"kept\n")
    result = run_cli(job, tmp_path / "new.jsonl", "--model", tiny_dir, "--metrics", metrics)
    assert result.exit_code == 1 and metrics.read_bytes() == b"kept\n"
    assert not (tmp_path / "new.jsonl").exists()
    result = run_cli(job, out, "--model", tiny_dir, "--overwrite")
    assert result.exit_code == 0
    assert [r["id"] for r in read_jsonl(out)] == [1]


def test_metrics_file_matches_the_output(tmp_path: Path, tiny_dir: Path):
    records = [{"id": i, "prompt": PROMPTS[i % 6], "max_tokens": 3 + i % 5} for i in range(10)]
    records.append({"id": "bad", "prompt": ""})
    job = write_jsonl(tmp_path / "in.jsonl", records)
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.jsonl"
    result = run_cli(job, out, "--model", tiny_dir, "--batch-size", 4, "--metrics", metrics)
    assert result.exit_code == 3, result.output
    *windows, summary = read_jsonl(metrics)
    results = results_by_id(out)
    assert {w["type"] for w in windows} == {"window"} and summary["type"] == "summary"
    assert [w["index"] for w in windows] == list(range(len(windows)))
    assert sum(w["requests"] for w in windows) == 10
    for result_line in results.values():
        window = windows[result_line["window"]["index"]]
        assert result_line["window"] == {k: v for k, v in window.items() if k != "type"}
    assert summary["requests_ok"] == 10 and summary["requests_failed"] == 1
    assert (
        summary["generated_tokens"]
        == sum(r["usage"]["completion_tokens"] for r in results.values())
        == sum(w["generated_tokens"] for w in windows)
    )
    assert (
        summary["prompt_tokens"]
        == sum(r["usage"]["prompt_tokens"] for r in results.values())
        == sum(w["prompt_tokens"] for w in windows)
    )
    steps = sum(w["steps"] for w in windows)
    assert summary["steps"] == steps and summary["windows"] == len(windows)
    rows = sum(w["mean_rows"] * w["steps"] for w in windows) / steps
    assert summary["mean_rows"] == pytest.approx(rows, abs=0.01)
    assert 1 < summary["mean_rows"] <= 4 and 0 < summary["occupancy"] <= 1
    for name, field in (("latency_ms", "total_ms"), ("first_token_ms", "first_token_ms")):
        times = [r["timing"][field] for r in results.values()]
        expected = np.percentile(times, [50, 90, 99])
        assert [summary[name][p] for p in ("p50", "p90", "p99")] == pytest.approx(expected, abs=0.1)
    for r in results.values():
        timing = r["timing"]
        assert timing["first_token_ms"] == pytest.approx(
            timing["queue_ms"] + timing["prefill_ms"], abs=0.02
        )
        assert timing["total_ms"] == pytest.approx(
            timing["first_token_ms"] + timing["decode_ms"], abs=0.02
        )
    assert summary["compile_s"] > 0 and summary["interrupted"] is None
    assert summary["generated_tokens_per_s"] > 0 and summary["requests_per_s"] > 0


def child_env() -> dict[str, str]:
    # Importing MAX setenv()s PYTHONEXECUTABLE and PYTHONPATH behind os.environ's back, which
    # sends children to the base interpreter; an explicit env gives them this one.
    return dict(os.environ)


# A child that takes Ctrl-C even where this test runs with SIGINT ignored (a background job
# of a non-interactive shell): it restores Python's own handler, then runs `batchgen`.
LAUNCH = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'batchgen'; runpy.run_module('batchgen', run_name='__main__')"
)


def batchgen(*args: Any, command: str = "run") -> subprocess.Popen:
    argv = [sys.executable, "-c", LAUNCH, command, *map(str, args), *ON_CPU]
    return subprocess.Popen(argv, stderr=subprocess.PIPE, env=child_env())


def wait_for_lines(process: subprocess.Popen, path: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.01)
    stderr = process.stderr.read().decode() if process.poll() is not None else ""
    raise AssertionError(f"{path} never reached {n} lines (exit {process.poll()}): {stderr}")


def test_killed_runs_resume_to_every_id_exactly_once(tmp_path: Path, tiny_dir: Path):
    records = [
        {"id": f"q{i}", "prompt": PROMPTS[i % 6] * (1 + i % 3), "max_tokens": 24}
        | ({"temperature": 0.8} if i % 10 == 0 else {})
        for i in range(64)
    ]
    records.insert(20, {"id": "broken", "prompt": 1})
    job = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    common = ("--model", tiny_dir, "--batch-size", 4, "--seed", 5)

    first = batchgen(job, out, *common)
    wait_for_lines(first, out, 12)
    first.send_signal(signal.SIGINT)  # Ctrl-C: the batch in flight is abandoned
    assert first.wait(60) == 130
    assert b"interrupted by SIGINT" in first.stderr.read()
    done_first = read_jsonl(out)  # every line whole and valid
    assert 12 <= len(done_first) < len(records)

    second = batchgen(job, out, *common, "--resume")
    wait_for_lines(second, out, len(done_first) + 12)
    second.send_signal(signal.SIGKILL)
    assert second.wait(60) == -signal.SIGKILL  # killed mid-run, not finished
    with out.open("ab") as stream:  # what a kill in the middle of a write leaves behind
        stream.write(b'{"id": "q63", "text": "torn')

    third = batchgen(job, out, *common, "--resume")
    assert third.wait(120) == 3, third.stderr.read().decode()  # the broken line failed
    ids = [r.get("id") for r in read_jsonl(out)]
    assert sorted(ids, key=str) == sorted((r["id"] for r in records), key=str)

    clean = tmp_path / "clean.jsonl"
    assert run_cli(job, clean, *common).exit_code == 3
    resumed, reference = results_by_id(out), results_by_id(clean)
    assert {k: v["text"] for k, v in resumed.items()} == {
        k: v["text"] for k, v in reference.items()
    }


def test_stdin_to_stdout(tmp_path: Path, tiny_dir: Path):
    records = [{"id": i, "prompt": p, "max_tokens": 4} for i, p in enumerate(PROMPTS)]
    payload = b"".join(orjson.dumps(r) + b"\n" for r in records)
    for quiet in (False, True):
        flags = ("--quiet",) if quiet else ()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "batchgen",
                "run",
                "-",
                "-",
                "--model",
                tiny_dir,
                *ON_CPU,
                *flags,
            ],
            input=payload,
            capture_output=True,
            env=child_env(),
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        lines = [orjson.loads(line) for line in done.stdout.splitlines()]
        assert sorted(r["id"] for r in lines) == list(range(len(PROMPTS)))
        assert (b"batchgen run:" in done.stderr) is not quiet


def comparable_records(path: Path) -> dict[Any, Any]:
    """Every line by what it accounts for, without timing, windows or OpenAI's random ids."""
    out = {}
    for record in read_jsonl(path):
        if "custom_id" in record:
            body = dict(record["response"]["body"])
            del body["id"], body["created"]
            extra = {k: v for k, v in record["batchgen"].items() if k not in ("timing", "window")}
            out[record["custom_id"]] = (record["response"]["status_code"], body, extra)
        else:
            out[record["id"]] = {k: v for k, v in record.items() if k not in ("timing", "window")}
    return out


def test_both_caches_and_both_schedules_write_identical_records(tmp_path: Path, tiny_dir: Path):
    rng = random.Random(3)
    records: list[dict[str, Any]] = []
    for i in range(40):
        line: dict[str, Any] = {"id": i, "prompt": PROMPTS[i % 6], "max_tokens": rng.randint(1, 30)}
        if i % 3 == 1:
            line.update(temperature=1.2, seed=i, top_k=[0, 40][i % 2])
        if i % 3 == 2:
            line.update(temperature=0.8, top_p=0.9)  # seeded from --seed and the id
        if i % 7 == 0:
            line["stop"] = [" the"]
        records.append(line)
    records += [openai_line(f"o{i}", PROMPTS[i], max_tokens=5 + i, temperature=0.7, seed=i)
                for i in range(6)]  # fmt: skip
    records.append({"id": "long", "prompt": [464] * 900, "max_tokens": 20})
    job = write_jsonl(tmp_path / "in.jsonl", records)
    runs = {}
    for name, args in (
        ("slots", ()),
        ("paged", ("--kv-cache", "paged")),
        ("static", ("--schedule", "static", "--batch-size", 8)),
        ("small steps", ("--batch-size", 5, "--step-tokens", 37)),
    ):
        out = tmp_path / f"{name}.jsonl"
        result = run_cli(job, out, "--model", tiny_dir, "--seed", 9, "--token-ids", *args)
        assert result.exit_code == 0, result.output
        runs[name] = comparable_records(out)
    assert len(runs["slots"]) == len(records)
    for name, got in runs.items():
        assert got == runs["slots"], name
