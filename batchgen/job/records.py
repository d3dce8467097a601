"""The line schemas, declared once: what a request line may hold (pydantic, read as OpenAI's
and vLLM's request models read it) and what batchgen writes back, in both line forms.

Native: `{"id": ..., "prompt" | "messages": ..., <sampling fields>, "metadata": ...}` in,
`{"id", "text", "finish_reason", "usage", ...}` out. OpenAI Batch API: `{"custom_id", "method",
"url", "body"}` in, `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error", "batchgen"}` out, whose body is a `text_completion` or a `chat.completion`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from batchgen.limits import MAX_CHOICES, MAX_LOGPROBS

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
# Written by OpenAI's and vLLM's batch runners; refused with their name, not as "unknown".
UNSUPPORTED_URLS = ("/v1/embeddings", "/v1/responses", "/score", "/v1/score", "/rerank")
MAX_PROMPTS = 64  # prompts in one line's `prompt` array
JsonId = str | int  # a line's id (native) or custom_id (OpenAI)

Finite = Annotated[float, Field(allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Array = Field(min_length=1, max_length=MAX_PROMPTS)
# A prompt: text, token ids, or (OpenAI's prompt arrays) a list of either.
Prompt = Text | TokenIds | Annotated[list[Text], Array] | Annotated[list[TokenIds], Array]
Stop = StrictStr | list[StrictStr] | None


class Request(BaseModel):
    """Fields every request form shares; unknown fields are refused, never ignored."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None  # OpenAI's newer name
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # as vLLM accepts it
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    stop: Stop = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    ignore_eos: bool | None = None  # as vLLM accepts it
    stream: bool | None = None  # false only: results are written whole
    model: str | None = None  # the model is --model; results name it
    user: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message: string content, or text-only content parts."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )


class CompletionBody(Request):
    """The body of a `/v1/completions` request."""

    prompt: Prompt
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: None = None


class ChatBody(Request):
    """The body of a `/v1/chat/completions` request (text only)."""

    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class BatchLine(BaseModel):
    """One line of an OpenAI Batch API input file; `body` is checked against `url`."""

    model_config = ConfigDict(extra="forbid")

    custom_id: StrictStr
    method: Literal["POST"] = "POST"
    url: str = COMPLETIONS_URL
    body: dict[str, Any]


class NativeLine(Request):
    """A native line: a prompt or messages, the sampling fields, and the user's metadata."""

    id: StrictStr | StrictInt | None = None  # null: the line number, as when absent
    prompt: Prompt | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    metadata: Any = None


# What batchgen writes. Built as plain dicts (orjson writes them), from these functions only.
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_body(
    kind: Literal["text_completion", "chat.completion"],
    body_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    used: dict[str, int],
) -> dict[str, Any]:
    """An OpenAI `text_completion` or `chat.completion` object."""
    return {
        "id": body_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": used,
    }


def error_body(message: str, param: str | None) -> dict[str, Any]:
    """OpenAI's error object, as its API answers an invalid request."""
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }
    }


def batch_output(
    line_id: str, custom_id: str, request_id: str, status: int, body: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """One line of an OpenAI Batch API output file; `batchgen` holds what OpenAI's lacks (the
    input line number, timing), and readers of the OpenAI form ignore it."""
    return {
        "id": line_id,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
        "batchgen": extra,
    }


def native_error(line_id: Any, line: int, field: str | None, message: str) -> dict[str, Any]:
    """A native error line: the id (null if the line had none usable), its line number."""
    return {"id": line_id, "line": line, "error": {"field": field, "message": message}}


def orphan_custom_id(line: int) -> str:
    """The custom_id of an error line for a request without a usable one (a torn line, say):
    OpenAI readers need a string."""
    return f"batchgen-line-{line}"


# What batchgen reads back of its own lines: resume and merge by what each accounts for, the
# Ray API by its fields. Only lines of the shapes above are batchgen's.
OUTPUT_HEAD = b'{"id":'  # how every output line begins (orjson writes the first key first)


def is_id(value: Any) -> bool:
    """A usable line id: a string or an integer (not a bool)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def accounted(record: Any) -> tuple[Literal["id", "line"], JsonId] | None:
    """What an output line accounts for: ("id", id) for a result, ("line", n) for an error
    line; None if the record is not a batchgen output line."""
    if not isinstance(record, dict):
        return None
    if "custom_id" in record:
        # A response with its status and the input line number: an OpenAI request line
        # (custom_id, body, no response) is none of batchgen's.
        response, extra = record.get("response"), record.get("batchgen")
        if not (isinstance(response, dict) and isinstance(extra, dict)):
            return None
        line, status = extra.get("line"), response.get("status_code")
        if not (isinstance(line, int) and isinstance(status, int)):
            return None
        if status == 200:
            return ("id", record["custom_id"]) if is_id(record["custom_id"]) else None
        return "line", line
    if "error" in record and isinstance(record.get("line"), int):
        return "line", record["line"]
    if "id" in record and "text" in record:
        return ("id", record["id"]) if is_id(record["id"]) else None
    return None


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """An output line's first choice as flat fields, whichever form it was written in: `id`,
    `text`, `finish_reason`, `prompt_tokens`, `completion_tokens`, `error` ("field: why")."""
    error = error_of(record)
    if "custom_id" in record:
        body = record["response"]["body"]
        choice = body["choices"][0] if "choices" in body else {}
        text = choice["message"]["content"] if "message" in choice else choice.get("text")
        line_id = record["custom_id"]
    else:
        line_id, text, choice = record.get("id"), record.get("text"), record
    used = usage_of(record)
    return {
        "id": line_id,
        "text": text,
        "finish_reason": choice.get("finish_reason"),
        "prompt_tokens": used.get("prompt_tokens"),
        "completion_tokens": used.get("completion_tokens"),
        "error": f"{error[0]}: {error[1]}" if error else None,
    }


def error_of(record: dict[str, Any]) -> tuple[str | None, str] | None:
    """An error line's (field, message); None for a result."""
    if "custom_id" in record:
        error = record["response"]["body"].get("error")
        return (error["param"], error["message"]) if error else None
    error = record.get("error")
    return (error["field"], error["message"]) if error else None


def usage_of(record: dict[str, Any]) -> dict[str, int]:
    """A result's token counts (`prompt_tokens`, `completion_tokens`); empty for an error."""
    if "custom_id" in record:
        return record["response"]["body"].get("usage", {})
    return record.get("usage", {})


def timing_of(record: dict[str, Any]) -> dict[str, float] | None:
    """A result's `timing` (queue_ms, first_token_ms, decode_ms, ...); None for an error."""
    where = record.get("batchgen", {}) if "custom_id" in record else record
    return where.get("timing")
