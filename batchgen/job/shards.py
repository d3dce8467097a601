"""Which lines a shard runs, which shard a scheduler asked for, and the marker of a finished one.

A line belongs to shard `hash(id) % N` (a stable hash of its id, not of its line number), so
shards are disjoint, cover the file, stay balanced, and resuming one touches only its lines.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchgen.job.records import JsonId

MARKER_SUFFIX = ".done.json"
_MARKER_KIND = "batchgen shard marker"


class ShardError(ValueError):
    """--shard cannot be honoured (a usage error)."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`, 0-based."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, line_id: JsonId | None, line: int) -> bool:
        """Whether this shard runs the line; a line without a usable id goes by its number."""
        return shard_of(line_id, line, self.count) == self.index


def shard_of(line_id: JsonId | None, line: int, count: int) -> int:
    # orjson keeps 7 and "7" apart, as batchgen's ids do; blake2b is the same on every machine.
    key = orjson.dumps(line_id) if line_id is not None else b"line:%d" % line
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def parse_shard(text: str, env: Mapping[str, str], num_shards: int | None) -> Shard:
    """`I/N`, or `auto`: the shard a Slurm array or a Kubernetes Indexed Job says this is."""
    if text == "auto":
        return scheduler_shard(env, num_shards)
    index, slash, count = text.partition("/")
    if not (slash and index.isdigit() and count.isdigit()):
        raise ShardError(f"--shard {text!r}: expected I/N (0-based, e.g. 0/4) or auto")
    return _checked(int(index), int(count), f"--shard {text}")


def scheduler_shard(env: Mapping[str, str], num_shards: int | None) -> Shard:
    """The shard from a Slurm array's or an Indexed Job's variables; ShardError if neither."""
    count = num_shards
    if count is None and "BATCHGEN_NUM_SHARDS" in env:
        count = _integer(env, "BATCHGEN_NUM_SHARDS")
    if "SLURM_ARRAY_TASK_ID" in env:
        if count is not None:  # task ids are shard numbers: one task can be resubmitted alone
            return _checked(_integer(env, "SLURM_ARRAY_TASK_ID"), count, "SLURM_ARRAY_TASK_ID")
        return _slurm_shard(env)
    if "JOB_COMPLETION_INDEX" in env:
        if count is None:
            raise ShardError(
                "--shard auto in a Kubernetes Indexed Job needs the shard count: pass "
                "--num-shards N or set BATCHGEN_NUM_SHARDS (the Job's completions)"
            )
        return _checked(_integer(env, "JOB_COMPLETION_INDEX"), count, "JOB_COMPLETION_INDEX")
    raise ShardError(
        "--shard auto found no scheduler: neither SLURM_ARRAY_TASK_ID (a Slurm array job) "
        "nor JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) is set; pass --shard I/N"
    )


def _slurm_shard(env: Mapping[str, str]) -> Shard:
    task = _integer(env, "SLURM_ARRAY_TASK_ID")
    low = _integer(env, "SLURM_ARRAY_TASK_MIN")
    high = _integer(env, "SLURM_ARRAY_TASK_MAX")
    count = _integer(env, "SLURM_ARRAY_TASK_COUNT")
    step = _integer(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    # A stepped (0-6:2) or sparse (0,3,7) array leaves holes: some shard would never run.
    if step != 1 or high - low + 1 != count:
        raise ShardError(
            f"--shard auto needs a contiguous Slurm array (--array=0-{count - 1}), or "
            f"--num-shards N; this one runs {count} tasks over {low}-{high} with step {step}"
        )
    return _checked(task - low, count, "SLURM_ARRAY_TASK_ID")


def _integer(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not value.isdigit():
        raise ShardError(f"--shard auto: {name}={value!r} is not a non-negative integer")
    return int(value)


def _checked(index: int, count: int, source: str) -> Shard:
    if count < 1:
        raise ShardError(f"{source}: the shard count must be at least 1")
    if index >= count:
        raise ShardError(f"{source}: shard {index} does not exist among {count} (0-based)")
    return Shard(index, count)


def with_shard(path: Path | None, shard: Shard | None, name: str) -> Path | None:
    """A path with `{shard}` and `{shards}` filled in; ShardError if it has them unsharded."""
    if path is None or ("{shard" not in str(path)):
        return path
    if shard is None:
        raise ShardError(f"{name} {path} holds {{shard}}: pass --shard I/N or --shard auto")
    text = str(path).replace("{shards}", str(shard.count)).replace("{shard}", str(shard.index))
    return Path(text)


def marker_path(output: Path) -> Path:
    return output.with_name(output.name + MARKER_SUFFIX)


def is_marker(path: Path) -> bool:
    """Whether the file is a shard marker batchgen wrote (only those are replaced)."""
    try:
        record = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(record, dict) and record.get("kind") == _MARKER_KIND


def write_marker(output: Path, shard: Shard, summary: dict[str, Any]) -> Path:
    """Say atomically (temp file + rename) that this shard's OUTPUT is complete."""
    path = marker_path(output)
    lines = summary["requests_ok"] + summary["requests_failed"] + summary["requests_skipped"]
    errors = summary["requests_failed"] + summary["requests_failed_earlier"]
    record = {
        "kind": _MARKER_KIND,
        "shard": str(shard),
        "output": output.name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lines": lines,  # every line of this shard, each with a result or an error line
        "results": lines - errors,
        "error_lines": errors,
        "this_run": {
            "requests_ok": summary["requests_ok"],
            "requests_failed": summary["requests_failed"],
            "run_s": summary["run_s"],
            "generated_tokens": summary["generated_tokens"],
        },
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2) + b"\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # only left there if the write failed
    return path
