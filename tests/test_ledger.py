"""The resume scan, the no-clobber rule and the lock (no model needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from batchgen.job.ledger import ClaimError, Done, Kind, claim, same_file

OK = b'{"id":"a","text":"x","finish_reason":"length"}\n'
ERR = b'{"id":null,"line":4,"error":{"field":null,"message":"m"}}\n'
OPENAI = orjson.dumps(
    {"id": "b", "custom_id": "r", "response": {"status_code": 200}, "batchgen": {"line": 5}}
)


def write(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def resume(path: Path, kind: Kind = "output") -> tuple[Done, bytes]:
    """Claim and open a file to resume; what it held, and its bytes once opened."""
    held = claim(path, resume=True, overwrite=False, kind=kind)
    held.open()
    held.close()
    return held.done, path.read_bytes()


def test_a_torn_last_line_is_cut_only_when_the_file_is_opened(tmp_path: Path):
    path = write(tmp_path / "out.jsonl", OK, ERR, OPENAI + b"\n", b'{"id": "b", "te')
    held = claim(path, resume=True, overwrite=False)
    assert held.done.ids == {"a", "r"} and held.done.error_lines == {4}
    assert path.read_bytes().endswith(b'"te')  # claiming writes nothing
    held.open()
    held.close()
    assert path.read_bytes() == OK + ERR + OPENAI + b"\n"


def test_a_missing_final_newline_is_restored(tmp_path: Path):
    done, data = resume(write(tmp_path / "out.jsonl", OK.rstrip(b"\n")))
    assert done.ids == {"a"} and data == OK


def test_a_lone_torn_line_is_cut_only_if_it_begins_like_a_batchgen_line(tmp_path: Path):
    done, data = resume(write(tmp_path / "out.jsonl", b'{"id":"a","te'))
    assert not done and data == b""
    for foreign in (b"my notes, no newline", b'{"name": "x"', b"x"):
        path = write(tmp_path / "notes.txt", foreign)
        with pytest.raises(ClaimError, match="notes.txt:1: not a batchgen output line"):
            claim(path, resume=True, overwrite=False)
        assert path.read_bytes() == foreign


def test_a_foreign_file_is_refused_untouched(tmp_path: Path):
    cases = [
        (b"not json\n", OK),
        (b'{"foo": 1}\n',),
        (OK, b"garbage in the middle\n", OK),
        (b'{"foo": 1}',),
        (b"[1, 2]\n",),
    ]
    for lines in cases:
        path = write(tmp_path / "out.jsonl", *lines)
        with pytest.raises(ClaimError, match="out.jsonl:"):
            claim(path, resume=True, overwrite=False)
        assert path.read_bytes() == b"".join(lines)


def test_metrics_files_resume_like_output(tmp_path: Path):
    batch = b'{"type":"batch","index":0}\n'
    _, data = resume(write(tmp_path / "m.jsonl", batch, b'{"type":"summ'), "metrics")
    assert data == batch
    with pytest.raises(ClaimError, match="m.jsonl:1: not a batchgen metrics line"):
        claim(write(tmp_path / "m.jsonl", OK), resume=True, overwrite=False, kind="metrics")


def test_existing_files_need_resume_or_overwrite_and_overwrite_waits_for_open(tmp_path: Path):
    path = write(tmp_path / "out.jsonl", b"precious\n")
    with pytest.raises(ClaimError, match="exists: pass --resume .* or --overwrite"):
        claim(path, resume=False, overwrite=False)
    held = claim(path, resume=False, overwrite=True)
    assert path.read_bytes() == b"precious\n"  # a run that never opens it changes nothing
    held.open().write(OK)
    held.close()
    assert path.read_bytes() == OK
    with pytest.raises(ClaimError, match="directory .* does not exist"):
        claim(tmp_path / "missing" / "out.jsonl", resume=False, overwrite=False)


def test_a_new_file_is_created_only_when_opened(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    held = claim(path, resume=True, overwrite=False)
    assert not path.exists()
    held.open().write(OK)
    held.close()
    assert path.read_bytes() == OK


def test_a_directory_gone_while_the_model_loaded_is_a_clear_error(tmp_path: Path):
    folder = tmp_path / "results"
    folder.mkdir()
    held = claim(folder / "out.jsonl", resume=False, overwrite=False)
    folder.rmdir()
    with pytest.raises(ClaimError, match="cannot write .*out.jsonl: No such file or directory"):
        held.open()


def test_a_file_held_by_another_run_is_refused(tmp_path: Path):
    path = write(tmp_path / "out.jsonl", OK)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'rb'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(ClaimError, match="being written by another batchgen run"):
            claim(path, resume=True, overwrite=False)
    finally:
        holder.communicate(b"")
    assert path.read_bytes() == OK
    held = claim(path, resume=True, overwrite=False)  # free again once the holder is gone
    with pytest.raises(ClaimError, match="another batchgen run"):
        claim(path, resume=True, overwrite=False)  # and this claim holds it
    held.close()


def test_same_file_sees_through_links(tmp_path: Path):
    target = write(tmp_path / "a.jsonl", OK)
    (tmp_path / "link.jsonl").symlink_to(target)
    (tmp_path / "hard.jsonl").hardlink_to(target)
    assert same_file(tmp_path / "link.jsonl", target)
    assert same_file(tmp_path / "hard.jsonl", target)
    assert same_file(tmp_path / "." / "a.jsonl", target)
    assert not same_file(tmp_path / "b.jsonl", target)


def test_done_covers_ids_and_error_lines():
    done = Done(ids={"a"}, error_lines={3})
    assert done.covers(1, "a") and done.covers(3, None) and not done.covers(2, "b")
