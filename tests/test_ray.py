"""The Ray Data backend: the same records as a local run, crash-retried actors, a 2-node cluster.

Marked `ray` (deselected by default: each test starts Ray, tens of seconds): `pytest -m ray`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ON_CPU, PROMPTS
from test_runner import child_env, openai_line, read_jsonl, write_jsonl
from test_scale_out import invoke

from batchgen.engine import EngineConfig, SchedulerConfig
from batchgen.job.options import RaySettings

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
# Imported at collection, before any engine compiles in this process (see its imports).
ray_data = pytest.importorskip("batchgen.scale.ray_data")


def job_lines() -> list[Any]:
    """Greedy lines of both forms, plus lines the driver refuses and one an actor refuses."""
    lines: list[Any] = [
        {"id": f"n{i}", "prompt": PROMPTS[i % len(PROMPTS)] * (1 + i % 2), "max_tokens": 4 + i % 5}
        for i in range(18)
    ]
    lines += [openai_line(f"o{i}", PROMPTS[i], max_tokens=6) for i in range(3)]
    lines += [
        {"id": "bad", "prompt": 5},  # refused by the driver, as it parses
        {"id": "n1", "prompt": "a duplicate id"},
        {"id": "long", "prompt": list(range(60)), "max_tokens": 5000},  # past the context
        "not an object",
    ]
    return lines


TIMING = ("timing", "window")


def comparable(path: Path) -> dict[Any, Any]:
    """Every line keyed by what it accounts for, timing and OpenAI's random ids left out."""
    out = {}
    for record in read_jsonl(path):
        if "custom_id" in record:
            body = dict(record["response"]["body"])
            for name in ("id", "created"):
                body.pop(name, None)
            extra = {k: v for k, v in record["batchgen"].items() if k not in TIMING}
            out[record["custom_id"]] = (record["response"]["status_code"], body, extra)
        elif "error" in record:
            out[("line", record["line"])] = record
        else:
            out[record["id"]] = {k: v for k, v in record.items() if k not in TIMING}
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> tuple[Path, dict]:
    """The job's input, and what the local backend writes for it."""
    folder = tmp_path_factory.mktemp("ray-job")
    input_path = write_jsonl(folder / "in.jsonl", job_lines())
    local = folder / "local.jsonl"
    result = invoke("run", input_path, local, "--model", tiny_dir, *ON_CPU, "--token-ids")
    assert result.exit_code == 3, result.output  # the four refused lines
    return input_path, comparable(local)


def test_two_local_actors_write_the_local_backend_s_records(
    job: tuple[Path, dict], tiny_dir: Path, tmp_path: Path
):
    input_path, expected = job
    out = tmp_path / "ray.jsonl"
    metrics = tmp_path / "metrics.jsonl"
    result = invoke(
        "run", input_path, out, "--model", tiny_dir, *ON_CPU, "--token-ids", "--backend", "ray",
        "--actors", "2", "--batch-size", "4", "--metrics", metrics,
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert comparable(out) == expected
    assert len(read_jsonl(out)) == len(job_lines())
    windows = [r for r in read_jsonl(metrics) if r["type"] == "window"]
    assert 1 <= len({w["worker"] for w in windows}) <= 2  # whichever actor was free
    assert sum(w["requests"] for w in windows) == len(job_lines()) - 4
    summary = read_jsonl(metrics)[-1]
    assert summary["requests_ok"] == len(job_lines()) - 4 and summary["requests_failed"] == 4
    assert summary["compile_s"] is None  # each actor compiles; not timed by the driver
    # Resume: nothing left to do, nothing rewritten.
    again = invoke("run", input_path, out, "--model", tiny_dir, *ON_CPU, "--backend", "ray",
                   "--resume")  # fmt: skip
    assert again.exit_code == 3 and f"{len(job_lines())} skipped" in again.output
    assert len(read_jsonl(out)) == len(job_lines())


def test_a_pool_or_cluster_that_cannot_be_had_fails_fast_with_a_message(
    tmp_path: Path, tiny_dir: Path
):
    input_path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    start = time.monotonic()
    result = invoke(
        "run", input_path, tmp_path / "out.jsonl", "--model", tiny_dir, "--backend", "ray",
        "--actors", "2", "--cpus-per-actor", str(os.cpu_count()),
    )  # fmt: skip
    assert result.exit_code == 1
    assert "leave no CPU" in result.output and "would hang" in result.output
    nobody = invoke(
        "run", input_path, tmp_path / "out.jsonl", "--model", tiny_dir, "--backend", "ray",
        "--ray-address", "127.0.0.1:1",
    )  # fmt: skip
    assert nobody.exit_code == 1 and "cannot reach the Ray cluster" in nobody.output
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out.jsonl").exists()
    # An actor that cannot load the model ends the job before OUTPUT is touched.
    kept = b'{"id":1,"text":"an earlier run\'s line"}\n'
    (tmp_path / "out.jsonl").write_bytes(kept)
    unloadable = invoke(
        "run", input_path, tmp_path / "out.jsonl", "--model", tmp_path / "missing", *ON_CPU,
        "--backend", "ray", "--overwrite",
    )  # fmt: skip
    assert unloadable.exit_code == 1, unloadable.output
    (error,) = [line for line in unloadable.output.splitlines() if line.startswith("Error: ")]
    assert "cannot load model" in error
    assert (tmp_path / "out.jsonl").read_bytes() == kept  # --overwrite had not begun


def map_workers() -> list[psutil.Process]:
    workers = []
    for process in psutil.process_iter(["cmdline"]):
        if any("MapWorker" in part for part in process.info["cmdline"] or ()):
            workers.append(process)
    return workers


def test_a_killed_actor_is_retried_and_every_id_is_written_once(tmp_path: Path, tiny_dir: Path):
    lines = [{"id": i, "prompt": PROMPTS[i % 6], "max_tokens": 24} for i in range(160)]
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "batchgen", "run", input_path, out, "--model", tiny_dir,
            *ON_CPU, "--backend", "ray", "--actors", "2", "--batch-size", "4"]  # fmt: skip
    process = subprocess.Popen(list(map(str, argv)), stderr=subprocess.PIPE, env=child_env())
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_bytes().count(b"\n") >= 16):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.2)
    victims = map_workers()
    assert len(victims) == 2, victims
    victims[0].send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()
    ids = [record["id"] for record in read_jsonl(out)]
    assert sorted(ids) == list(range(160))  # every id, exactly once


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    two_nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    two_nodes.add_node(num_cpus=2)
    two_nodes.wait_for_nodes()
    yield two_nodes
    two_nodes.shutdown()


