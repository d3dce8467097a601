"""`batchgen run` against a hostile user: each defect of the review, reproduced and guarded."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import ON_CPU, PROMPTS, hf_greedy
from test_runner import (
    LAUNCH,
    batchgen,
    child_env,
    openai_line,
    read_jsonl,
    results_by_id,
    run_cli,
    wait_for_lines,
    write_jsonl,
)

from batchgen.engine import Completion, Timing
from batchgen.job.inputs import JobLine
from batchgen.job.outputs import Result, result_line

BIG_JOB = [{"id": f"q{i}", "prompt": PROMPTS[i % 6], "max_tokens": 24} for i in range(64)]


def deep(levels: int) -> object:
    value: object = "bottom"
    for _ in range(levels):
        value = {"d": value}
    return value


def test_a_result_that_cannot_be_written_becomes_its_error_line():
    """Defect 1, at the last step: formatting a result is one line's failure, not the job's."""
    job = JobLine(3, "x", "native", "hi", params=None, metadata=deep(300))
    completion = Completion([1], "length", 1, "text", Timing(0.0, 1.0, 0.0, 1))
    line, ok = result_line(Result(job, [[completion]], {}), "gpt2", False, ())
    assert not ok
    assert orjson.loads(line) == {
        "id": "x",
        "line": 3,
        "error": {"field": None, "message": "result cannot be written: Recursion limit reached"},
    }


def test_a_line_that_parses_but_cannot_be_written_back_is_its_own_error(
    tmp_path: Path, tiny_dir: Path
):
    """Defect 1: deep metadata parses with orjson, then fails in orjson.dumps."""
    job = tmp_path / "in.jsonl"
    metadata = b'{"d":' * 300 + b"1" + b"}" * 300
    job.write_bytes(
        b'{"id": "deep", "prompt": "Hi", "metadata": ' + metadata + b"}\n"
        b'{"id": "fine", "prompt": "Hi", "max_tokens": 2}\n'
    )
    out = tmp_path / "out.jsonl"
    result = run_cli(job, out, "--model", tiny_dir)
    assert result.exit_code == 3, result.output
    error, fine = sorted(read_jsonl(out), key=lambda r: str(r["id"]))
    assert error["error"]["field"] == "metadata" and error["line"] == 1
    assert fine["id"] == "fine" and "text" in fine
    before = out.read_bytes()
    assert run_cli(job, out, "--model", tiny_dir, "--resume").exit_code == 3
    assert out.read_bytes() == before


def test_nothing_is_touched_when_the_run_cannot_start(tmp_path: Path, tiny_dir: Path):
    """Defect 3: INPUT, OUTPUT's directory and the model are checked before OUTPUT is opened."""
    out = tmp_path / "out.jsonl"
    missing = tmp_path / "missing.jsonl"
    result = run_cli(missing, out, "--model", tiny_dir)
    assert result.exit_code == 1 and "cannot read" in result.output
    assert not out.exists()  # no empty OUTPUT left to block the rerun

    out.write_bytes(b"precious\n")
    assert run_cli(missing, out, "--model", tiny_dir, "--overwrite").exit_code == 1
    job = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    result = run_cli(job, out, "--model", tmp_path / "no-model", "--overwrite")
    assert result.exit_code == 1 and "cannot load model" in result.output
    assert out.read_bytes() == b"precious\n"

    result = run_cli(job, tmp_path / "nodir" / "out.jsonl", "--model", tiny_dir)
    assert result.exit_code == 1 and "does not exist" in result.output


def test_metrics_may_not_name_output_or_input(tmp_path: Path, tiny_dir: Path):
    """Defect 4: two handles on one file are refused before anything is touched."""
    job = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"kept\n")
    (tmp_path / "link.jsonl").symlink_to(out)
    for metrics in (out, tmp_path / "link.jsonl", job):
        result = run_cli(job, out, "--model", tiny_dir, "--metrics", metrics, "--overwrite")
        assert result.exit_code == 2, result.output
        assert "--metrics" in result.output
    assert out.read_bytes() == b"kept\n"
    assert job.read_bytes() == orjson.dumps({"prompt": "Hi"}) + b"\n"


