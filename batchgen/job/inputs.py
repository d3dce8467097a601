"""Input lines -> requests: the native and OpenAI batch line forms, checked field by field."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from batchgen.engine.sampling import ParamError, SamplingParams, derive_seed
from batchgen.job.ledger import JsonId, is_id

Form = Literal["native", "openai"]

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
_INTEGER_FIELDS = ("max_tokens", "top_k", "seed")
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed")
_NATIVE_FIELDS = {"id", "prompt", "stop", "ignore_eos", "metadata", *_SAMPLING_FIELDS}
_BOM = b"\xef\xbb\xbf"


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
    seed: int | None = None  # base seed: lines without one get a seed derived from it and id


@dataclass(frozen=True)
class JobLine:
    """One valid input line: a prompt and how to decode it."""

    line: int
    id: JsonId
    form: Form
    prompt: str | list[int]
    params: SamplingParams
    metadata: Any = None

    def error(self, field: str | None, message: str) -> LineError:
        """This line's error line."""
        return LineError(self.line, self.id, self.form, field, message)


@dataclass(frozen=True)
class LineError:
    """A line that cannot run; it still gets an output line.

    `field` is named as the request spells it: a native field, or for OpenAI lines the body
    field (as OpenAI's own `param` does) or a batch-line field such as `custom_id`.
    """

    line: int
    id: JsonId | None
    form: Form
    field: str | None
    message: str


def read_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, bytes) for every non-blank line, reading lazily.

    A UTF-8 byte-order mark at the start of the file is skipped; CRLF line ends are fine.
    """
    for number, raw in enumerate(stream, start=1):
        if number == 1:
            raw = raw.removeprefix(_BOM)
        if raw.strip():
            yield number, raw


def count_lines(path: Path) -> int:
    """Non-blank lines in a file (for the progress bar)."""
    with path.open("rb") as stream:
        return sum(1 for _ in read_lines(stream))


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
    except Exception as error:  # noqa: BLE001 - one odd line must never end the job
        return LineError(number, line_id, form, None, f"cannot be read: {error}")


def _id_of(record: dict[str, Any], form: Form, number: int) -> JsonId | None:
    """The line's id if it is usable, for error lines too."""
    key = "custom_id" if form == "openai" else "id"
    value = record.get(key, None if form == "openai" else number)
    return value if is_id(value) else None


def _parse_native(number: int, record: dict[str, Any], defaults: Defaults) -> JobLine:
    unknown = sorted(set(record) - _NATIVE_FIELDS)
    if unknown:
        raise FieldError(
            _cut(unknown[0]),
            f"is unknown (known: {', '.join(sorted(_NATIVE_FIELDS))}; "
            "put your own data under 'metadata')",
        )
    line_id = record.get("id", number)
    if not is_id(line_id):
        raise FieldError("id", "must be a string or an integer")
    metadata = record.get("metadata")
    try:
        orjson.dumps(metadata)
    except orjson.JSONEncodeError as error:
        raise FieldError("metadata", f"cannot be written back as JSON: {error}") from None
    return _job_line(number, line_id, "native", record, defaults, metadata)


def _parse_openai(number: int, record: dict[str, Any], defaults: Defaults) -> JobLine:
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str):
        raise FieldError("custom_id", "must be a string")
    if record.get("method", "POST") != "POST":
        raise FieldError("method", 'must be "POST"')
    url = record.get("url", "/v1/completions")
    if url != "/v1/completions":
        raise FieldError(
            "url", f"must be /v1/completions (GPT-2 is a base model), not {_shown(url)}"
        )
    body = record.get("body")
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    for name in sorted(body):
        if name in _OPENAI_DEFAULTS and body[name] not in (_OPENAI_DEFAULTS[name], None):
            default = orjson.dumps(_OPENAI_DEFAULTS[name]).decode()
            raise FieldError(name, f"is not supported: only {default} is")
        known = name in _OPENAI_DEFAULTS or name in _OPENAI_IGNORED
        if not known and name not in {"prompt", "stop", *_SAMPLING_FIELDS}:
            raise FieldError(_cut(name), "is unknown")
    return _job_line(number, custom_id, "openai", body, defaults, None)


def _job_line(
    number: int,
    line_id: JsonId,
    form: Form,
    fields: dict[str, Any],
    defaults: Defaults,
    metadata: Any,
) -> JobLine:
    prompt = _prompt(fields)
    # null means "not given", as in OpenAI's and vLLM's request models.
    given = {name: value for name, value in fields.items() if value is not None}
    overrides: dict[str, Any] = {
        name: _number(name, given[name]) for name in _SAMPLING_FIELDS if name in given
    }
    if "ignore_eos" in given:
        if not isinstance(given["ignore_eos"], bool):
            raise FieldError("ignore_eos", "must be true or false")
        overrides["ignore_eos"] = given["ignore_eos"]
    if "stop" in given:
        overrides["stop"] = _stop(given["stop"])
    if "seed" not in overrides and defaults.seed is not None:
        overrides["seed"] = derive_seed(defaults.seed, line_id)
    try:
        params = replace(defaults.params, **overrides)
    except ParamError as error:
        raise FieldError(error.field, f"is out of range: {_shown(error.value)}") from None
    return JobLine(number, line_id, form, prompt, params, metadata)


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


def _number(name: str, value: Any) -> int | float:
    """A finite number; integer fields also take integral floats (16.0), as pydantic does."""
    if name in _INTEGER_FIELDS:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not _is_int(value):
            raise FieldError(name, f"must be an integer, not {_shown(value)}")
        return value
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise FieldError(name, f"must be a finite number, not {_shown(value)}")
    return float(value)


def _stop(stop: Any) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, list | tuple) or not all(isinstance(s, str) for s in strings):
        raise FieldError("stop", "must be a string or a list of strings")
    if not all(strings):
        raise FieldError("stop", "must not contain an empty string")
    return tuple(strings)


def _shown(value: Any) -> str:
    """A value as JSON for an error message, cut short: the line itself may be huge."""
    try:
        return _cut(orjson.dumps(value).decode())
    except orjson.JSONEncodeError:
        return f"a {type(value).__name__} nested too deep"


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
