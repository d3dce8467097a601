"""The command line itself: version, help and usage errors answer before anything heavy loads."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from test_runner import child_env

import batchgen

PROBE = """
import sys
from click.testing import CliRunner
from batchgen.cli import cli

for args in (
    ["--help"],
    ["--version"],
    ["run", "--help"],
    ["run", "in.jsonl", "out.jsonl", "--resume", "--overwrite"],
    ["run", "in.jsonl", "out.jsonl", "--seed", "18446744073709551616"],
    ["run", "in.jsonl", "in.jsonl"],
    ["run", "missing.jsonl", "out.jsonl"],
    ["gpt2", "--prompt", "x", "--chat"],
    ["run", "in.jsonl", "out.jsonl", "--kv-cache", "slots", "--device", "gpu"],
    ["run", "in.jsonl", "out.jsonl", "--kv-cache", "paged", "--kv-cache-dtype", "float16"],
    ["bench", "--workloads", "uniform,warp"],
    ["report", "metrics.jsonl"],
    ["bench", "--plot", "bench.gif"],
):
    result = CliRunner().invoke(cli, args)
    print(result.exit_code, result.output.splitlines()[-1] if result.output else "")
print(sorted(m for m in ("torch", "max", "transformers", "numpy") if m in sys.modules))
"""


def test_help_version_and_usage_errors_import_nothing_heavy(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=child_env(),
        check=True,
    )
    *answers, heavy = done.stdout.splitlines()
    codes = [int(line.split()[0]) for line in answers]
    assert codes == [0, 0, 0, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2], done.stdout
    assert answers[1] == f"0 batchgen, version {batchgen.__version__}"
    assert "cannot read missing.jsonl" in answers[6]
    assert "--kv-cache slots runs on the CPU" in answers[8]
    assert "float16 goes with the slot cache" in answers[9]
    assert "choose from uniform, step, mixed, long" in answers[10]
    assert "name the page (-o report.html), the images (--png DIR), or both" in answers[11]
    assert "name a .png, .svg or .pdf file" in answers[12]
    assert heavy == "[]"


def test_bench_prints_every_workload_it_is_asked_for(tiny_dir, tmp_path):
    """A smoke run of `batchgen bench` on the 2-layer checkpoint: it runs and says what it ran,
    and draws it (--plot)."""
    plot = tmp_path / "bench.svg"
    args = ["--model", str(tiny_dir), "--workloads", "uniform,step,scoring,choices",
            "--batch-sizes", "1,2", "--repeats", "1", "--plot", str(plot)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "batchgen", "bench", *args],
        capture_output=True, text=True, env=child_env(), check=True,
    )  # fmt: skip
    out = done.stdout
    assert "uniform: prompts ~32 tokens" in out and "    2 " in out
    assert out.count("decode step, batch 8") == 2  # float32 and float16 keys and values
    assert out.count("profile, decode step of 32 rows") == 4
    assert re.search(r"scoring: 32 prompts .* batchgen \d+ scored tok/s, HF forward pass \d+", out)
    assert re.search(r"choices: 8 prompts .* n=4 \d+ tok/s, 32 separate requests \d+ tok/s", out)
    drawn = plot.read_text()  # the curve and three workloads' panels, their titles as text
    assert "tokens/s against batch size" in drawn
    assert all(name in drawn for name in ("uniform: ", "scoring: ", "choices: "))


def test_every_run_option_reaches_one_option_field_and_no_other_setting_is_taken():
    from batchgen.cli.run import run
    from batchgen.job.options import OWN_SETTINGS, SETTINGS, grouped

    names = {param.name for param in run.params} - {"job_file", "dry_run"}
    assert names == set(SETTINGS) | set(OWN_SETTINGS)
    with pytest.raises(TypeError, match="max_token"):
        grouped({"max_token": 3})  # a typo is an error, not a dropped option
    assert grouped({"batch_size": 4, "top_k": None})["scheduler"] == {"max_rows": 4}


def test_the_defaults_run_s_help_states_are_the_dataclasses_own():
    """The defaults are written once, in EngineConfig, SchedulerConfig, SamplingParams and
    RunSettings; the help text that states one must say the same."""
    from click.testing import CliRunner

    from batchgen.cli import cli
    from batchgen.engine import SamplingParams, SchedulerConfig
    from batchgen.job.options import RunSettings

    help_text = " ".join(CliRunner().invoke(cli, ["run", "--help"]).output.split())
    stated = {
        "--batch-size": SchedulerConfig().max_rows,
        "--step-tokens": SchedulerConfig().step_tokens,
        "--window": RunSettings().window,
        "--max-tokens": SamplingParams().max_tokens,
        "--top-p": SamplingParams().top_p,
    }
    for option, default in stated.items():
        said = re.search(rf"{option} [^\n]*?\(default: ([\d.]+)[,)]", help_text)
        assert said is not None, option
        assert float(said.group(1)) == default, option