def test_metrics_file_resumes_like_output(tmp_path: Path, tiny_dir: Path):
    """Defect 4: a torn metrics line is cut on --resume, and the new run's lines follow."""
    records = [{"id": i, "prompt": PROMPTS[i % 6], "max_tokens": 3} for i in range(6)]
    job = write_jsonl(tmp_path / "in.jsonl", records[:3])
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.jsonl"
    assert run_cli(job, out, "--model", tiny_dir, "--metrics", metrics).exit_code == 0
    with metrics.open("ab") as stream:
        stream.write(b'{"type":"window","ind')
    write_jsonl(job, records)
    result = run_cli(job, out, "--model", tiny_dir, "--metrics", metrics, "--resume")
    assert result.exit_code == 0, result.output
    kinds = "".join(line["type"][0] for line in read_jsonl(metrics))  # w(indow), s(ummary)
    assert re.fullmatch("w+sw+s", kinds), kinds
    assert len(results_by_id(out)) == 6


def test_seed_is_range_checked_before_anything_runs(tmp_path: Path, tiny_dir: Path):
    """Defect 6."""
    job = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    out = tmp_path / "out.jsonl"
    for seed in (2**64, -1):
        result = run_cli(job, out, "--model", tiny_dir, "--seed", seed)
        assert result.exit_code == 2 and "--seed" in result.output
    assert not out.exists()
    assert run_cli(job, out, "--model", tiny_dir, "--seed", 2**64 - 1).exit_code == 0


def test_openai_lines_report_the_model_that_ran_and_name_body_fields_alike(
    tmp_path: Path, tiny_dir: Path
):
    """Defects 8 and 10: body.model is not echoed; `param` is the body field's own name."""
    records = [
        openai_line("ok", "Hi", model="gpt-4o", max_tokens=2),
        openai_line("typed", "Hi", max_tokens="x"),
        openai_line("long", "Hi", max_tokens=5000),
        openai_line("unsupported", "Hi", n=17),
        {"custom_id": "no-prompt", "body": {"model": "gpt2"}},
    ]
    job = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    assert run_cli(job, out, "--model", tiny_dir).exit_code == 3
    lines = {r["custom_id"]: r["response"] for r in read_jsonl(out)}
    assert lines["ok"]["body"]["model"] == str(tiny_dir)
    params = {k: v["body"]["error"]["param"] for k, v in lines.items() if k != "ok"}
    expected = {"typed": "max_tokens", "long": "max_tokens", "unsupported": "n"}
    assert params == expected | {"no-prompt": "prompt"}
    for key, param in params.items():
        assert f"'{param}'" in lines[key]["body"]["error"]["message"] or key == "long"


def test_stop_and_window_options(tmp_path: Path, tiny_dir: Path, hf_tiny, tokenizer):
    ids = tokenizer(PROMPTS[0]).input_ids
    greedy = hf_greedy(hf_tiny, ids, 12)
    text = tokenizer.decode(greedy, skip_special_tokens=True)
    stop = tokenizer.decode(greedy[4:6])
    records = [
        {"id": "cli-stop", "prompt": PROMPTS[0], "max_tokens": 12},
        {"id": "own-stop", "prompt": PROMPTS[0], "max_tokens": 12, "stop": []},
    ]
    job = write_jsonl(tmp_path / "stop.jsonl", records)
    out = tmp_path / "stop-out.jsonl"
    assert run_cli(job, out, "--model", tiny_dir, "--stop", stop).exit_code == 0
    got = results_by_id(out)
    assert got["cli-stop"]["text"] == text[: text.index(stop)]
    assert got["cli-stop"]["finish_reason"] == "stop"
    assert got["own-stop"]["text"] == text  # a line's own (empty) list overrides --stop

    # Static batches of 4 from lengths that alternate long/short: a window of 2 pairs
    # neighbours in file order, a window of 8 puts the four short prompts in one batch.
    # (A batch of one-token requests ends in one step: one engine window each.)
    lengths = [40, 1, 41, 2, 42, 3, 43, 4]
    records = [{"id": i, "prompt": [464] * n, "max_tokens": 1} for i, n in enumerate(lengths)]
    job = write_jsonl(tmp_path / "window.jsonl", records)
    batches = {}
    for window in (2, 8):
        out = tmp_path / f"window-{window}.jsonl"
        args = ("--model", tiny_dir, "--batch-size", 4, "--window", window, "--schedule", "static")
        assert run_cli(job, out, *args).exit_code == 0
        groups: dict[int, set[int]] = {}
        for key, line in results_by_id(out).items():
            groups.setdefault(line["window"]["index"], set()).add(key)
        batches[window] = sorted(map(sorted, groups.values()))
    assert batches[2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert batches[8] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def appeared(process: subprocess.Popen, library: str, timeout: float = 60) -> None:
    """Wait until the child has mapped a shared library (it is importing that package)."""
    deadline = time.monotonic() + timeout
    maps = Path(f"/proc/{process.pid}/maps")
    while time.monotonic() < deadline and process.poll() is None:
        if library in maps.read_text():
            return
        time.sleep(0.005)
    raise AssertionError(f"the child never loaded {library} (exit {process.poll()})")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_exits_cleanly_and_touches_nothing(
    tmp_path: Path, tiny_dir: Path, signum: int
):
    """Defect 5: while torch and MAX import, Ctrl-C or SIGTERM is one line and 128+signal."""
    job = write_jsonl(tmp_path / "in.jsonl", BIG_JOB)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"kept\n")
    process = batchgen(job, out, "--model", tiny_dir, "--overwrite")
    appeared(process, "libtorch")
    process.send_signal(signum)
    assert process.wait(60) == 128 + signum
    stderr = process.stderr.read().decode()
    assert stderr == f"batchgen: interrupted by {signal.Signals(signum).name}\n"
    assert out.read_bytes() == b"kept\n"


