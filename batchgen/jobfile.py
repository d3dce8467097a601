"""Job files: parse input JSONL lines (native or OpenAI batch form), format and write results."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from batchgen.sampling import ParamError, SamplingParams, derive_seed

Form = Literal["native", "openai"]
JsonId = str | int

# Body fields of an OpenAI completions request that batchgen cannot honour unless they hold
# their default value; anything else unknown is refused rather than silently ignored.
_OPENAI_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "stream": False,
    "logprobs": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "suffix": None,
}
_OPENAI_IGNORED = {"model", "user"}
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed")
_NATIVE_FIELDS = {"id", "prompt", "stop", "ignore_eos", "metadata", *_SAMPLING_FIELDS}


class FieldError(ValueError):
    """A line's field is missing, wrongly typed or out of range."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}' {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Defaults:
    """Command-line defaults that a line's own fields override."""

    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    seed: int | None = None  # base seed: lines without one get a seed derived from it and id


@dataclass(frozen=True)
class JobLine:
    """One valid input line: a prompt and how to decode it."""

    line: int
    id: JsonId
    form: Form
    prompt: str | list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    metadata: Any = None
    model: str | None = None  # the OpenAI body's model, echoed back


@dataclass(frozen=True)
class LineError:
    """A line that cannot run; it still gets an output line."""

    line: int
    id: JsonId | None
    form: Form
    field: str | None
    message: str


def read_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, bytes) for every non-blank line, reading lazily."""
    for number, raw in enumerate(stream, start=1):
        if raw.strip():
            yield number, raw


def parse_line(number: int, raw: bytes, defaults: Defaults) -> JobLine | LineError:
    """Turn one input line into a JobLine, or a LineError that names the bad field."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        return LineError(number, None, "native", None, f"not valid JSON: {error}")
    if not isinstance(record, dict):
        return LineError(number, None, "native", None, "a line must be a JSON object")
    form: Form = "openai" if "custom_id" in record or "body" in record else "native"
    line_id = _id_of(record, form, number)
    try:
        if form == "openai":
            return _parse_openai(number, record, defaults)
        return _parse_native(number, record, defaults)
    except FieldError as error:
        return LineError(number, line_id, form, error.field, str(error))


def _id_of(record: dict[str, Any], form: Form, number: int) -> JsonId | None:
    """The line's id if it is usable, for error lines too."""
    key = "custom_id" if form == "openai" else "id"
    value = record.get(key, None if form == "openai" else number)
    return value if _is_id(value) else None


def _parse_native(number: int, record: dict[str, Any], defaults: Defaults) -> JobLine:
    unknown = sorted(set(record) - _NATIVE_FIELDS)
    if unknown:
        raise FieldError(
            unknown[0],
            f"is unknown (known: {', '.join(sorted(_NATIVE_FIELDS))}; "
            "put your own data under 'metadata')",
        )
    line_id = record.get("id", number)
    if not _is_id(line_id):
        raise FieldError("id", "must be a string or an integer")
    return _job_line(number, line_id, "native", record, defaults, record.get("metadata"))


def _parse_openai(number: int, record: dict[str, Any], defaults: Defaults) -> JobLine:
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str):
        raise FieldError("custom_id", "must be a string")
    if record.get("method", "POST") != "POST":
        raise FieldError("method", 'must be "POST"')
    url = record.get("url", "/v1/completions")
    if url != "/v1/completions":
        raise FieldError("url", f"must be /v1/completions (GPT-2 is a base model), not {url!r}")
    body = record.get("body")
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    for name in sorted(body):
        if name in _OPENAI_DEFAULTS and body[name] not in (_OPENAI_DEFAULTS[name], None):
            default = orjson.dumps(_OPENAI_DEFAULTS[name]).decode()
            raise FieldError(f"body.{name}", f"is not supported: only {default} is")
        known = name in _OPENAI_DEFAULTS or name in _OPENAI_IGNORED
        if not known and name not in {"prompt", "stop", *_SAMPLING_FIELDS}:
            raise FieldError(f"body.{name}", "is unknown")
    model = body.get("model")
    try:
        return _job_line(number, custom_id, "openai", body, defaults, None, model)
    except FieldError as error:
        raise FieldError(f"body.{error.field}", error.problem) from None


def _job_line(
    number: int,
    line_id: JsonId,
    form: Form,
    fields: dict[str, Any],
    defaults: Defaults,
    metadata: Any,
    model: str | None = None,
) -> JobLine:
    prompt = _prompt(fields)
    overrides = {name: _number(fields, name) for name in _SAMPLING_FIELDS if name in fields}
    if "ignore_eos" in fields:
        if not isinstance(fields["ignore_eos"], bool):
            raise FieldError("ignore_eos", "must be true or false")
        overrides["ignore_eos"] = fields["ignore_eos"]
    if "seed" not in overrides and defaults.seed is not None:
        overrides["seed"] = derive_seed(defaults.seed, line_id)
    try:
        params = replace(defaults.params, **overrides)
    except ParamError as error:
        raise FieldError(error.field, f"is out of range: {error.value!r}") from None
    stop = _stop(fields) if "stop" in fields else defaults.stop
    return JobLine(number, line_id, form, prompt, params, stop, metadata, model)


