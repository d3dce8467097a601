"""Job files, shards, completion markers, `batchgen merge`, and the scheduler examples in jobs/."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import ON_CPU, PROMPTS
from test_runner import child_env, read_jsonl, results_by_id, write_jsonl

from batchgen.cli import cli
from batchgen.job.shards import Shard, ShardError, parse_shard, shard_of

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def invoke(*args: Any, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [*map(str, args)], env=env)


def dry_run(*args: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = invoke("run", *args, "--dry-run", env=env)
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def records(n: int) -> list[dict[str, Any]]:
    """n prompt lines with ids, plus lines that become error lines (bad, duplicate, id-less)."""
    lines: list[dict[str, Any]] = [
        {"id": f"q{i}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 1 + i % 3}
        for i in range(n)
    ]
    lines[7] = {"id": "bad", "prompt": 5}
    lines[11] = {"id": "q3", "prompt": "a duplicate id"}
    lines[13] = {"prompt": "no id: its line number stands in"}
    return lines


# --- job files -------------------------------------------------------------------------------


def write_job(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_job_file_runs_with_paths_relative_to_it_and_flags_override_it(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write_jsonl(jobs / "in.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    job = write_job(
        jobs / "nightly.toml",
        f'input = "in.jsonl"\noutput = "out.jsonl"\nmodel = "{tiny_dir}"\n'
        'device = "cpu"\nmax_tokens = 5\nbatch_size = 2\nstop = ["zzz"]\nquiet = true\n',
    )
    monkeypatch.chdir(tmp_path)  # not the job file's directory
    result = invoke("run", "--job", job)
    assert result.exit_code == 0, result.output
    out = results_by_id(jobs / "out.jsonl")
    assert sorted(out) == list(range(len(PROMPTS)))
    assert {r["usage"]["completion_tokens"] for r in out.values()} == {5}
    assert max(r["window"]["mean_rows"] for r in out.values()) <= 2

    # A flag on the command line wins over the file; the file's other keys still apply.
    overridden = dry_run("--job", job, "--max-tokens", "3", "--overwrite")
    assert overridden["sampling"]["max_tokens"] == 3
    assert overridden["engine"]["scheduler"]["max_rows"] == 2
    assert overridden["sampling"]["stop"] == ["zzz"]
    assert overridden["output"] == str(jobs / "out.jsonl")
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    positional = dry_run("--job", job, "a.jsonl", "b.jsonl", "--no-quiet")
    assert (positional["input"], positional["output"]) == ("a.jsonl", "b.jsonl")
    assert positional["run"]["quiet"] is False  # a job file's true flag turned off


def test_ray_options_need_the_ray_backend(tmp_path: Path):
    input_path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    for option in (("--actors", "2"), ("--ray-address", "auto"), ("--cpus-per-actor", "1")):
        result = invoke("run", input_path, tmp_path / "out.jsonl", *option)
        assert result.exit_code == 2 and "go with --backend ray" in result.output


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("batchsize = 8", "unknown key 'batchsize'"),
        ('batch_size = "8"', "key 'batch_size' must be an integer"),
        ("batch_size = 0", "key 'batch_size'"),
        ("temperature = true", "key 'temperature' must be a number"),
        ('stop = "x"', "key 'stop' must be a list of strings"),
        ('resume = "yes"', "key 'resume' must be true or false"),
        ('device = "tpu"', "key 'device'"),
        ("[run]\nmodel = 'gpt2'", "[run] is a table"),
        ("model = ", "not valid TOML"),
        ('job = "other.toml"', "unknown key 'job'"),
        ("dry_run = true", "unknown key 'dry_run'"),
    ],
)
def test_a_bad_job_file_is_refused_before_anything_runs(tmp_path: Path, text: str, named: str):
    """Also: a job file that is not UTF-8 (below)."""
    input_path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    job = write_job(tmp_path / "job.toml", f'input = "in.jsonl"\noutput = "out.jsonl"\n{text}\n')
    result = invoke("run", "--job", job)
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "job.toml"]
    job.write_bytes(b'input = "\xff"\n')
    assert "not valid TOML" in invoke("run", "--job", job).output
    assert input_path.read_bytes() == b'{"prompt":"x"}\n'


# --- shards ----------------------------------------------------------------------------------


def test_shards_partition_ids_stably_and_in_balance():
    ids: list[Any] = [f"req-{i}" for i in range(400)] + list(range(400))
    for count in (2, 4):
        owners = [shard_of(i, 0, count) for i in ids]
        sizes = Counter(owners)
        assert sorted(sizes) == list(range(count))
        for line_ids in (ids[:400], ids[400:]):
            per_shard = Counter(shard_of(i, 0, count) for i in line_ids)
            expected = len(line_ids) / count
            assert all(abs(n - expected) <= 0.25 * expected for n in per_shard.values())
        # The id decides, not the line: the same id lands in the same shard on any line.
        assert owners == [shard_of(i, 99, count) for i in ids]
    assert shard_of(7, 1, 1000) != shard_of("7", 1, 1000)  # 7 and "7" are two ids
    assert shard_of(None, 5, 4) == shard_of(None, 5, 4)  # an id-less line goes by its number


def test_shard_auto_reads_slurm_arrays_and_indexed_jobs():
    slurm = {
        "SLURM_ARRAY_TASK_ID": "7",
        "SLURM_ARRAY_TASK_MIN": "5",
        "SLURM_ARRAY_TASK_MAX": "8",
        "SLURM_ARRAY_TASK_COUNT": "4",
        "SLURM_ARRAY_TASK_STEP": "1",
    }
    assert parse_shard("auto", slurm, None) == Shard(2, 4)
    # With the count given, the task id is the shard: one task resubmitted alone (--array=2).
    alone = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_MAX": "2"}
    alone["SLURM_ARRAY_TASK_COUNT"] = "1"
    assert parse_shard("auto", alone, 4) == Shard(2, 4)
    assert parse_shard("auto", alone | {"BATCHGEN_NUM_SHARDS": "4"}, None) == Shard(2, 4)
    assert parse_shard("1/3", {}, None) == Shard(1, 3)
    assert parse_shard("auto", {"JOB_COMPLETION_INDEX": "3"}, 4) == Shard(3, 4)
    indexed = {"JOB_COMPLETION_INDEX": "0", "BATCHGEN_NUM_SHARDS": "2"}
    assert parse_shard("auto", indexed, None) == Shard(0, 2)
    refused = [
        ("auto", slurm | {"SLURM_ARRAY_TASK_STEP": "2"}, None, "contiguous"),
        ("auto", slurm | {"SLURM_ARRAY_TASK_COUNT": "3"}, None, "contiguous"),  # 5,7,8: sparse
        ("auto", {"JOB_COMPLETION_INDEX": "1"}, None, "--num-shards"),
        ("auto", {"JOB_COMPLETION_INDEX": "4"}, 4, "does not exist"),
        ("auto", {}, None, "found no scheduler"),
        ("2/2", {}, None, "does not exist"),
        ("1/0", {}, None, "at least 1"),
        ("-1/2", {}, None, "expected I/N"),
        ("a/b", {}, None, "expected I/N"),
    ]
    for text, env, count, message in refused:
        with pytest.raises(ShardError, match=re.escape(message)):
            parse_shard(text, env, count)


def test_shard_auto_on_the_command_line(tmp_path: Path, tiny_dir: Path):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    env = {"JOB_COMPLETION_INDEX": "2", "BATCHGEN_NUM_SHARDS": "3"}
    out = tmp_path / "out-{shard}-of-{shards}.jsonl"
    # --dry-run resolves the model: a local one, where the Hub cannot be reached.
    args = (tmp_path / "in.jsonl", out, "--shard", "auto", "--model", tiny_dir)
    assert dry_run(*args, env=env)["output"] == str(tmp_path / "out-2-of-3.jsonl")
    result = invoke(
        "run", *args, "--dry-run", env={"JOB_COMPLETION_INDEX": "x", "BATCHGEN_NUM_SHARDS": "3"}
    )
    assert result.exit_code == 2 and "JOB_COMPLETION_INDEX" in result.output
    unsharded = invoke("run", tmp_path / "in.jsonl", tmp_path / "out-{shard}.jsonl")
    assert unsharded.exit_code == 2 and "holds {shard}" in unsharded.output
    fixed = ("run", tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--shard", "1/2")
    assert "goes with --shard auto" in invoke(*fixed, "--num-shards", "2").output
    clash = invoke(*fixed, "--metrics", tmp_path / "out.jsonl.done.json")
    assert clash.exit_code == 2 and "shard marker" in clash.output


def test_shards_run_disjoint_and_merge_restores_every_line_once(tmp_path: Path, tiny_dir: Path):
    lines = records(240)  # 80 a shard: a hash is within 25% of that at 2.7 standard deviations
    input_path = write_jsonl(tmp_path / "in.jsonl", lines)
    parts = []
    error_lines = 0
    for index in range(3):
        part = tmp_path / f"part-{index}.jsonl"
        result = invoke(
            "run", input_path, part, "--model", tiny_dir, *ON_CPU, "--shard", f"{index}/3",
            "--batch-size", "16", "--quiet",
        )  # fmt: skip
        marker = orjson.loads((tmp_path / f"part-{index}.jsonl.done.json").read_bytes())
        assert result.exit_code == (3 if marker["error_lines"] else 0), result.output
        assert marker["shard"] == f"{index}/3"
        assert marker["lines"] == len(read_jsonl(part))
        error_lines += marker["error_lines"]
        parts.append(part)
    assert error_lines == 2  # the bad line and the duplicate id
    sizes = [len(read_jsonl(p)) for p in parts]
    assert sum(sizes) == len(lines)
    assert all(abs(n - 80) <= 20 for n in sizes), sizes

    # Each line is in exactly one part; a resumed shard touches nothing of the others'.
    again = invoke("run", input_path, parts[1], "--model", tiny_dir, *ON_CPU, "--shard", "1/3",
                   "--resume")  # fmt: skip
    assert again.exit_code in (0, 3) and f"{sizes[1]} skipped" in again.output
    assert len(read_jsonl(parts[1])) == sizes[1]

    merged = tmp_path / "merged.jsonl"
    result = invoke("merge", *parts, "--input", input_path, "-o", merged, "--order", "input")
    assert result.exit_code == 0, result.output
    out = read_jsonl(merged)
    assert len(out) == len(lines)
    keys = [r["id"] if "text" in r else ("line", r["line"]) for r in out]
    expected = [line.get("id", i + 1) for i, line in enumerate(lines)]
    expected = [("line", i + 1) if i in (7, 11) else e for i, e in enumerate(expected)]
    assert keys == expected

    by_parts = tmp_path / "by-parts.jsonl"
    assert invoke("merge", *parts, "--input", input_path, "-o", by_parts).exit_code == 0
    assert sorted(by_parts.read_bytes().splitlines()) == sorted(merged.read_bytes().splitlines())


def test_merge_refuses_missing_lines_and_reports_duplicates(tmp_path: Path, tiny_dir: Path):
    input_path = write_jsonl(tmp_path / "in.jsonl", records(40))
    parts = [tmp_path / f"p{i}.jsonl" for i in range(2)]
    for index, part in enumerate(parts):
        args = ("run", input_path, part, "--model", tiny_dir, *ON_CPU, "--shard", f"{index}/2")
        assert invoke(*args, "--quiet").exit_code in (0, 3)
    merged = tmp_path / "merged.jsonl"

    missing = invoke("merge", parts[0], "--input", input_path, "-o", merged)
    assert missing.exit_code == 1
    count = len(read_jsonl(parts[1]))
    assert f"{count} input lines have no output line" in missing.output
    assert f"and {count - 5} more" in missing.output and "id 'q" in missing.output
    assert not merged.exists()

    # A crashed shard: its torn last line counts as missing, never as a result.
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(parts[1].read_bytes()[:-20])
    assert (
        "1 input lines have no output line"
        in invoke("merge", parts[0], torn, "--input", input_path, "-o", merged).output
    )

    twice = invoke("merge", parts[0], parts[1], parts[0], "--input", input_path, "-o", merged)
    assert twice.exit_code == 0, twice.output
    assert f"{len(read_jsonl(parts[0]))} duplicate lines, kept once" in twice.output
    assert len(read_jsonl(merged)) == 40

    again = invoke("merge", *parts, "--input", input_path, "-o", merged)
    assert again.exit_code == 1 and "exists" in again.output
    nowhere = invoke("merge", *parts, "--input", input_path, "-o", tmp_path / "no" / "m.jsonl")
    assert nowhere.exit_code == 1 and "cannot write" in nowhere.output
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"custom_id": "a", "response": [1]}])
    odd = invoke("merge", foreign, "--input", input_path, "-o", tmp_path / "m3.jsonl")
    assert odd.exit_code == 1 and "not a batchgen output line" in odd.output
    other_input = write_jsonl(tmp_path / "other.jsonl", records(40)[:30])
    stray = invoke("merge", *parts, "--input", other_input, "-o", tmp_path / "m2.jsonl")
    assert stray.exit_code == 1 and "match no line" in stray.output


def test_a_shard_marker_is_only_batchgen_s_own(tmp_path: Path, tiny_dir: Path):
    input_path = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x", "max_tokens": 1}])
    out = tmp_path / "out.jsonl"
    marker = tmp_path / "out.jsonl.done.json"
    marker.write_bytes(b"someone else's file\n")
    result = invoke("run", input_path, out, "--model", tiny_dir, *ON_CPU, "--shard", "0/1")
    assert result.exit_code == 1 and "not a batchgen shard marker" in result.output
    assert marker.read_bytes() == b"someone else's file\n" and not out.exists()
    marker.unlink()
    args = ("run", input_path, out, "--model", tiny_dir, *ON_CPU, "--shard", "0/1")
    assert invoke(*args).exit_code == 0
    first = orjson.loads(marker.read_bytes())
    assert (first["lines"], first["results"], first["this_run"]["requests_ok"]) == (1, 1, 1)
    assert invoke(*args, "--resume").exit_code == 0
    second = orjson.loads(marker.read_bytes())
    assert (second["lines"], second["this_run"]["requests_ok"]) == (1, 0)


# --- the examples in jobs/ -------------------------------------------------------------------


@pytest.fixture
def jobs_copy(tmp_path: Path, tiny_dir: Path) -> Path:
    """jobs/ as shipped, with the example model in place (README command (a) writes it)."""
    copy = tmp_path / "jobs"
    shutil.copytree(JOBS, copy, ignore=shutil.ignore_patterns("tiny-gpt2", "*-out*", "*.done.json"))
    (copy / "examples" / "tiny-gpt2").symlink_to(tiny_dir)
    return copy


def test_the_example_job_files_run_as_they_stand(jobs_copy: Path):
    nightly = invoke("run", "--job", jobs_copy / "nightly.toml", *ON_CPU)
    assert nightly.exit_code == 0, nightly.output
    example = read_jsonl(jobs_copy / "examples" / "prompts.jsonl")
    assert len(read_jsonl(jobs_copy / "nightly-out.jsonl")) == len(example)
    for shard in ("0/2", "1/2"):
        result = invoke("run", "--job", jobs_copy / "sharded.toml", "--shard", shard, *ON_CPU)
        assert result.exit_code == 0, result.output
    parts = sorted(jobs_copy.glob("sharded-out-*-of-2.jsonl"))
    merged = jobs_copy / "merged.jsonl"
    input_path = jobs_copy / "examples" / "prompts.jsonl"
    assert invoke("merge", *parts, "--input", input_path, "-o", merged).exit_code == 0
    assert len(read_jsonl(merged)) == len(example)


def batchgen_argv(command: str) -> list[str]:
    """The arguments after `batchgen` in a shell command line."""
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w.endswith("batchgen"))
    return words[start + 1 :]


def test_the_slurm_array_script_parses_and_dry_runs_every_task(jobs_copy: Path):
    script = (JOBS / "slurm-array.sh").read_text()
    directives = dict(
        re.fullmatch(r"#SBATCH --([\w-]+)(?:=(\S+))?", line).groups()
        for line in script.splitlines()
        if line.startswith("#SBATCH")
    )
    assert directives["array"] == "0-3"
    (command,) = [line for line in script.splitlines() if line.startswith("batchgen ")]
    argv = batchgen_argv(command)
    assert argv[argv.index("--num-shards") + 1] == "4"  # the array's size
    outputs = set()
    for task in range(4):
        env = {
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": "3",
            "SLURM_ARRAY_TASK_COUNT": "4",
        }
        argv_here = [a.replace("jobs/", f"{jobs_copy}/", 1) for a in argv]
        plan = invoke(*argv_here, "--dry-run", env=env)
        assert plan.exit_code == 0, plan.output
        options = orjson.loads(plan.stdout)
        assert options["shard"] == {"index": task, "count": 4} and options["run"]["resume"]
        outputs.add(options["output"])
    assert len(outputs) == 4


def test_the_indexed_job_manifest_parses_and_dry_runs_every_index(jobs_copy: Path):
    manifest = yaml.safe_load((JOBS / "k8s-indexed-job.yaml").read_text())
    spec = manifest["spec"]
    assert manifest["kind"] == "Job" and spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"][0] == "batchgen"
    argv = container["command"][1:]
    assert argv[argv.index("--num-shards") + 1] == str(spec["completions"])
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailIndex" and rule["onExitCodes"]["values"] == [2, 3]
    argv_here = [a.replace("jobs/", f"{jobs_copy}/", 1) for a in argv]
    for index in range(spec["completions"]):
        plan = invoke(*argv_here, "--dry-run", env={"JOB_COMPLETION_INDEX": str(index)})
        assert plan.exit_code == 0, plan.output
        assert orjson.loads(plan.stdout)["shard"] == {"index": index, "count": 4}


def test_the_systemd_units_parse_and_the_service_dry_runs(
    jobs_copy: Path, monkeypatch: pytest.MonkeyPatch
):
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(JOBS / "batchgen-nightly.service")
    timer = configparser.ConfigParser(interpolation=None)
    timer.read(JOBS / "batchgen-nightly.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"
    unit = service["Service"]
    assert unit["Type"] == "oneshot" and unit["RestartPreventExitStatus"] == "2"
    assert unit["ExecStartPre"] == "/bin/mkdir -p out"
    monkeypatch.chdir(jobs_copy.parent)  # the unit's WorkingDirectory, as far as paths go
    (jobs_copy.parent / "out").mkdir()
    shell, flag, command = shlex.split(unit["ExecStart"])
    assert (shell, flag) == ("/bin/sh", "-c")
    comments = (JOBS / "batchgen-nightly.service").read_text().splitlines()
    cron = next(line.split("&&", 1)[1] for line in comments if "* * *" in line)
    # systemd writes % as %%, cron as \%; both name tonight's file after the date.
    for line in (command.replace("%%", "%"), cron.replace("\\%", "%")):
        words = batchgen_argv(line.replace("$(date +%F)", "2026-11-25"))
        words_here = [w.replace("jobs/", f"{jobs_copy}/", 1) for w in words]
        plan = dry_run(*words_here[1:])
        assert plan["output"] == "out/2026-11-25.jsonl" and plan["run"]["resume"]
        assert plan["input"] == str(jobs_copy / "examples" / "prompts.jsonl")


# --- a real Slurm array (opt-in) -------------------------------------------------------------


def slurm_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    return "UP" in ping.stdout


@pytest.mark.slurm
def test_the_slurm_array_runs_for_real(jobs_copy: Path):
    if not slurm_up():
        pytest.skip("no Slurm controller answers here: tests/slurm-single-node.sh starts one")
    env = child_env() | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["sbatch", "--wait", "--parsable", str(jobs_copy / "slurm-array.sh")],
        cwd=jobs_copy.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    parts = sorted(jobs_copy.glob("sharded-out-*-of-4.jsonl"))
    assert len(parts) == 4
    assert all(Path(f"{p}.done.json").exists() for p in parts)
    merged = jobs_copy / "merged.jsonl"
    input_path = jobs_copy / "examples" / "prompts.jsonl"
    result = invoke("merge", *parts, "--input", input_path, "-o", merged, "--order", "input")
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(merged)) == len(read_jsonl(input_path))