def test_ctrl_c_during_a_cold_compile_is_answered_at_once(tmp_path: Path, tiny_dir: Path):
    """Defect 5: a cold compile takes a minute or more; Ctrl-C must not wait for it."""
    job = write_jsonl(tmp_path / "in.jsonl", BIG_JOB)
    out = tmp_path / "out.jsonl"
    cache = tmp_path / "cold-cache"  # an empty MAX cache: the compile starts from nothing
    cache.mkdir()
    argv = [sys.executable, "-c", LAUNCH, "run", job, out, "--model", tiny_dir, *ON_CPU]
    env = child_env() | {"MODULAR_CACHE_DIR": str(cache)}
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(cache.iterdir()) and time.monotonic() < deadline:  # compiling now
            time.sleep(0.05)
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130  # a cold compile would take far longer
    finally:
        process.kill()
    assert process.stderr.read().decode() == "batchgen: interrupted by SIGINT\n"
    assert not out.exists()


def test_a_second_signal_while_the_first_is_handled_still_exits_cleanly(
    tmp_path: Path, tiny_dir: Path
):
    """Defect 5: a second SIGTERM while the first is handled must give 143 and whole lines,
    not a traceback and exit 1. (A single Ctrl-C mid-run is in test_runner's kill test.)"""
    job = write_jsonl(tmp_path / "in.jsonl", BIG_JOB)
    out = tmp_path / "out.jsonl"
    process = batchgen(job, out, "--model", tiny_dir, "--batch-size", 4)
    wait_for_lines(process, out, 8)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.01)  # two signals at once would reach Python as one
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 143
    stderr = process.stderr.read().decode()
    assert "Traceback" not in stderr and "interrupted by SIGTERM" in stderr
    done = read_jsonl(out)  # every line whole
    assert 8 <= len(done) < len(BIG_JOB)


def test_a_second_run_on_the_same_output_is_refused(tmp_path: Path, tiny_dir: Path):
    """Defect 9: a scheduler's retry while the first run still writes exits 1 at once."""
    job = write_jsonl(tmp_path / "in.jsonl", BIG_JOB)
    out = tmp_path / "out.jsonl"
    first = batchgen(job, out, "--model", tiny_dir, "--batch-size", 4, "--resume")
    wait_for_lines(first, out, 4)
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchgen",
            "run",
            job,
            out,
            "--model",
            tiny_dir,
            "--resume",
            *ON_CPU,
        ],
        capture_output=True,
        env=child_env(),
        timeout=60,
    )
    assert second.returncode == 1
    assert b"being written by another batchgen run" in second.stderr
    assert first.wait(120) == 0
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(r["id"] for r in BIG_JOB)
