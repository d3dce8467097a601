"""Where a job's lines go: `--errors FILE`, `--order input`, and a run with no line to run,
end to end through `batchgen run` on a small random checkpoint."""

from __future__ import annotations

from typing import Any

import orjson
from click.testing import CliRunner
from conftest import PROMPTS
from test_runner import read_jsonl, run_cli, write_jsonl

from batchgen.cli import cli
from batchgen.job import records


def job_lines() -> list[Any]:
    """Good lines whose lengths make them finish out of input order, and three bad ones:
    refused as read (a type, a duplicate id) and by the engine (past the context)."""
    lines: list[Any] = [
        {"id": f"q{i}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 2 + (7 * i) % 11}
        for i in range(12)
    ]
    lines.insert(3, {"id": "bad", "prompt": 5})
    lines.insert(7, {"id": "q1", "prompt": "a duplicate id"})
    lines.insert(10, {"id": "long", "prompt": list(range(60)), "max_tokens": 5000})
    return lines


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("timing", "window")}


def test_errors_file_takes_every_error_line_and_resume_and_merge_read_it(tmp_path, tiny_dir):
    job = write_jsonl(tmp_path / "in.jsonl", job_lines())
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    result = run_cli(job, out, "--model", tiny_dir, "--errors", errors)
    assert result.exit_code == 3, result.output
    assert [r["id"] for r in read_jsonl(errors)] == ["bad", "q1", "long"]
    assert all("error" in r for r in read_jsonl(errors))
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(f"q{i}" for i in range(12))
    assert all("error" not in r for r in read_jsonl(out))
    # Both files are the run's: neither is clobbered, and resume reads both.
    again = run_cli(job, tmp_path / "other.jsonl", "--model", tiny_dir, "--errors", errors)
    assert again.exit_code == 1 and "exists" in again.output
    kept = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(kept[:5]))
    resumed = run_cli(job, out, "--model", tiny_dir, "--errors", errors, "--resume")
    assert resumed.exit_code == 3, resumed.output
    assert len(read_jsonl(out)) == 12 and len(read_jsonl(errors)) == 3
    # Shards with their own error files merge into one file holding every line once.
    parts = []
    for i in range(2):
        part, part_errors = tmp_path / f"part-{i}.jsonl", tmp_path / f"part-{i}-errors.jsonl"
        shard = run_cli(
            job, part, "--model", tiny_dir, "--shard", f"{i}/2", "--errors", part_errors
        )
        assert shard.exit_code in (0, 3), shard.output
        parts += [part, part_errors]
    merged = tmp_path / "merged.jsonl"
    args = ["merge", *map(str, parts), "--input", str(job), "-o", str(merged), "--order", "input"]
    merging = CliRunner().invoke(cli, args)
    assert merging.exit_code == 0, merging.output
    assert "no completion marker" not in merging.output  # error files have none of their own
    keys = [records.accounted(r) for r in read_jsonl(merged)]
    assert len(keys) == len(job_lines()) and len(set(keys)) == len(keys)


def test_order_input_writes_lines_in_input_order_with_the_same_records(tmp_path, tiny_dir):
    job = write_jsonl(tmp_path / "in.jsonl", job_lines())
    finished = tmp_path / "finished.jsonl"
    assert run_cli(job, finished, "--model", tiny_dir, "--batch-size", 3).exit_code == 3
    as_finished = [r["id"] for r in read_jsonl(finished)]
    in_input = [line["id"] for line in job_lines()]
    assert as_finished != in_input  # the test means something only if they differ
    for batch_size in (2, 5):
        ordered = tmp_path / f"ordered-{batch_size}.jsonl"
        options = ("--batch-size", batch_size, "--order", "input")
        assert run_cli(job, ordered, "--model", tiny_dir, *options).exit_code == 3
        records_in_order = read_jsonl(ordered)
        assert [r["id"] for r in records_in_order] == in_input
        by_key = sorted(map(comparable, records_in_order), key=orjson.dumps)
        assert by_key == sorted(map(comparable, read_jsonl(finished)), key=orjson.dumps)
    errors = tmp_path / "errors.jsonl"
    split = tmp_path / "split.jsonl"
    options = ("--order", "input", "--errors", errors, "--batch-size", 3)
    assert run_cli(job, split, "--model", tiny_dir, *options).exit_code == 3
    refused = {3, 7, 10}  # the bad lines' places: their error lines went to the error file
    results = [line_id for i, line_id in enumerate(in_input) if i not in refused]
    assert [r["id"] for r in read_jsonl(split)] == results