def _prompt(fields: dict[str, Any]) -> str | list[int]:
    if "prompt" not in fields:
        raise FieldError("prompt", "is missing")
    prompt = fields["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise FieldError("prompt", "is empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return prompt  # already token ids, as the OpenAI API allows
    raise FieldError("prompt", "must be a non-empty string or a list of token ids")


def _number(fields: dict[str, Any], name: str) -> int | float:
    value = fields[name]
    integral = name in ("max_tokens", "top_k", "seed")
    ok = _is_int(value) if integral else _is_int(value) or isinstance(value, float)
    if not ok:
        kind = "an integer" if integral else "a number"
        raise FieldError(name, f"must be {kind}, not {orjson.dumps(value).decode()}")
    return value


def _stop(fields: dict[str, Any]) -> tuple[str, ...]:
    stop = fields["stop"]
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise FieldError("stop", "must be a string or a list of strings")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) or _is_int(value)


@dataclass(frozen=True)
class Result:
    """What one line produced, ready to be written."""

    job: JobLine
    text: str
    finish_reason: str
    prompt_tokens: int
    token_ids: list[int]
    batch: dict[str, Any]


def result_record(result: Result, model: str, with_token_ids: bool) -> dict[str, Any]:
    """The output line for a finished request, in the form of its input line."""
    job = result.job
    completion_tokens = len(result.token_ids)
    if job.form == "native":
        record: dict[str, Any] = {
            "id": job.id,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": completion_tokens,
            },
            "batch": result.batch,
        }
        if with_token_ids:
            record["token_ids"] = result.token_ids
        if job.metadata is not None:
            record["metadata"] = job.metadata
        return record
    extra: dict[str, Any] = {"line": job.line, "batch": result.batch}
    if with_token_ids:
        extra["token_ids"] = result.token_ids
    body = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": job.model or model,
        "choices": [
            {
                "text": result.text,
                "index": 0,
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": result.prompt_tokens + completion_tokens,
        },
    }
    return _openai_line(job.id, 200, body, extra)


def error_record(error: LineError) -> dict[str, Any]:
    """The output line for a line that could not run."""
    if error.form == "native":
        return {
            "id": error.id,
            "line": error.line,
            "error": {"field": error.field, "message": error.message},
        }
    body = {
        "error": {
            "message": error.message,
            "type": "invalid_request_error",
            "param": error.field,
            "code": None,
        }
    }
    return _openai_line(error.id, 400, body, {"line": error.line})


def _openai_line(
    custom_id: JsonId | None, status: int, body: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
        "batchgen": extra,  # OpenAI readers ignore it; timing and the input line number
    }


@dataclass
class Done:
    """What an existing OUTPUT already accounts for: ids with results, lines with errors."""

    ids: set[JsonId] = field(default_factory=set)
    error_lines: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.ids) + len(self.error_lines)

    def covers(self, number: int, line_id: JsonId | None) -> bool:
        return number in self.error_lines or (line_id is not None and line_id in self.ids)


class OutputError(ValueError):
    """OUTPUT cannot be resumed: a line other than the last is not a batchgen output line."""


def scan_output(path: Path) -> Done:
    """Read what OUTPUT holds, cutting a torn last line (a crash mid-write) off the file."""
    done = Done()
    keep = 0  # bytes of the file made of whole records
    newline_missing = False
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                if raw.endswith(b"\n"):
                    raise OutputError(f"{path}:{number}: not a JSON line; cannot resume") from None
                break  # the torn last line: dropped, its request runs again
            _account(done, record, path, number)
            keep += len(raw)
            newline_missing = not raw.endswith(b"\n")
    with path.open("r+b") as stream:
        stream.truncate(keep)
        if newline_missing:  # a whole last record whose newline never made it
            stream.seek(keep)
            stream.write(b"\n")
    return done


def _account(done: Done, record: Any, path: Path, number: int) -> None:
    if not isinstance(record, dict):
        raise OutputError(f"{path}:{number}: not a batchgen output line; cannot resume")
    if "custom_id" in record:
        status = (record.get("response") or {}).get("status_code")
        line = (record.get("batchgen") or {}).get("line")
        if status == 200:
            done.ids.add(record["custom_id"])
        elif isinstance(line, int):
            done.error_lines.add(line)
    elif "error" in record and isinstance(record.get("line"), int):
        done.error_lines.add(record["line"])
    elif "id" in record and "text" in record:
        done.ids.add(record["id"])
    else:
        raise OutputError(f"{path}:{number}: not a batchgen output line; cannot resume")


class JobWriter:
    """Appends output lines; each batch goes out in one write and is flushed at once."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream

    def write(self, records: list[dict[str, Any]]) -> None:
        if records:
            self._stream.write(b"".join(orjson.dumps(r) + b"\n" for r in records))
            self._stream.flush()
