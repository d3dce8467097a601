"""Which rows run each step, as vLLM's scheduler does it: the state lives on each row, the
decisions here, the execution in the engine.

Every step decodes all rows past their prompt and, within a per-step budget of prompt tokens,
continues prompts already admitted (long ones a chunk at a time) and admits waiting requests
while the cache has room and fewer than `max_rows` rows are active. A finished row leaves at
once. The static policy admits only into an empty engine, a full batch at a time.

A request of several choices (`n`, `best_of`) is a group: its first row prefills the prompt,
the others are admitted with it and wait; once the prompt is in the cache it is copied into
theirs (`fork`), and each goes on from the prompt's last token with its own seed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from batchgen.engine.kv_cache import KVCache
from batchgen.engine.sampling import SamplingParams
from batchgen.engine.textstream import TextStream

Policy = Literal["continuous", "static"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SchedulerConfig:
    """How rows are admitted; one place per knob, each checked here."""

    policy: Policy = "continuous"
    max_rows: int = 32  # active rows at most (`--batch-size`)
    step_tokens: int = 2048  # prompt tokens prefilled per step, beside the decode rows

    def __post_init__(self) -> None:
        if self.policy not in ("continuous", "static"):
            raise ValueError(f"invalid policy: {self.policy!r}")
        if self.max_rows < 1:
            raise ValueError(f"invalid max_rows: {self.max_rows!r}")
        if self.step_tokens < 1:
            raise ValueError(f"invalid step_tokens: {self.step_tokens!r}")


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model, and the likeliest alternatives'."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), likeliest first


@dataclass
class Row:
    """One choice of a request in the engine: its prompt, what it has produced, and when."""

    index: int  # the request's arrival order in the stream
    prompt: Sequence[int]
    params: SamplingParams
    seed: int
    arrived: float
    stream: TextStream | None = None  # watches the text for stop strings
    choice: int = 0  # which of the request's choices (0 unless n or best_of > 1)
    # The group's other choices, on its first row; they wait for this row's prompt.
    followers: list[Row] = field(default_factory=list)
    forked: bool = False  # a follower whose cache holds the prompt (copied) and may run
    computed: int = 0  # tokens whose keys and values are in the cache
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, if asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt[1:], if asked
    finish_reason: FinishReason | None = None
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        """Which cache room is this row's."""
        return self.index, self.choice

    @property
    def waiting_for_prompt(self) -> bool:
        """A follower whose prompt is not yet copied into its cache."""
        return self.choice > 0 and not self.forked

    @property
    def tokens(self) -> int:
        """Cache positions the row may need: its prompt and every token it may generate."""
        return len(self.prompt) + self.params.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)

    def shift(self, seconds: float) -> None:
        """Move its clock readings later, as if a pause of `seconds` had not happened."""
        self.arrived += seconds
        if self.admitted is not None:
            self.admitted += seconds
        if self.first_token is not None:
            self.first_token += seconds


@dataclass(frozen=True)
class StepPlan:
    """One step: rows decoding their last token, and prompt chunks (row, tokens) to prefill."""

    decode: list[Row]
    prefill: list[tuple[Row, int]]

    @property
    def rows(self) -> int:
        return len(self.decode) + len(self.prefill)

    @property
    def prompt_tokens(self) -> int:
        return sum(n for _, n in self.prefill)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache):
        self.config = config
        self.cache = cache
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []  # in admission order

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, row: Row) -> None:
        """Queue a request (its first row, carrying its followers)."""
        group = 1 + len(row.followers)
        if group > self.config.max_rows:
            raise ValueError(
                f"the request runs {group} choices at once (n, best_of); --batch-size "
                f"{self.config.max_rows} allows fewer"
            )
        if not self.cache.fits(row.tokens, group):
            rows = f"{group} rows of " if group > 1 else ""
            raise ValueError(
                f"the request needs {rows}{row.tokens} tokens of KV cache; the whole cache "
                "holds fewer: raise --kv-cache-gb"
            )
        self.waiting.append(row)

    def schedule(self, now: float) -> StepPlan:
        """The next step's work; admits waiting rows (reserving their cache) as it goes."""
        decode = [row for row in self.running if not row.prefilling]
        # A follower's prompt is copied, not prefilled: it needs only its last token.
        budget = max(self.config.step_tokens - len(decode), 0)
        static = self.config.policy == "static"
        if not static or not self.running:
            # Continuous: admit while this step has prompt budget left over; static: a whole
            # batch, whose prompts then share the budget over the next steps.
            left = [len(r.prompt) - r.computed for r in self.running if r.prefilling]
            spare = budget - sum(left)
            while self.waiting and (static or spare > 0):
                row = self.waiting[0]
                group = [row, *row.followers]
                if len(self.running) + len(group) > self.config.max_rows:
                    break
                if not self._admit(group):
                    break  # first come, first served: nothing overtakes a row that waits
                self.waiting.popleft()
                for member in group:
                    member.admitted = now
                self.running.extend(group)
                spare -= len(row.prompt)
        prefill: list[tuple[Row, int]] = []
        for row in self.running:
            if row.prefilling and budget and not row.waiting_for_prompt:
                chunk = min(len(row.prompt) - row.computed, budget)
                prefill.append((row, chunk))
                budget -= chunk
        return StepPlan(decode, prefill)

    def _admit(self, group: list[Row]) -> bool:
        """Reserve cache for every row of a group, or for none."""
        for i, member in enumerate(group):
            if not self.cache.admit(member.key, member.tokens):
                for admitted in group[:i]:
                    self.cache.release(admitted.key)
                return False
        return True

    def fork(self, row: Row) -> None:
        """The row's prompt is in the cache: copy it to its followers, which then go on from
        its last token (recomputed, so that each draws its first token itself)."""
        copied = len(row.prompt) - 1
        for follower in row.followers:
            if self.cache.fork(row.key, follower.key, copied):
                follower.computed = copied
            follower.forked = True
            follower.prompt_logprobs = row.prompt_logprobs

    def finish(self, row: Row) -> None:
        """The row is done: it leaves now and its cache goes back."""
        self.running.remove(row)
        self.cache.release(row.key)

    def abandon(self) -> None:
        """Drop every row (the caller stopped reading): all cache goes back."""
        for row in self.running:
            self.cache.release(row.key)
        self.running.clear()
        self.waiting.clear()
