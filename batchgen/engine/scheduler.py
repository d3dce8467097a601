"""Which rows run each step, as vLLM's scheduler does it: the state lives on each row, the
decisions here, the execution in the engine.

Every step decodes all rows past their prompt and, within a per-step budget of prompt tokens,
continues prompts already admitted (long ones a chunk at a time) and admits waiting requests
while the cache has room and fewer than `max_rows` rows are active. A finished row leaves at
once. The static policy admits only into an empty engine, a full batch at a time.

A request of several choices (`n`, `best_of`) is a group: its first row prefills the prompt,
the others are admitted with it and wait; once the prompt is in the cache it is copied into
theirs (`fork`), and each goes on from the prompt's last token with its own seed.

With the prefix cache, a row admitted starts past the blocks of its prompt the cache already
holds (their scored prompt log-probabilities too, if it scores), and a row whose next block a
running row is computing waits for it rather than computing it again beside it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from batchgen.engine.kv_cache import KVCache
from batchgen.engine.prefix_cache import BlockHash, ScoredBlocks, block_hashes, reusable_blocks
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
    prefix_cache: bool = True  # reuse the keys and values of prompts' common starts

    def __post_init__(self) -> None:
        if self.policy not in ("continuous", "static"):
            raise ValueError(f"invalid policy: {self.policy!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"invalid prefix_cache: {self.prefix_cache!r}")
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
    forked: bool = False  # a follower whose cache holds the prompt (forked) and may run
    blocks: list[BlockHash] = field(default_factory=list)  # its prompt's, if the cache reuses
    computed: int = 0  # tokens whose keys and values are in the cache
    reused: int = 0  # of them, prompt tokens taken from the cache (or a fork), not computed
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
    reused: int = 0  # prompt tokens the rows admitted for it took from the cache

    @property
    def rows(self) -> int:
        return len(self.decode) + len(self.prefill)

    @property
    def prompt_tokens(self) -> int:
        return sum(n for _, n in self.prefill)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache, scored: ScoredBlocks | None = None):
        self.config = config
        self.cache = cache
        self.scored = ScoredBlocks() if scored is None else scored
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
        if self.config.prefix_cache:
            row.blocks = block_hashes(row.prompt, self.cache.block_size)
        self.waiting.append(row)

    def schedule(self, now: float) -> StepPlan:
        """The next step's work; admits waiting rows (reserving their cache) as it goes."""
        decode = [row for row in self.running if not row.prefilling]
        # A follower's prompt is copied, not prefilled: it needs only its last token.
        budget = max(self.config.step_tokens - len(decode), 0)
        static = self.config.policy == "static"
        reused = 0
        if not static or not self.running:
            # Continuous: admit while this step has prompt budget left over; static: a whole
            # batch, whose prompts then share the budget over the next steps.
            left = [len(r.prompt) - r.computed for r in self.running if r.prefilling]
            spare = budget - sum(left)
            computing = self._computing() if self.waiting else set()
            while self.waiting and (static or spare > 0):
                row = self.waiting[0]
                group = [row, *row.followers]
                if len(self.running) + len(group) > self.config.max_rows:
                    break
                blocks, entries = self._reusable(row)
                next_block = self._next_block(row, len(blocks))
                if not static and next_block is not None and next_block in computing:
                    break  # its next block is being computed: wait for it, then take it
                if not self._admit(group, blocks):
                    break  # first come, first served: nothing overtakes a row that waits
                self.waiting.popleft()
                for member in group:
                    member.admitted = now
                row.computed = row.reused = len(blocks) * self.cache.block_size
                row.prompt_logprobs = entries
                reused += row.reused
                computing.update(row.blocks[len(blocks) :])
                self.running.extend(group)
                spare -= len(row.prompt) - row.computed
        prefill: list[tuple[Row, int]] = []
        for row in self.running:
            if row.prefilling and budget and not row.waiting_for_prompt:
                chunk = min(len(row.prompt) - row.computed, budget)
                prefill.append((row, chunk))
                budget -= chunk
        return StepPlan(decode, prefill, reused)

    def ran(self, plan: StepPlan) -> None:
        """The step ran (its prompt log-probabilities scored): its rows' keys and values are
        in the cache, and complete blocks of prompts become reusable."""
        for row in plan.decode:
            row.computed += 1
        size = self.cache.block_size
        for row, n in plan.prefill:
            before = row.computed
            row.computed += n
            if not row.blocks:
                continue
            self.cache.commit(row.key, row.blocks[: row.computed // size])
            top = row.params.prompt_logprobs
            if top is not None and row.choice == 0:
                last = min(row.computed // size, reusable_blocks(len(row.prompt), size))
                for i in range(before // size, last):
                    entries = row.prompt_logprobs[i * size : (i + 1) * size]
                    self.scored.put(row.blocks[i], row.prompt[(i + 1) * size], top, entries)

    def _reusable(self, row: Row) -> tuple[list[BlockHash], list[TokenLogprob]]:
        """The blocks of the row's prompt it may take from the cache, and the scored prompt
        log-probabilities they come with (where it scores its prompt)."""
        size = self.cache.block_size
        wanted = row.blocks[: reusable_blocks(len(row.prompt), size)]
        blocks = wanted[: self.cache.holds(wanted)]
        top = row.params.prompt_logprobs
        if top is None:
            return blocks, []
        entries: list[TokenLogprob] = []
        for i, block in enumerate(blocks):
            scored = self.scored.get(block, row.prompt[(i + 1) * size], top)
            if scored is None:
                return blocks[:i], entries  # unscored blocks are computed again
            entries += scored
        return blocks, entries

    def _next_block(self, row: Row, taken: int) -> BlockHash | None:
        """The block after the `taken` the row takes, if it could take that one too."""
        limit = min(len(row.blocks), reusable_blocks(len(row.prompt), self.cache.block_size))
        return row.blocks[taken] if taken < limit else None

    def _computing(self) -> set[BlockHash]:
        """The blocks running rows are still computing."""
        size = self.cache.block_size
        return {block for r in self.running for block in r.blocks[r.computed // size :]}

    def _admit(self, group: list[Row], blocks: list[BlockHash]) -> bool:
        """Reserve cache for every row of a group, or for none; the first row takes `blocks`."""
        for i, member in enumerate(group):
            if not self.cache.admit(member.key, member.tokens, blocks if i == 0 else ()):
                for admitted in group[:i]:
                    self.cache.release(admitted.key)
                return False
        return True

    def fork(self, row: Row) -> int:
        """The row's prompt is in the cache: give it to its followers (copied, or shared where
        the cache can), which then go on from its last token (recomputed, so that each draws
        its first token itself). Returns the prompt tokens they took."""
        copied = len(row.prompt) - 1
        taken = 0
        for follower in row.followers:
            if self.cache.fork(row.key, follower.key, copied):
                follower.computed = follower.reused = copied
                taken += copied
            follower.forked = True
            follower.prompt_logprobs = row.prompt_logprobs
        return taken

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
