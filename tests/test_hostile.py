"""A hostile-input corpus through `batchgen run`: every line answered once, nothing crashes."""

from __future__ import annotations

from pathlib import Path

import orjson
from test_runner import read_jsonl, run_cli


def nested(levels: int, leaf: bytes = b'"x"') -> bytes:
    return b'{"a":' * levels + leaf + b"}" * levels


# Each entry is one input line (without its line end); the comment says what it tries.
CORPUS: list[bytes] = [
    b'\xef\xbb\xbf{"id": "bom", "prompt": "a BOM before the first line", "max_tokens": 2}',
    b'{"id": "crlf", "prompt": "a CRLF line end", "max_tokens": 2}\r',
    b'{"id": "ok", "prompt": "Hello", "max_tokens": 2}',
    b'{"id": "deep-metadata", "prompt": "Hi", "metadata": ' + nested(300) + b"}",
    b'{"id": "deep-max-tokens", "prompt": "Hi", "max_tokens": ' + nested(300) + b"}",
    b'{"id": "deep-prompt", "prompt": ' + nested(200) + b"}",
    b'{"id": "deep-stop", "prompt": "Hi", "stop": [' + nested(250) + b"]}",
    b'{"id": "deeper-than-orjson-reads", "prompt": ' + nested(1100) + b"}",
    b'{"id": "deep-unknown", "prompt": "Hi", ' + nested(300)[1:],
    b'{"custom_id": "deep-body", "body": {"prompt": "Hi", "x": ' + nested(300) + b"}}",
    b'{"custom_id": "deep-n", "body": {"prompt": "Hi", "n": ' + nested(300) + b"}}",
    b'{"custom_id": "deep-url", "url": ' + nested(300) + b', "body": {"prompt": "Hi"}}',
    b'{"id": "nul", "prompt": "a raw \x00 byte"}',
    b'{"id": "escaped-nul", "prompt": "an escaped \\u0000 is text", "max_tokens": 2}',
    b"\x00\x00\x00",
    b'{"id": "bad-utf8", "prompt": "\xff\xfe"}',
    b'{"id": "lone-surrogate", "prompt": "\\ud800"}',
    b'{"id": "megabytes", "prompt": "' + b"word " * 600_000 + b'"}',
    b'{"id": "long-ids", "prompt": [' + b",".join([b"464"] * 5000) + b"]}",
    b'{"id": "", "prompt": "an empty id", "max_tokens": 2}',
    b'{"id": "' + b"i" * 10_000 + b'", "prompt": "a 10k id", "max_tokens": 2}',
    b'{"id": "\\n\\u2028\xf0\x9f\x8e\x89", "prompt": "odd characters in the id", "max_tokens": 2}',
    b'{"id": -9223372036854775808, "prompt": "the least int64 id", "max_tokens": 2}',
    b'{"id": 18446744073709551615, "prompt": "the largest uint64 id", "max_tokens": 2}',
    b'{"id": 18446744073709551616, "prompt": "an id past 64 bits reads as a float"}',
    b'{"id": 1.5, "prompt": "a float id"}',
    b'{"id": true, "prompt": "a boolean id"}',
    b'{"id": null, "prompt": "a null id"}',
    b'{"id": "nan", "prompt": "Hi", "temperature": NaN}',
    b'{"id": "inf", "prompt": "Hi", "temperature": Infinity}',
    b'{"id": "1e400", "prompt": "Hi", "top_p": 1e400}',
    b'{"id": "huge-temperature", "prompt": "Hi", "temperature": 1e308}',
    b'{"id": "tiny-top-p", "prompt": "Hi", "temperature": 1, "top_p": 1e-320}',
    b'{"id": "huge-top-k", "prompt": "Hi", "temperature": 1, "top_k": 18446744073709551615,'
    b' "max_tokens": 2}',
    b'{"id": "huge-max-tokens", "prompt": "Hi", "max_tokens": 1e30}',
    b'{"id": "huge-seed", "prompt": "Hi", "seed": 18446744073709551616}',
    b'{"id": "float-max-tokens", "prompt": "Hi", "max_tokens": 2.0}',
    b'{"id": "null-fields", "prompt": "Hi", "max_tokens": null, "temperature": null}',
    b'{"id": "negative-zero", "prompt": "Hi", "temperature": -0.0, "max_tokens": 2}',
    b'{"id": "empty-stop", "prompt": "Hi", "stop": ""}',
    b'{"id": "empty-in-stops", "prompt": "Hi", "stop": ["a", ""]}',
    b'{"id": "many-stops", "prompt": "Hi", "max_tokens": 2, "stop": ['
    + b",".join(b'"s%d"' % i for i in range(1000))
    + b"]}",
    b'{"id": "negative-token", "prompt": [-1]}',
    b'{"id": "huge-token", "prompt": [18446744073709551615]}',
    b'{"id": "float-token", "prompt": [1.0]}',
    b'{"id": "empty-token-list", "prompt": []}',
    b'{"id": "true-prompt", "prompt": true}',
    b'{"id": "dup", "prompt": "first", "max_tokens": 2}',
    b'{"id": "dup", "prompt": "second"}',
    b'{"id": "dup-key", "prompt": "a", "prompt": "b", "max_tokens": 2}',
    b"{}",
    b"null",
    b"42",
    b'"a string"',
    b"[]",
    b"{",
    b'{"custom_id": "chat", "url": "/v1/chat/completions", "body": {"messages": []}}',
    b'{"custom_id": "' + b"c" * 5000 + b'", "url": "' + b"u" * 5000 + b'", "body": {}}',
    b'{"custom_id": "no-body"}',
    b'{"custom_id": null, "body": {"prompt": "Hi"}}',
    b'{"custom_id": "bad-body-key", "body": {"prompt": "Hi", "' + b"k" * 5000 + b'": 1}}',
]


