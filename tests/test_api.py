"""Real batch files end to end through `batchgen run`: chat lines, logprobs, echo scoring, n,
prompt arrays, penalties; every output line checked against the `openai` package's types and
transformers' numbers. The corpus (tests/corpus) has the shapes public batch files have."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject
from pydantic import BaseModel
from test_choices import hf_logprobs
from test_runner import read_jsonl, run_cli

from batchgen.engine.transcript import render

CORPUS = Path(__file__).parent / "corpus"
FILES = {  # file -> lines in it, each of which must run
    "chat-with-system.jsonl": 4,
    "completions-requests.jsonl": 6,
    "scoring-requests.jsonl": 3,
    "native-mixed.jsonl": 5,
}


class BatchResponse(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchOutputLine(BaseModel):
    """A line of an OpenAI Batch API output file, as OpenAI documents it (and vLLM's
    BatchRequestOutput reads it); the openai package has no type of its own for it."""

    id: str
    custom_id: str
    response: BatchResponse | None
    error: dict[str, Any] | None


def check_openai_line(record: dict[str, Any]) -> Completion | ChatCompletion | ErrorObject:
    """The line as the openai package's types read it; raises if any reader would fail."""
    line = BatchOutputLine.model_validate(record)
    assert line.response is not None
    body = line.response.body
    if line.response.status_code != 200:
        return ErrorObject.model_validate(body["error"])
    if body["object"] == "chat.completion":
        return ChatCompletion.model_validate(body)
    # OpenAI's API (and vLLM) send null for the first echoed token's logprob, which the
    # package's Completion type declares as a float: checked apart, then validated without it.
    choices = []
    for choice in body["choices"]:
        logprobs = choice["logprobs"]
        if logprobs and logprobs["token_logprobs"] and logprobs["token_logprobs"][0] is None:
            assert logprobs["top_logprobs"][0] is None
            logprobs = {**logprobs, "token_logprobs": [0.0, *logprobs["token_logprobs"][1:]],
                        "top_logprobs": [{}, *logprobs["top_logprobs"][1:]]}  # fmt: skip
        choices.append({**choice, "logprobs": logprobs})
    return Completion.model_validate({**body, "choices": choices})


@pytest.fixture(scope="module")
def corpus_out(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, list]:
    """Each corpus file run once, its output lines by file."""
    out_dir = tmp_path_factory.mktemp("corpus-out")
    outputs = {}
    for name in FILES:
        out = out_dir / name
        result = run_cli(CORPUS / name, out, "--model", tiny_dir, "--batch-size", 8, "--token-ids")
        assert result.exit_code == 0, (name, result.output)
        outputs[name] = read_jsonl(out)
    return outputs


@pytest.mark.parametrize("name", FILES)
def test_every_corpus_file_runs_every_line(corpus_out, name):
    records = corpus_out[name]
    assert len(records) == FILES[name]
    for record in records:
        if "custom_id" in record:
            assert not isinstance(check_openai_line(record), ErrorObject), record


def test_chat_lines_answer_in_chat_completion_form_from_the_transcript(corpus_out, tokenizer):
    by_id = {r["custom_id"]: r for r in corpus_out["chat-with-system.jsonl"]}
    first = ChatCompletion.model_validate(by_id["chat-1"]["response"]["body"])
    assert first.object == "chat.completion"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason in ("stop", "length")
    transcript = render(
        tokenizer, [("system", "You are a helpful assistant."), ("user", "Hello world")]
    )
    assert transcript == "You are a helpful assistant.\nHuman: Hello world\nAI:"
    assert first.usage.prompt_tokens == len(tokenizer(transcript).input_ids)
    assert first.usage.completion_tokens <= 8  # max_completion_tokens
    assert "\nHuman:" not in first.choices[0].message.content
    with_logprobs = ChatCompletion.model_validate(by_id["chat-3"]["response"]["body"])
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == with_logprobs.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in content)
    two = ChatCompletion.model_validate(by_id["chat-4"]["response"]["body"])
    assert [c.index for c in two.choices] == [0, 1]


def test_completion_logprobs_equal_hf(corpus_out, hf_tiny, tokenizer):
    by_id = {r["custom_id"]: r for r in corpus_out["completions-requests.jsonl"]}
    body = Completion.model_validate(by_id["c-logprobs"]["response"]["body"])
    logprobs = body.choices[0].logprobs
    ids = tokenizer("The quick brown fox").input_ids
    generated = by_id["c-logprobs"]["batchgen"]["token_ids"]
    expected = hf_logprobs(hf_tiny, ids + generated)[len(ids) - 1 : -1]
    np.testing.assert_allclose(
        logprobs.token_logprobs, expected[np.arange(len(generated)), generated], atol=1e-4
    )
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0
    assert "".join(logprobs.tokens) == body.choices[0].text


