"""Input lines -> requests, and length-grouped batching (no model needed)."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from batchgen.engine import Request, SamplingParams
from batchgen.engine.sampling import derive_seed
from batchgen.job import sources
from batchgen.job.batching import JobRequest, pack
from batchgen.job.inputs import Defaults, JobLine, LineError, parse_line
from batchgen.job.sources import read_lines

DEFAULTS = Defaults(SamplingParams(max_tokens=12, temperature=0.5, stop=("\n",)), seed=None)

# (line, the field its error must name); None: the line is not a JSON object at all.
MALFORMED = [
    (b'{"prompt": "hi"', None),
    (b'["a list"]', None),
    (b'"just a string"', None),
    (b'{"id": "x"}', "prompt"),
    (b'{"prompt": ""}', "prompt"),
    (b'{"prompt": 42}', "prompt"),
    (b'{"prompt": [["a"], "b"]}', "prompt"),
    (b'{"prompt": "hi", "max_tokens": "ten"}', "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 0}', "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 2.5}', "max_tokens"),
    (b'{"prompt": "hi", "temperature": -1}', "temperature"),
    (b'{"prompt": "hi", "temperature": "warm"}', "temperature"),
    (b'{"prompt": "hi", "top_p": 0}', "top_p"),
    (b'{"prompt": "hi", "top_k": -3}', "top_k"),
    (b'{"prompt": "hi", "seed": -1}', "seed"),
    (b'{"prompt": "hi", "stop": [1]}', "stop"),
    (b'{"prompt": "hi", "stop": ["a", ""]}', "stop"),
    (b'{"prompt": "hi", "temperature": 1e308}', "temperature"),
    (b'{"prompt": "hi", "top_p": 1e-320}', "top_p"),
    (b'{"prompt": "hi", "id": [1]}', "id"),
    (b'{"prompt": "hi", "max_token": 5}', "max_token"),
    (b'{"custom_id": 5, "body": {"prompt": "hi"}}', "custom_id"),
    (b'{"custom_id": "r", "method": "GET", "body": {"prompt": "hi"}}', "method"),
    (b'{"custom_id": "r", "url": "/v1/embeddings", "body": {}}', "url"),
    (b'{"custom_id": "r", "url": "/v1/chat/completions", "body": {}}', "messages"),
    (b'{"custom_id": "r", "body": "hi"}', "body"),
    (b'{"custom_id": "r", "body": {"prompt": "hi", "n": 17}}', "n"),
    (b'{"custom_id": "r", "body": {"prompt": "hi", "logprobs": 21}}', "logprobs"),
    (b'{"custom_id": "r", "body": {"prompt": "hi", "suffix": "x"}}', "suffix"),
    (b'{"custom_id": "r", "body": {"prompt": "hi", "stream": true}}', "stream"),
    (b'{"custom_id": "r", "body": {"prompt": "hi", "n": 3, "best_of": 2}}', "best_of"),
    (b'{"custom_id": "r", "body": {"prompt": "hi", "logit_bias": {"x": 1}}}', "logit_bias"),
    (
        b'{"custom_id": "r", "body": {"messages": [{"role": "user", "content": "x"}], '
        b'"tools": []}}',
        "tools",
    ),
    (
        b'{"custom_id": "r", "body": {"messages": [{"role": "user", '
        b'"content": [{"type": "image_url"}]}]}}',
        "messages.0.content",
    ),
    (
        b'{"custom_id": "r", "body": {"messages": [{"role": "robot", "content": "x"}]}}',
        "messages.0.role",
    ),
    (
        b'{"custom_id": "r", "body": {"messages": [{"role": "user", "content": "x"}], '
        b'"top_logprobs": 2}}',
        "top_logprobs",
    ),
    (b'{"custom_id": "r", "body": {"prompt": "hi", "max_tokens": "x"}}', "max_tokens"),
    (b'{"custom_id": "r", "body": {"messages": []}}', "messages"),
    (b'{"custom_id": "r", "body": {"model": "gpt2"}}', "prompt"),
]


@pytest.mark.parametrize(("raw", "field"), MALFORMED)
def test_malformed_lines_name_their_field(raw: bytes, field: str | None):
    error = parse_line(7, raw, DEFAULTS)
    assert isinstance(error, LineError)
    assert error.line == 7
    assert error.field == field
    if field is not None:
        assert f"'{field}'" in error.message


def test_native_line_overrides_defaults_and_id_defaults_to_line_number():
    job = parse_line(3, b'{"prompt": "hi", "top_k": 40, "stop": ["a", "b"]}', DEFAULTS)
    assert isinstance(job, JobLine)
    assert job.id == 3 and job.form == "native"
    assert job.params == SamplingParams(max_tokens=12, temperature=0.5, top_k=40, stop=("a", "b"))
    token_ids = parse_line(4, b'{"id": "t", "prompt": [1, 2], "metadata": {"k": 1}}', DEFAULTS)
    assert token_ids.prompt == [1, 2] and token_ids.metadata == {"k": 1}
    assert token_ids.params.stop == ("\n",)


def test_null_means_default_and_integral_floats_are_integers():
    """As OpenAI's and vLLM's request models read them (pydantic: Optional, lax int)."""
    raw = b'{"prompt": "hi", "max_tokens": 16.0, "temperature": null, "top_k": null, "stop": null}'
    job = parse_line(1, raw, DEFAULTS)
    assert job.params == SamplingParams(max_tokens=16, temperature=0.5, stop=("\n",))
    assert isinstance(job.params.max_tokens, int)


def test_read_lines_skips_a_bom_and_blank_lines_and_takes_crlf():
    stream = io.BytesIO(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n  \n{"prompt": "b"}\r\n')
    lines = list(read_lines(stream))
    assert [n for n, _ in lines] == [1, 4]
    assert [parse_line(n, raw, DEFAULTS).prompt for n, raw in lines] == ["a", "b"]


def test_longest_first_flushes_each_window_so_no_request_is_carried_to_the_end():
    """Continuous batching has no batches to fill: a short request read first starts within
    its own window, not after every later window (it would starve, and --order input wait)."""
    items = [job_request(1, 3, max_tokens=8)] + [job_request(n, 3, 16) for n in range(2, 41)]
    order = [r.job.line for g in pack(iter(items), 4, 5, longest_first=True) for r in g]
    assert sorted(order) == list(range(1, 41))
    assert order.index(1) < 5
    static = [r.job.line for g in pack(iter(items), 4, 5) for r in g]
    assert sorted(static) == list(range(1, 41))


def test_openai_batch_line():
    raw = orjson.dumps(
        {
            "custom_id": "req-1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": "gpt2",
                "prompt": "hi",
                "max_tokens": 5,
                "seed": 9,
                "stop": "x",
                "n": 1,
                "logprobs": None,
                "user": "u",
            },
        }
    )
    job = parse_line(1, raw, DEFAULTS)
    assert isinstance(job, JobLine)
    assert (job.id, job.form) == ("req-1", "openai")
    assert job.params == SamplingParams(max_tokens=5, temperature=0.5, seed=9, stop=("x",))


def test_base_seed_gives_each_line_its_own_reproducible_seed():
    defaults = Defaults(seed=1)
    a = parse_line(1, b'{"id": "a", "prompt": "x"}', defaults).params.seed
    b = parse_line(2, b'{"id": "b", "prompt": "x"}', defaults).params.seed
    assert a == derive_seed(1, "a") != b == derive_seed(1, "b")
    assert a != derive_seed(2, "a")
    own = parse_line(3, b'{"id": "c", "prompt": "x", "seed": 5}', defaults).params.seed
    assert own == 5


def job_request(number: int, length: int, max_tokens: int = 4) -> JobRequest:
    job = JobLine(number, number, "native", "x", SamplingParams(max_tokens))
    return JobRequest(job, Request([1] * length, job.params))


def test_pack_groups_by_length_within_window_and_reads_lazily():
    lengths = [9, 1, 5, 3, 8, 2, 7, 4, 6, 10, 1, 2]
    pulled = 0

    def source():
        nonlocal pulled
        for number, length in enumerate(lengths, start=1):
            pulled += 1
            yield job_request(number, length)
            if number == 6:
                yield LineError(number, None, "native", None, "bad")

    batches = pack(source(), batch_size=2, window=4)
    first = next(batches)
    assert pulled == 4  # only a window was read before the first batch came out
    rest = list(batches)
    errors = [b for b in rest if isinstance(b, LineError)]
    groups = [first, *(b for b in rest if not isinstance(b, LineError))]
    assert len(errors) == 1
    assert sorted(r.job.line for g in groups for r in g) == list(range(1, 13))
    assert all(1 <= len(g) <= 2 for g in groups)
    assert [r.length for r in first] == [1, 3]  # the shortest two of the first window


CORPUS = Path(__file__).parent / "corpus"


def test_a_text_file_is_one_prompt_per_line_numbered_as_the_file():
    stream = io.BytesIO(b"The sky is\r\n\nQ: 2+2?\tA: \n\xff not text\n")
    lines = list(sources.read_input(stream, "text"))
    assert [n for n, _ in lines] == [1, 3, 4]
    jobs = [parse_line(n, raw, DEFAULTS) for n, raw in lines]
    assert [(j.id, j.prompt) for j in jobs[:2]] == [(1, "The sky is"), (3, "Q: 2+2?\tA: ")]
    assert isinstance(jobs[2], LineError)
    assert jobs[2].message == "not UTF-8 text (byte 0 is 0xff)"


def test_a_json_array_is_numbered_by_row_and_anything_else_is_refused():
    rows = [{"prompt": "a"}, {"id": "x", "prompt": "b"}]
    lines = list(sources.read_input(io.BytesIO(orjson.dumps(rows)), "json"))
    assert [(n, orjson.loads(raw)) for n, raw in lines] == [(1, rows[0]), (2, rows[1])]
    with pytest.raises(sources.InputError, match="not an array"):
        sources.read_input(io.BytesIO(b'{"prompt": "a"}'), "json")
    with pytest.raises(sources.InputError, match="not valid JSON"):
        sources.read_input(io.BytesIO(b'{"prompt": "a"}\n{"prompt": "b"}\n'), "json")


def test_a_parquet_file_streams_in_record_batches_numbered_by_row(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    ids = list(range(2500))
    labels = [None if i % 7 == 0 else f"l{i}" for i in ids]
    pq.write_table(pa.table({"id": ids, "text": [f"p{i}" for i in ids], "label": labels}), path)
    read: list[int] = []
    batches = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        for batch in batches(self, *args, **kwargs):
            read.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    with path.open("rb") as stream:
        lines = list(sources.read_input(stream, "parquet"))
    assert read == [1024, 1024, 452]  # never the whole file at once
    assert [n for n, _ in lines] == [i + 1 for i in ids]
    assert orjson.loads(lines[7][1]) == {"id": 7, "text": "p7"}  # a null is a field not given
    assert orjson.loads(lines[8][1]) == {"id": 8, "text": "p8", "label": "l8"}
    assert sources.count_lines(path, "parquet") == 2500
    with pytest.raises(sources.InputError, match="not a Parquet file"):
        sources.read_input(io.BytesIO(b'{"prompt": "a"}\n'), "parquet")


def test_the_format_follows_the_suffix_unless_given():
    assert sources.input_format(Path("a.TXT")) == "text"
    assert sources.input_format(Path("a.parquet")) == "parquet"
    assert sources.input_format(Path("a.json")) == "json"
    assert sources.input_format(Path("a.jsonl")) == "jsonl"
    assert sources.input_format(None) == "jsonl"
    assert sources.input_format(Path("a.txt"), "jsonl") == "jsonl"


def test_a_prompt_field_takes_the_prompt_and_keeps_the_rest_as_metadata():
    shape = Defaults(DEFAULTS.params, shape=sources.RowShape(prompt_field="question"))
    row = {"id": "q1", "question": "Why?", "answer": "Because.", "max_tokens": 3}
    job = parse_line(4, orjson.dumps(row), shape)
    assert isinstance(job, JobLine)
    assert (job.id, job.prompt, job.metadata) == (
        "q1",
        "Why?",
        {"answer": "Because.", "max_tokens": 3},
    )
    assert job.params == DEFAULTS.params  # a row's fields are data, not sampling fields
    unnamed = parse_line(5, orjson.dumps({"question": "Who?"}), shape)
    assert (unnamed.id, unnamed.metadata) == (5, None)
    missing = parse_line(6, orjson.dumps({"id": "q3", "text": "What?"}), shape)
    assert isinstance(missing, LineError)
    assert (missing.id, missing.field) == ("q3", "question")
    assert "--prompt-field" in missing.message
    for bad in (5, ""):  # named as the row names it
        wrong = parse_line(8, orjson.dumps({"id": "q9", "question": bad}), shape)
        assert wrong.field == "question" and wrong.message.startswith("field 'question'")
    openai_like = parse_line(7, orjson.dumps({"custom_id": "c", "question": "Q?"}), shape)
    assert (openai_like.form, openai_like.metadata) == ("native", {"custom_id": "c"})


def test_a_prompt_template_formats_the_row_as_python_formats_it():
    template = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    shape = Defaults(DEFAULTS.params, shape=sources.RowShape(prompt_template=template))
    rows = orjson.loads((CORPUS / "alpaca.json").read_bytes())
    for number, row in enumerate(rows, start=1):
        job = parse_line(number, orjson.dumps(row), shape)
        assert (job.id, job.prompt, job.metadata) == (number, template.format(**row), row)
    missing = parse_line(9, orjson.dumps({"instruction": "Do it.", "input": None}), shape)
    assert (missing.field, missing.id) == ("input", 9)
    nested = Defaults(shape=sources.RowShape(prompt_template="Q: {doc[title]}"))
    assert parse_line(1, b'{"doc": {"title": "T"}}', nested).prompt == "Q: T"
    bad = parse_line(2, b'{"doc": "a string"}', nested)
    assert (bad.field, "--prompt-template" in bad.message) == ("prompt", True)
    for template in ("no fields", "{{instruction}}"):  # Jinja's braces are literal here
        with pytest.raises(ValueError, match="names no field"):
            sources.RowShape(prompt_template=template)
    for template in ("Q: {q} {}", "{0}", "{q!x}"):
        with pytest.raises(ValueError, match="--prompt-template"):
            sources.RowShape(prompt_template=template)
    with pytest.raises(ValueError, match="--prompt-template 'Q: {question': "):
        sources.RowShape(prompt_template="Q: {question")
    with pytest.raises(ValueError, match="one of"):
        sources.RowShape("prompt", "{prompt}")


def test_a_value_out_of_range_is_told_with_its_range():
    error = parse_line(1, b'{"prompt": "hi", "top_p": 1e-320}', DEFAULTS)
    assert isinstance(error, LineError) and error.field == "top_p"
    assert error.message == "field 'top_p' is out of range: 1e-320 (allowed: above 0, up to 1)"
    with pytest.raises(ValueError, match=r"invalid n: 17 \(allowed: 1 to 16\)"):
        SamplingParams(n=17)
