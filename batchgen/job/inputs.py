"""Input lines -> requests: the native and OpenAI batch line forms, checked field by field."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from batchgen.engine.sampling import ParamError, SamplingParams, derive_seed
from batchgen.job import records
from batchgen.job.records import JsonId, is_id
from batchgen.job.sources import FieldError, RowShape

Form = Literal["native", "openai"]
# OpenAI request fields batchgen does not serve: refused by name, not as unknown fields.
_UNSUPPORTED = {
    "suffix": "is not supported (GPT-2 has no infilling)",
    "tools": "is not supported (no tool calling)",
    "tool_choice": "is not supported (no tool calling)",
    "functions": "is not supported (no tool calling)",
    "function_call": "is not supported (no tool calling)",
    "parallel_tool_calls": "is not supported (no tool calling)",
    "response_format": "is not supported (no structured output)",
    "stream_options": "is not supported (results are written whole)",
    "audio": "is not supported (text only)",
    "modalities": "is not supported (text only)",
}
# What a union field takes, said once (pydantic reports each branch apart).
_ALLOWED = {
    "prompt": "a non-empty string, a list of token ids, or a list of either",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
    "id": "a string or an integer",
}


@dataclass(frozen=True)
class Defaults:
    """How lines are read: command-line defaults that a line's own fields override, and the
    shape of rows that are data rather than requests."""

    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # base seed: lines without one get a seed derived from it and id
    shape: RowShape | None = None


@dataclass(frozen=True)
class JobLine:
    """One valid input line: a prompt (or prompts, or chat messages) and how to decode it."""

    line: int
    id: JsonId
    form: Form
    prompt: str | list[int] | list[str] | list[list[int]] | None  # None: chat messages
    params: SamplingParams
    metadata: Any = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, text) of a chat line
    echo: bool = False  # the completion's text (and logprobs) begin with the prompt's

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the line: one, or each of a prompt array."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return list(prompt)  # type: ignore[arg-type]
        return [prompt] if prompt is not None else []

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


def parse_line(
    number: int, raw: bytes, defaults: Defaults, form_hint: Form = "native"
) -> JobLine | LineError:
    """Turn one input line into a JobLine, or a LineError naming its bad fields (all at once).

    `form_hint`: the form of a line that cannot be read at all (the file's, as far as known).
    """
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as not_text:
            message = f"not UTF-8 text (byte {not_text.start} is {raw[not_text.start]:#04x})"
            return LineError(number, None, form_hint, None, message)
        return LineError(number, None, form_hint, None, f"not valid JSON: {error}")
    if not isinstance(record, dict):
        return LineError(number, None, form_hint, None, "a line must be a JSON object")
    openai = "custom_id" in record or "body" in record  # rows of a given shape are data
    form: Form = "openai" if openai and defaults.shape is None else "native"
    line_id = _id_of(record, form, number)
    try:
        if defaults.shape is not None:
            record = defaults.shape.line(record)
        if form == "openai":
            return _parse_openai(number, record, defaults)
        return _parse_native(number, record, defaults)
    except FieldError as error:
        return LineError(number, line_id, form, error.field, str(error))
    except ValidationError as error:
        field, message = _problems(error, records.NativeLine if form == "native" else None)
        source = defaults.shape.prompt_field if defaults.shape else None
        if source is not None and field == "prompt":  # the row's own name for it
            field, message = source, message.replace("field 'prompt'", f"field '{source}'")
        return LineError(number, line_id, form, field, message)
    except Exception as error:  # noqa: BLE001 - one odd line must never end the job
        return LineError(number, line_id, form, None, f"cannot be read: {error}")


def _id_of(record: dict[str, Any], form: Form, number: int) -> JsonId | None:
    """The line's id if it is usable, for error lines too."""
    key = "custom_id" if form == "openai" else "id"
    value = record.get(key, None if form == "openai" else number)
    if form == "openai" and not isinstance(value, str):
        return None  # OpenAI's custom_id is a string
    return value if is_id(value) else None


def _parse_native(number: int, record: dict[str, Any], defaults: Defaults) -> JobLine:
    _refuse_unsupported(record)
    line = records.NativeLine.model_validate(record)
    line_id = number if line.id is None else line.id
    try:
        orjson.dumps(line.metadata)
    except orjson.JSONEncodeError as error:
        raise FieldError("metadata", f"cannot be written back as JSON: {error}") from None
    if (line.prompt is None) == (line.messages is None):
        raise FieldError("prompt", "is missing: give a prompt or messages (one of them)")
    if line.messages is not None:
        return _chat_line(number, line_id, "native", line, defaults, line.metadata)
    return _completion_line(number, line_id, "native", line, defaults, line.metadata)


def _parse_openai(number: int, record: dict[str, Any], defaults: Defaults) -> JobLine:
    batch = records.BatchLine.model_validate(record)
    url = batch.url
    if "url" not in record and "messages" in batch.body:
        url = records.CHAT_URL  # OpenAI requires the url; a chat body says what it is
    _refuse_unsupported(batch.body)
    if url == records.COMPLETIONS_URL:
        body = records.CompletionBody.model_validate(batch.body)
        return _completion_line(number, batch.custom_id, "openai", body, defaults, None)
    if url == records.CHAT_URL:
        chat = records.ChatBody.model_validate(batch.body)
        return _chat_line(number, batch.custom_id, "openai", chat, defaults, None)
    served = f"{records.COMPLETIONS_URL} and {records.CHAT_URL}"
    if url in records.UNSUPPORTED_URLS:
        raise FieldError("url", f"{_shown(url)} is not supported: batchgen serves {served}")
    raise FieldError("url", f"must be {served}, not {_shown(url)}")


def _refuse_unsupported(fields: dict[str, Any]) -> None:
    for name in sorted(fields):
        if name in _UNSUPPORTED and fields[name] is not None:
            raise FieldError(name, _UNSUPPORTED[name])


def _completion_line(
    number: int,
    line_id: JsonId,
    form: Form,
    body: records.CompletionBody | records.NativeLine,
    defaults: Defaults,
    metadata: Any,
) -> JobLine:
    params = _params(body, defaults, line_id)
    echo = bool(body.echo)
    extra: dict[str, Any] = {"logprobs": body.logprobs}
    if echo and body.logprobs is not None:
        extra["prompt_logprobs"] = body.logprobs
    if body.best_of is not None:
        if body.best_of < params.n:
            raise FieldError("best_of", f"must be at least n ({params.n}), not {body.best_of}")
        extra["best_of"] = body.best_of
    params = _replace(params, extra)
    if params.max_tokens == 0 and not echo:
        raise FieldError("max_tokens", "is 0: only a scoring request (echo: true) may be")
    assert body.prompt is not None
    return JobLine(number, line_id, form, body.prompt, params, metadata, echo=echo)


def _chat_line(
    number: int,
    line_id: JsonId,
    form: Form,
    body: records.ChatBody | records.NativeLine,
    defaults: Defaults,
    metadata: Any,
) -> JobLine:
    params = _params(body, defaults, line_id)
    if params.max_tokens == 0:
        raise FieldError("max_tokens", "must be at least 1 for a chat reply")
    assert body.messages is not None
    if isinstance(body, records.ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise FieldError("top_logprobs", "needs logprobs: true")
        if body.logprobs:
            params = _replace(params, {"logprobs": body.top_logprobs or 0})
    elif body.echo or body.best_of is not None:
        raise FieldError("echo" if body.echo else "best_of", "goes with a prompt, not messages")
    elif body.logprobs is not None:
        params = _replace(params, {"logprobs": body.logprobs})
    messages = tuple((m.role, m.text) for m in body.messages)
    return JobLine(number, line_id, form, None, params, metadata, messages=messages)


def _params(body: records.Request, defaults: Defaults, line_id: JsonId) -> SamplingParams:
    """The line's sampling parameters: its own fields over the command line's defaults."""
    given = body.model_dump(exclude_none=True)
    if given.get("stream"):
        raise FieldError("stream", "is not supported: results are written whole (stream: false)")
    both = given.keys() >= {"max_tokens", "max_completion_tokens"}
    if both and given["max_tokens"] != given["max_completion_tokens"]:
        raise FieldError("max_completion_tokens", "and max_tokens differ: give one")
    overrides: dict[str, Any] = {
        name: given[name]
        for name in ("temperature", "top_k", "top_p", "seed", "n", "ignore_eos")
        if name in given
    }
    for name in ("max_completion_tokens", "max_tokens"):
        if name in given:
            overrides["max_tokens"] = given[name]
    for name in ("presence_penalty", "frequency_penalty"):
        if name in given:
            overrides[name] = float(given[name])
    if "temperature" in overrides:
        overrides["temperature"] = float(overrides["temperature"])
    if "top_p" in overrides:
        overrides["top_p"] = float(overrides["top_p"])
    if "stop" in given:
        stop = given["stop"]
        overrides["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    if "logit_bias" in given:
        overrides["logit_bias"] = _logit_bias(given["logit_bias"])
    if "seed" not in overrides and defaults.seed is not None:
        overrides["seed"] = derive_seed(defaults.seed, line_id)
    return _replace(defaults.params, overrides)


def _replace(params: SamplingParams, overrides: dict[str, Any]) -> SamplingParams:
    try:
        return replace(params, **overrides)
    except ParamError as error:
        message = f"is out of range: {_shown(error.value)} (allowed: {error.allowed})"
        raise FieldError(error.field, message) from None


def _logit_bias(bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
    pairs = []
    for key, value in bias.items():
        if not key.isdigit():
            raise FieldError("logit_bias", f"keys are token ids, not {_shown(key)}")
        pairs.append((int(key), float(value)))
    return tuple(sorted(pairs))


def _problems(error: ValidationError, native: type[records.NativeLine] | None) -> tuple[str, str]:
    """The first bad field and a message naming every problem of the line."""
    seen: dict[str, str] = {}
    for problem in error.errors():
        field = _field_name(problem["loc"])
        if field in seen:
            continue
        last = field.rsplit(".", 1)[-1]
        if problem["type"] == "extra_forbidden":
            known = ", ".join(sorted(native.model_fields)) if native else ""
            hint = f" (known: {known}; put your own data under 'metadata')" if native else ""
            seen[field] = f"field '{field}' is unknown{hint}"
        elif last in _ALLOWED or problem["type"] == "missing":
            what = (
                "is missing"
                if problem["type"] == "missing"
                else (f"must be {_ALLOWED[last]}, not {_shown(problem.get('input'))}")
            )
            seen[field] = f"field '{field}' {what}"
        elif last == "type" and problem.get("input") != "text":
            shown = _shown(problem.get("input"))
            seen[field] = f"field '{field}': only text parts are supported, not {shown}"
        else:
            message = problem["msg"][0].lower() + problem["msg"][1:]
            seen[field] = f"field '{field}': {message}, not {_shown(problem.get('input'))}"
    first = next(iter(seen))
    return first, "; ".join(seen.values())


def _field_name(loc: tuple[Any, ...]) -> str:
    """A pydantic location as the request spells the field, union branch tags left out."""
    parts = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in _BRANCH_TAGS):
            continue
        parts.append(str(part))
    name = ".".join(parts) or "body"
    return _cut(name)


_BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict", "constrained-str", "function-after"}


def _shown(value: Any) -> str:
    """A value as JSON for an error message, cut short: the line itself may be huge."""
    try:
        return _cut(orjson.dumps(value).decode())
    except (orjson.JSONEncodeError, TypeError):
        return f"a {type(value).__name__} nested too deep"


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
