"""Results -> output lines, in the form of each input line (native or OpenAI batch output)."""

from __future__ import annotations

import collections
import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import orjson

from batchgen.engine import Completion
from batchgen.engine.scheduler import TokenLogprob
from batchgen.engine.textstream import decode
from batchgen.job import records
from batchgen.job.inputs import JobLine, LineError
from batchgen.job.metrics import timing_record


@dataclass(frozen=True)
class Result:
    """What one line produced, ready to be written, and the window it finished in."""

    job: JobLine
    choices: list[list[Completion]]  # per prompt of the line, its n choices
    window: dict[str, Any]

    @property
    def completion(self) -> Completion:
        """The first choice of the first prompt: the request's timing."""
        return self.choices[0][0]


def result_line(
    result: Result, model: str, with_token_ids: bool, vocab: Sequence[bytes]
) -> tuple[bytes, bool]:
    """The output line for a finished request, and whether it is a result (not an error).

    A result that cannot be written as JSON becomes the line's error line: one bad line
    must never end the job.
    """
    try:
        record = result_record(result, model, with_token_ids, vocab)
        return orjson.dumps(record) + b"\n", True
    except orjson.JSONEncodeError as error:
        job = result.job
        failed = LineError(job.line, job.id, job.form, None, f"result cannot be written: {error}")
        return error_line(failed), False


def error_line(error: LineError) -> bytes:
    return orjson.dumps(error_record(error)) + b"\n"


def result_record(
    result: Result, model: str, with_token_ids: bool, vocab: Sequence[bytes]
) -> dict[str, Any]:
    """The output record for a finished request; `model` is the model that ran it."""
    job = result.job
    choices = _choices(result, vocab)
    prompt_tokens = sum(part[0].prompt_tokens for part in result.choices)
    generated = sum(c.completion_tokens for part in result.choices for c in part)
    used = records.usage(prompt_tokens, generated)
    timing = {"timing": timing_record(result.completion.timing), "window": result.window}
    token_ids = [c.token_ids for part in result.choices for c in part]
    if job.form == "native":
        first = choices[0]
        record: dict[str, Any] = {
            "id": job.id,
            "text": first["message"]["content"] if job.chat else first["text"],
            "finish_reason": first["finish_reason"],
            "usage": used,
            **timing,
        }
        if len(choices) > 1:
            record["choices"] = choices
        elif first["logprobs"] is not None:
            record["logprobs"] = first["logprobs"]
        if with_token_ids:
            record["token_ids"] = token_ids[0] if len(token_ids) == 1 else token_ids
        if job.metadata is not None:
            record["metadata"] = job.metadata
        return record
    extra: dict[str, Any] = {"line": job.line, **timing}
    if with_token_ids:
        extra["token_ids"] = token_ids[0] if len(token_ids) == 1 else token_ids
    kind, prefix = ("chat.completion", "chatcmpl") if job.chat else ("text_completion", "cmpl")
    body_id = f"{prefix}-{uuid.uuid4().hex}"
    body = records.response_body(kind, body_id, int(time.time()), model, choices, used)
    return records.batch_output(
        f"batch_req_{uuid.uuid4().hex}", str(job.id), uuid.uuid4().hex, 200, body, extra
    )


def _choices(result: Result, vocab: Sequence[bytes]) -> list[dict[str, Any]]:
    """Every choice of the line, indexed as OpenAI does: prompt index x n + choice."""
    job = result.job
    out = []
    for index, completion in enumerate(c for part in result.choices for c in part):
        if job.chat:
            out.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": completion.text},
                    "logprobs": _chat_logprobs(completion, vocab),
                    "finish_reason": completion.finish_reason,
                }
            )
            continue
        prompt = job.prompts[index // job.params.n] if job.echo else None
        text = completion.text
        if prompt is not None:
            text = (prompt if isinstance(prompt, str) else decode(vocab, prompt)) + text
        out.append(
            {
                "text": text,
                "index": index,
                "logprobs": _completion_logprobs(completion, vocab, job.echo),
                "finish_reason": completion.finish_reason,
            }
        )
    return out


def _completion_logprobs(
    completion: Completion, vocab: Sequence[bytes], echo: bool
) -> dict[str, Any] | None:
    """The completions form: tokens, token_logprobs, top_logprobs, text_offset; with echo the
    prompt's tokens first, the very first without a log-probability (nothing precedes it)."""
    if completion.logprobs is None:
        return None
    entries: list[TokenLogprob | None] = []
    tokens: list[int] = []
    if echo and completion.prompt_logprobs is not None:
        entries = [None, *completion.prompt_logprobs]
        tokens = list(completion.prompt_token_ids)
    entries += completion.logprobs
    tokens += [e.token for e in completion.logprobs]
    strings = [token_text(vocab, t) for t in tokens]
    offsets = [0, *itertools.accumulate(len(t) for t in strings)][:-1]
    return {
        "tokens": strings,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [
            None if e is None else {token_text(vocab, t): lp for t, lp in e.top} for e in entries
        ],
        "text_offset": offsets,
    }


def _chat_logprobs(completion: Completion, vocab: Sequence[bytes]) -> dict[str, Any] | None:
    """The chat form: per token its text, bytes, logprob and top_logprobs."""
    if completion.logprobs is None:
        return None

    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(vocab, token), "logprob": logprob, "bytes": list(vocab[token])}

    content = [
        {**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
        for e in completion.logprobs
    ]
    return {"content": content, "refusal": None}


def token_text(vocab: Sequence[bytes], token: int) -> str:
    """A token's text on its own (bytes that end mid-character shown as U+FFFD)."""
    return vocab[token].decode("utf-8", errors="replace") if 0 <= token < len(vocab) else ""


def error_record(error: LineError) -> dict[str, Any]:
    """The output record for a line that could not run; in the OpenAI form, one every OpenAI
    reader parses (a custom_id it could not read becomes `batchgen-line-N`)."""
    if error.form == "native":
        return records.native_error(error.id, error.line, error.field, error.message)
    custom_id = error.id if isinstance(error.id, str) else records.orphan_custom_id(error.line)
    return records.batch_output(
        f"batch_req_{uuid.uuid4().hex}",
        custom_id,
        uuid.uuid4().hex,
        400,
        records.error_body(error.message, error.field),
        {"line": error.line},
    )


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


class InputOrder:
    """`--order input`: lines leave in the order their input lines were read; one that finishes
    early waits for those before it (the engine takes no more once the window's worth wait)."""

    def __init__(self) -> None:
        self._expected: collections.deque[int] = collections.deque()
        self._held: dict[int, bytes | None] = {}

    def expect(self, line: int) -> None:
        """An input line that will get an output line, in reading order."""
        self._expected.append(line)

    def ready(self, lines: list[tuple[int, bytes | None]]) -> list[bytes]:
        """The output lines that may be written now, given these (input line, output line;
        None: the line's output went elsewhere, to the error file)."""
        self._held.update(lines)
        out = []
        while self._expected and self._expected[0] in self._held:
            line = self._held.pop(self._expected.popleft())
            if line is not None:
                out.append(line)
        return out

    def waiting_on(self, limit: int) -> int | None:
        """The input line that `limit` or more held lines wait for, if there are that many."""
        if len(self._held) < limit or not self._expected:
            return None
        return self._expected[0]

    def rest(self) -> list[bytes]:
        """What is still held when a run ends early (interrupted): written, out of order,
        rather than computed again by --resume."""
        out = [self._held.pop(n) for n in self._expected if n in self._held]
        self._expected.clear()
        return [line for line in out if line is not None]