def test_echo_scoring_lines_equal_hf_prompt_logprobs(corpus_out, hf_tiny, tokenizer):
    by_id = {r["custom_id"]: r for r in corpus_out["scoring-requests.jsonl"]}
    for custom_id, prompt in [("score-0", "The capital of France is Paris"),
                              ("score-1", "The capital of France is Rome")]:  # fmt: skip
        body = by_id[custom_id]["response"]["body"]
        choice = body["choices"][0]
        assert choice["text"] == prompt  # echo, nothing generated
        logprobs = choice["logprobs"]
        ids = tokenizer(prompt).input_ids
        assert logprobs["token_logprobs"][0] is None
        expected = hf_logprobs(hf_tiny, ids)[np.arange(len(ids) - 1), ids[1:]]
        np.testing.assert_allclose(logprobs["token_logprobs"][1:], expected, atol=1e-4)
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                 "total_tokens": len(ids)}  # fmt: skip
        check_openai_line(by_id[custom_id])
    # echo with a token generated: the prompt's entries, then the new token's.
    choice = by_id["score-2"]["response"]["body"]["choices"][0]
    n_prompt = len(tokenizer("Question: 2+2=? Answer: 4").input_ids)
    assert len(choice["logprobs"]["tokens"]) == n_prompt + 1


def test_prompt_arrays_and_n_index_choices_as_openai_does(corpus_out):
    by_id = {r["custom_id"]: r for r in corpus_out["completions-requests.jsonl"]}
    array = Completion.model_validate(by_id["c-array"]["response"]["body"])
    assert [c.index for c in array.choices] == [0, 1, 2, 3]  # prompt index x n + choice
    assert array.choices[0].text != array.choices[1].text  # each choice its own stream
    ids = Completion.model_validate(by_id["c-ids"]["response"]["body"])
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 4
    best = Completion.model_validate(by_id["c-best"]["response"]["body"])
    assert len(best.choices) == 1


def test_native_lines_carry_chat_scoring_and_choices(corpus_out):
    by_id = {r["id"]: r for r in corpus_out["native-mixed.jsonl"]}
    assert by_id["n-1"]["metadata"] == {"source": "web"}
    assert by_id["n-3"]["text"] == "Scoring me" and by_id["n-3"]["logprobs"]["tokens"]
    assert [c["index"] for c in by_id["n-4"]["choices"]] == [0, 1]
    assert len(by_id[5]["logprobs"]["tokens"]) == by_id[5]["usage"]["completion_tokens"]