def test_every_hostile_line_gets_one_output_line_and_resume_changes_nothing(
    tmp_path: Path, tiny_dir: Path
):
    job = tmp_path / "hostile.jsonl"
    # Blank and whitespace-only lines are skipped; they get no output line.
    job.write_bytes(b"\n".join(CORPUS[:2] + [b"", b"   \t", b"\r"] + CORPUS[2:]) + b"\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(job, out, "--model", tiny_dir, "--batch-size", 8, "--seed", 3)
    assert result.exit_code == 3, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    records = read_jsonl(out)
    assert len(records) == len(CORPUS)

    # Every line is accounted for once: results by id, error lines by line number.
    numbers = [n for n in range(1, len(CORPUS) + 4) if n not in (3, 4, 5)]
    answered = []
    for record in records:
        line = record.get("line") or (record.get("batchgen") or {}).get("line")
        if "text" in record or (record.get("response") or {}).get("status_code") == 200:
            answered.append(("id", record.get("id")))
        else:
            answered.append(("line", line))
    error_lines = sorted(n for kind, n in answered if kind == "line")
    assert len(set(error_lines)) == len(error_lines)
    assert set(error_lines) <= set(numbers)
    ok = {key for kind, key in answered if kind == "id"}
    expected_ok = {
        "bom", "crlf", "ok", "escaped-nul", "", "i" * 10_000, "\n\u2028🎉",
        -9223372036854775808, 18446744073709551615, "huge-top-k", "float-max-tokens",
        "null-fields", "negative-zero", "many-stops", "dup", "dup-key", "float-token",
    }  # fmt: skip
    # A null id is the line number, as an absent one is (pydantic: null is "not given");
    # the file has three blank lines after CORPUS[1].
    expected_ok.add(CORPUS.index(b'{"id": null, "prompt": "a null id"}') + 1 + 3)
    assert ok == expected_ok
    assert len(error_lines) + len(ok) == len(CORPUS)

    before = out.read_bytes()
    again = run_cli(job, out, "--model", tiny_dir, "--batch-size", 8, "--seed", 3, "--resume")
    assert again.exit_code == 3, again.output
    assert f"0 ok, 0 failed, {len(CORPUS)} skipped" in again.stderr
    assert out.read_bytes() == before
    assert all(orjson.loads(line) for line in before.splitlines())
