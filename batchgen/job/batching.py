"""Pack a stream of tokenized requests into batches of similar prompt length."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from batchgen.engine import Request
from batchgen.job.inputs import JobLine, LineError


@dataclass(frozen=True)
class JobRequest:
    """One prompt of a valid input line, tokenized, ready for the engine."""

    job: JobLine
    request: Request
    part: int = 0  # which prompt of the line's prompt array

    @property
    def length(self) -> int:
        return len(self.request.prompt_token_ids)


def pack(
    items: Iterable[JobRequest | LineError],
    batch_size: int,
    window: int,
    longest_first: bool = False,
) -> Iterator[list[JobRequest] | LineError]:
    """Yield batches of up to `batch_size` requests, sorted within `window` by prompt length
    (then max_tokens), or with `longest_first` by max_tokens (then prompt length), longest
    first.

    Errors pass straight through. At most `window` requests are held at once, so memory
    does not grow with the input; a wider window sorts more of them together. Static batches
    carry a window's leftovers into the next, which may hold their peers; `longest_first`
    (continuous batching, no batches to fill) flushes each window whole, so no request is
    carried past the next window.
    """
    key = _longest_key if longest_first else _length_key
    pool: list[JobRequest] = []
    for item in items:
        if isinstance(item, LineError):
            yield item
            continue
        pool.append(item)
        if len(pool) >= max(window, batch_size):
            pool.sort(key=key)
            full = len(pool) if longest_first else len(pool) - len(pool) % batch_size
            yield from _chunks(pool[:full], batch_size)
            pool = pool[full:]
    pool.sort(key=key)
    yield from _chunks(pool, batch_size)


def _length_key(item: JobRequest) -> tuple[int, int]:
    # Equal max_tokens also keeps rows from idling while a longer neighbour decodes.
    return item.length, item.request.params.max_tokens


def _longest_key(item: JobRequest) -> tuple[int, int]:
    return -item.request.params.max_tokens, -item.length


def _chunks(items: list[JobRequest], size: int) -> Iterator[list[JobRequest]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