def test_a_mixed_file_gives_the_same_records_at_two_batch_sizes(tmp_path, tiny_dir):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"".join((CORPUS / name).read_bytes() for name in FILES))
    runs = []
    for batch_size in (3, 16):  # best_of 3 needs three rows at once
        out = tmp_path / f"out-{batch_size}.jsonl"
        result = run_cli(mixed, out, "--model", tiny_dir, "--batch-size", batch_size)
        assert result.exit_code == 0, result.output
        runs.append(sorted((_comparable(r) for r in read_jsonl(out)), key=orjson.dumps))
    assert runs[0] == runs[1]


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what differs by run: timing, window, random ids, the clock."""
    record = {k: v for k, v in record.items() if k not in ("timing", "window", "id")}
    if "response" in record:
        body = dict(record["response"]["body"])
        for key in ("id", "created"):
            body.pop(key, None)
        record = {"custom_id": record["custom_id"], "body": body}
    return record


def test_resume_refuses_a_file_of_openai_request_lines(tmp_path, tiny_dir):
    """Defect 1: a request line is not a result; --resume must not append to it."""
    requests = CORPUS / "completions-requests.jsonl"
    wrong_output = tmp_path / "requests-copy.jsonl"
    wrong_output.write_bytes(requests.read_bytes())
    before = wrong_output.read_bytes()
    result = run_cli(requests, wrong_output, "--model", tiny_dir, "--resume")
    assert result.exit_code == 1
    assert "not a batchgen output line" in result.output
    assert wrong_output.read_bytes() == before


def test_unreadable_lines_of_an_openai_file_get_openai_error_lines(tmp_path, tiny_dir):
    """Defect 2: every line written for an OpenAI-form file parses as a batch output line."""
    lines = (CORPUS / "completions-requests.jsonl").read_bytes().splitlines()[:2]
    no_id = b'{"method": "POST", "url": "/v1/completions", "body": {"prompt": "no id"}}'
    lines += [b'{"custom_id": "torn", "body": {"prompt": "x"', b"[1, 2]", no_id]
    job = tmp_path / "in.jsonl"
    job.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    assert run_cli(job, out, "--model", tiny_dir).exit_code == 3
    records = read_jsonl(out)
    assert len(records) == 5
    errors = [check_openai_line(r) for r in records if r["response"]["status_code"] != 200]
    assert len(errors) == 3 and all(isinstance(e, ErrorObject) for e in errors)
    custom_ids = {r["custom_id"] for r in records}
    assert {"batchgen-line-3", "batchgen-line-4", "batchgen-line-5"} <= custom_ids
    # Resume reads them back as batchgen's and leaves the file as it is.
    before = out.read_bytes()
    assert run_cli(job, out, "--model", tiny_dir, "--resume").exit_code == 3
    assert out.read_bytes() == before


def test_chat_lines_through_a_custom_jinja_template(tmp_path, tiny_dir, tokenizer):
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    out = tmp_path / "out.jsonl"
    chat = CORPUS / "chat-with-system.jsonl"
    result = run_cli(chat, out, "--model", tiny_dir, "--chat-template", template)
    assert result.exit_code == 0, result.output
    first = ChatCompletion.model_validate(read_jsonl(out)[0]["response"]["body"])
    rendered = "<|system|>You are a helpful assistant.\n<|user|>Hello world\n<|assistant|>"
    assert first.usage.prompt_tokens == len(tokenizer(rendered).input_ids)


def test_a_missing_model_fails_at_once_and_dry_run_says_so(tmp_path):
    """Defect 3: no Hub retries, one line naming what to do; --dry-run resolves the model."""
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "out.jsonl"\nmodel = "models/tiny-gpt2"\n')
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    for extra in ((), ("--dry-run",)):
        result = run_cli("--job", job, *extra)
        assert result.exit_code == 1, result.output
        assert "random-model" in result.output and "models/tiny-gpt2" in result.output
    assert not (tmp_path / "out.jsonl").exists()


ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def _shaped_files() -> list[tuple[str, tuple[str, ...], list[dict[str, Any]]]]:
    """(corpus file, its options, the native lines it stands for), each built here by hand."""
    import pyarrow.parquet as pq

    text = (CORPUS / "prompts.txt").read_text().splitlines()
    prompts = [{"id": n, "prompt": t} for n, t in enumerate(text, start=1) if t.strip()]
    alpaca = orjson.loads((CORPUS / "alpaca.json").read_bytes())
    instructions = [
        {"id": n, "prompt": ALPACA.format(**row), "metadata": row}
        for n, row in enumerate(alpaca, start=1)
    ]
    questions = [
        {"id": row["id"], "prompt": row["question"],
         "metadata": {k: v for k, v in row.items() if k not in ("id", "question") and v}}
        for row in pq.read_table(CORPUS / "questions.parquet").to_pylist()
    ]  # fmt: skip
    return [
        ("prompts.txt", (), prompts),
        ("alpaca.json", ("--prompt-template", ALPACA), instructions),
        ("questions.parquet", ("--prompt-field", "question"), questions),
    ]


@pytest.mark.parametrize("name, options, native", _shaped_files(), ids=lambda v: str(v)[:20])
def test_rows_of_other_shapes_give_the_records_of_their_native_lines(
    tmp_path, tiny_dir, name, options, native
):
    out = tmp_path / "out.jsonl"
    result = run_cli(CORPUS / name, out, "--model", tiny_dir, *options)
    assert result.exit_code == 0, result.output
    native_in, native_out = tmp_path / "native.jsonl", tmp_path / "native-out.jsonl"
    native_in.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in native))
    assert run_cli(native_in, native_out, "--model", tiny_dir).exit_code == 0
    shaped, expected = read_jsonl(out), read_jsonl(native_out)
    assert len(shaped) == len(native) >= 5
    key = operator.itemgetter("id")
    assert [_comparable(r) | {"id": r["id"]} for r in sorted(shaped, key=key)] == [
        _comparable(r) | {"id": r["id"]} for r in sorted(expected, key=key)
    ]


def test_a_parquet_job_resumes_and_shards_as_a_jsonl_one(tmp_path, tiny_dir):
    parquet = CORPUS / "questions.parquet"
    field = ("--prompt-field", "question")
    full = tmp_path / "full.jsonl"
    assert run_cli(parquet, full, "--model", tiny_dir, *field).exit_code == 0
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(full.read_bytes().splitlines(keepends=True)[:2]))
    assert run_cli(parquet, cut, "--model", tiny_dir, *field, "--resume").exit_code == 0
    assert sorted(map(_comparable, read_jsonl(cut)), key=orjson.dumps) == sorted(
        map(_comparable, read_jsonl(full)), key=orjson.dumps
    )
    parts = [tmp_path / f"part-{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        assert (
            run_cli(parquet, part, "--model", tiny_dir, *field, "--shard", f"{i}/2").exit_code == 0
        )
    assert all(read_jsonl(part) for part in parts)  # each shard holds some of the rows
    ids = sorted(r["id"] for part in parts for r in read_jsonl(part))
    assert ids == sorted(r["id"] for r in read_jsonl(full))


def test_a_prompt_field_a_row_lacks_is_its_error_line(tmp_path, tiny_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "question": "Why?"}\n{"id": "b", "query": "Who?"}\n')
    out = tmp_path / "out.jsonl"
    result = run_cli(rows, out, "--model", tiny_dir, "--prompt-field", "question")
    assert result.exit_code == 3, result.output
    by_id = {r["id"]: r for r in read_jsonl(out)}
    assert by_id["a"]["text"] and by_id["b"]["error"]["field"] == "question"
    both = run_cli(rows, out, "--prompt-field", "q", "--prompt-template", "{q}", "--overwrite")
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_dry_run_checks_every_line_without_the_model(tmp_path, tiny_dir):
    lines = (CORPUS / "chat-with-system.jsonl").read_bytes().splitlines()
    lines += [b'{"id": "x", "prompt": "ok"}', b'{"id": "x", "prompt": "again"}', b"{torn",
              b'{"id": "n", "prompt": "hi", "n": 40}']  # fmt: skip
    job = tmp_path / "in.jsonl"
    job.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(job, out, "--model", tiny_dir, "--dry-run")
    assert result.exit_code == 3, result.output
    report = orjson.loads(result.stdout)["lines"]
    assert (report["read"], report["would_run"], report["would_fail"]) == (8, 5, 3)
    assert [(p["line"], p["field"]) for p in report["first_problems"]] == [
        (6, "id"),
        (7, None),
        (8, "n"),
    ]
    assert "16" in report["first_problems"][2]["message"]  # the cap is stated
    assert not out.exists()
    # What OUTPUT holds and other shards' lines are skipped, as the run would skip them.
    out.write_bytes(b"")
    assert run_cli(job, out, "--model", tiny_dir, "--max-tokens", 2, "--overwrite").exit_code == 3
    before = out.read_bytes()
    resumed = run_cli(job, out, "--model", tiny_dir, "--dry-run", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert orjson.loads(resumed.stdout)["lines"]["skipped"] == 8
    assert out.read_bytes() == before
    clean = run_cli(CORPUS / "chat-with-system.jsonl", tmp_path / "o.jsonl", "--model", tiny_dir,
                    "--dry-run", "--shard", "0/2")  # fmt: skip
    assert clean.exit_code == 0, clean.output
    shard = orjson.loads(clean.stdout)["lines"]
    assert shard["would_run"] + shard["skipped"] == shard["read"] == 4 and shard["skipped"]


def test_a_job_file_takes_the_input_format_and_row_keys(tmp_path, tiny_dir):
    (tmp_path / "questions.parquet").write_bytes((CORPUS / "questions.parquet").read_bytes())
    job = tmp_path / "job.toml"
    job.write_text(
        f'input = "questions.parquet"\noutput = "out.jsonl"\nmodel = "{tiny_dir}"\n'
        'prompt_field = "question"\norder = "input"\nerrors = "errors.jsonl"\ndevice = "cpu"\n'
    )
    plan = run_cli("--job", job, "--dry-run")
    assert plan.exit_code == 0, plan.output
    resolved = orjson.loads(plan.stdout)
    assert resolved["run"]["prompt_field"] == "question" and resolved["lines"]["would_run"] == 6
    assert resolved["errors"] == str(tmp_path / "errors.jsonl")
    assert run_cli("--job", job).exit_code == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [101, 102, 103, 104, 105, 106]