def test_a_two_node_cluster_writes_the_same_records(
    cluster: Any, job: tuple[Path, dict], tiny_dir: Path, tmp_path: Path
):
    input_path, expected = job
    out = tmp_path / "cluster.jsonl"
    result = invoke(
        "run", input_path, out, "--model", tiny_dir, *ON_CPU, "--token-ids", "--backend", "ray",
        "--ray-address", cluster.address, "--actors", "2", "--batch-size", "4",
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert comparable(out) == expected


def test_the_python_api_maps_a_dataset_of_prompt_rows(
    cluster: Any, job: tuple[Path, dict], tiny_dir: Path
):
    _, expected = job
    rows: list[dict[str, Any]] = [
        {name: line[name] for name in ("id", "prompt", "max_tokens")} for line in job_lines()[:8]
    ]
    rows += [{"id": "bad", "prompt": None}, {"prompt": "a row without an id"}]
    rows.append(job_lines()[18])  # an OpenAI batch line, "o0"
    config = ray_data.RayConfig(
        str(tiny_dir),
        EngineConfig(device="cpu", scheduler=SchedulerConfig(max_rows=3)),
        pool=RaySettings(actors=2),
    )
    ray.init(address=cluster.address)
    try:
        results = ray_data.generate(ray.data.from_items(rows), config).take_all()
    finally:
        ray.shutdown()
    by_id = {r["id"]: r for r in results}
    assert len(results) == len(by_id) == len(rows)
    status, body, _ = expected["o0"]
    assert (status, by_id["o0"]["text"]) == (200, body["choices"][0]["text"])
    assert by_id["o0"]["completion_tokens"] == body["usage"]["completion_tokens"]
    for row in rows[:8]:
        local = expected[row["id"]]
        got = by_id[row["id"]]
        assert (got["text"], got["finish_reason"], got["error"]) == (
            local["text"],
            local["finish_reason"],
            None,
        )
        assert got["completion_tokens"] == local["usage"]["completion_tokens"]
    assert by_id["bad"]["error"].startswith("prompt: field 'prompt' is missing")
    assert by_id[None]["error"] == f"id: {ray_data.NO_ROW_ID}"


def test_rows_of_any_shape_in_input_order_with_an_error_file_as_a_local_run(
    cluster: Any, tiny_dir: Path, tmp_path: Path
):
    """Parquet rows through --prompt-field, --order input and --errors: the same as locally."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "question": PROMPTS[i % len(PROMPTS)] * (1 + i % 3)} for i in range(10)]
    rows[4] = {"id": 4, "query": "no question field"}
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    common = ("--model", tiny_dir, *ON_CPU, "--prompt-field", "question", "--order", "input",
              "--max-tokens", 5)  # fmt: skip
    outputs = {}
    for backend in ("local", "ray"):
        out, errors = tmp_path / f"{backend}.jsonl", tmp_path / f"{backend}-errors.jsonl"
        extra = ("--backend", "ray", "--ray-address", cluster.address, "--actors", "2")
        args = ("run", path, out, *common, "--errors", errors, *(extra if backend == "ray" else ()))
        result = invoke(*args)
        assert result.exit_code == 3, result.output
        outputs[backend] = (
            [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(out)],
            read_jsonl(errors),
        )
    assert [r["id"] for r in outputs["ray"][0]] == [i for i in range(10) if i != 4]
    assert outputs["ray"] == outputs["local"]
    assert outputs["ray"][1][0]["error"]["field"] == "question"
