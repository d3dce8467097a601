"""Results -> output lines, in the form of each input line (native or OpenAI batch output)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import IO, Any

import orjson

from batchgen.engine import Completion
from batchgen.job.inputs import JobLine, JsonId, LineError
from batchgen.job.metrics import timing_record


@dataclass(frozen=True)
class Result:
    """What one line produced, ready to be written, and the window it finished in."""

    job: JobLine
    completion: Completion
    window: dict[str, Any]


def result_line(result: Result, model: str, with_token_ids: bool) -> tuple[bytes, bool]:
    """The output line for a finished request, and whether it is a result (not an error).

    A result that cannot be written as JSON becomes the line's error line: one bad line
    must never end the job.
    """
    try:
        return orjson.dumps(result_record(result, model, with_token_ids)) + b"\n", True
    except orjson.JSONEncodeError as error:
        job = result.job
        failed = LineError(job.line, job.id, job.form, None, f"result cannot be written: {error}")
        return error_line(failed), False


def error_line(error: LineError) -> bytes:
    return orjson.dumps(error_record(error)) + b"\n"


def result_record(result: Result, model: str, with_token_ids: bool) -> dict[str, Any]:
    """The output record for a finished request; `model` is the model that ran it."""
    job, completion = result.job, result.completion
    timing = {"timing": timing_record(completion.timing), "window": result.window}
    usage = {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
    }
    if job.form == "native":
        record: dict[str, Any] = {
            "id": job.id,
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "usage": usage,
            **timing,
        }
        if with_token_ids:
            record["token_ids"] = completion.token_ids
        if job.metadata is not None:
            record["metadata"] = job.metadata
        return record
    extra: dict[str, Any] = {"line": job.line, **timing}
    if with_token_ids:
        extra["token_ids"] = completion.token_ids
    body = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "text": completion.text,
                "index": 0,
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": {**usage, "total_tokens": completion.prompt_tokens + usage["completion_tokens"]},
    }
    return _openai_record(job.id, 200, body, extra)


def error_record(error: LineError) -> dict[str, Any]:
    """The output record for a line that could not run."""
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
    return _openai_record(error.id, 400, body, {"line": error.line})


def _openai_record(
    custom_id: JsonId | None, status: int, body: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
        "batchgen": extra,  # OpenAI readers ignore it: the input line number, timing
    }


class JobWriter:
    """Appends whole lines; each call is one write, flushed at once."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream

    def write(self, lines: list[bytes]) -> None:
        if lines:
            self._stream.write(b"".join(lines))
            self._stream.flush()

    def write_record(self, record: dict[str, Any]) -> None:
        self.write([orjson.dumps(record) + b"\n"])