def test_a_job_with_no_line_to_run_never_loads_the_model(tmp_path, tiny_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # found, but it cannot load
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "a", "prompt": "Hello"}])
    loads = run_cli(good, tmp_path / "g.jsonl", "--model", broken)
    assert loads.exit_code == 1 and "cannot load model" in loads.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": 5}, {"id": "x"}, "not an object"])
    out = tmp_path / "out.jsonl"
    refused = run_cli(bad, out, "--model", broken)
    assert refused.exit_code == 3, refused.output
    assert "cannot load" not in refused.output
    assert "not loaded: no line could run" in refused.output
    assert [r["line"] for r in read_jsonl(out)] == [1, 2, 3]
    # A finished OUTPUT resumed: nothing left to run, so nothing to load either.
    done = tmp_path / "done.jsonl"
    assert run_cli(good, done, "--model", tiny_dir).exit_code == 0
    before = done.read_bytes()
    resumed = run_cli(good, done, "--model", broken, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert done.read_bytes() == before


def test_order_input_holds_at_most_a_window_of_lines_behind_a_long_one(tmp_path, tiny_dir):
    """A long first line and many short ones: the short ones would all finish while it runs;
    with --order input the engine starts no more once a window's worth of them wait."""
    lines = [{"id": "long", "prompt": PROMPTS[0], "max_tokens": 48, "ignore_eos": True}]
    lines += [
        {"id": f"s{i}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 2, "ignore_eos": True}
        for i in range(40)
    ]
    job = write_jsonl(tmp_path / "in.jsonl", lines)
    before_long = {}
    for order in ("finished", "input"):
        out = tmp_path / f"{order}.jsonl"
        options = ("--batch-size", 4, "--window", 5, "--order", order)
        assert run_cli(job, out, "--model", tiny_dir, *options).exit_code == 0
        written = read_jsonl(out)
        assert sorted(r["id"] for r in written) == sorted(line["id"] for line in lines)
        window_of = {r["id"]: r["window"]["index"] for r in written}
        before_long[order] = sum(w < window_of["long"] for w in window_of.values())
        if order == "input":
            assert [r["id"] for r in written] == [line["id"] for line in lines]
    assert before_long["finished"] > 20  # unbounded, the short lines overtake it
    # A short line first, long ones behind: started first, as read, so nothing piles up.
    lines[0] = {"id": "long", "prompt": PROMPTS[0], "max_tokens": 8, "ignore_eos": True}
    for line in lines[1:]:
        line["max_tokens"] = 16
    out = tmp_path / "short-first.jsonl"
    job = write_jsonl(tmp_path / "short-first-in.jsonl", lines)
    options = ("--batch-size", 4, "--window", 5, "--order", "input")
    assert run_cli(job, out, "--model", tiny_dir, *options).exit_code == 0
    window_of = {r["id"]: r["window"]["index"] for r in read_jsonl(out)}
    assert sum(w < window_of["long"] for w in window_of.values()) <= 5 + 2 * 4
    # The window, and what the engine had when it filled: rows running, its queue of as many.
    assert before_long["input"] <= 5 + 2 * 4


def test_shards_writing_outputs_by_template_need_one_for_the_error_file(tmp_path):
    job = write_jsonl(tmp_path / "in.jsonl", job_lines())
    args = (job, tmp_path / "out-{shard}.jsonl", "--shard", "0/2", "--dry-run")
    shared = run_cli(*args, "--errors", tmp_path / "errors.jsonl")
    assert shared.exit_code == 2 and "--errors" in shared.output and "{shard}" in shared.output
    assert run_cli(*args, "--metrics", tmp_path / "m.jsonl").exit_code == 2
