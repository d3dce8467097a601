"""The generation engine: GPT-2 compiled once, continuous batching over a KV cache.

Requests stream in; each step the scheduler decides which rows run, the cache's runner runs
them, and the engine chooses each row's next token (the graph's argmax, or a seeded draw) and
finishes rows as they end. `stream` yields a `Window` each time requests finish; `generate`
collects one call's requests.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from max.driver import CPU, Accelerator, Device, accelerator_count
from max.dtype import DType
from transformers import PreTrainedTokenizerBase

from batchgen.engine.kernels import SLOT_HEAD_DIMS
from batchgen.engine.kv_cache import KVCache, PagedCache, SlotCache
from batchgen.engine.model import GPT2Config, to_device
from batchgen.engine.prefix_cache import ScoredBlocks
from batchgen.engine.runners import Emitted, PagedRunner, Runner, SlotRunner
from batchgen.engine.sampling import (
    LogprobScorer,
    Sampler,
    SamplingParams,
    adjusted,
    derive_seed,
    draw_keys,
)
from batchgen.engine.scheduler import (
    FinishReason,
    Row,
    Scheduler,
    SchedulerConfig,
    StepPlan,
    TokenLogprob,
)
from batchgen.engine.textstream import TextStream, decode, token_bytes
from batchgen.engine.weights import Checkpoint, load_checkpoint, load_tokenizer

# The host-side torch dtype that carries each MAX dtype (numpy has no bfloat16).
TORCH_DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16}
GiB = 2**30
CPU_KV_CACHE_GB = 4.0  # at most; less where the machine has little memory


class ContextLengthError(ValueError):
    """A request's prompt plus max_tokens does not fit the model's context."""


@dataclass(frozen=True)
class Request:
    """One prompt, already tokenized, and how to decode it."""

    prompt_token_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Timing:
    """Where one request's time went, in milliseconds."""

    queue_ms: float  # arrived -> admitted (a slot or its pages reserved)
    prefill_ms: float  # admitted -> first token
    decode_ms: float  # first token -> last token
    tokens: int  # tokens generated
    # Prompt tokens taken from the prefix cache (or the first choice's), not prefilled.
    cached_tokens: int = 0

    @property
    def first_token_ms(self) -> float:
        return self.queue_ms + self.prefill_ms

    @property
    def total_ms(self) -> float:
        return self.first_token_ms + self.decode_ms

    @property
    def tokens_per_s(self) -> float:
        """The request's own speed once admitted."""
        busy_ms = self.prefill_ms + self.decode_ms
        return 1e3 * self.tokens / busy_ms if busy_ms else 0.0


@dataclass
class Completion:
    """What one choice of a request produced: its tokens (EOS included), its text (stop
    string cut) and, where asked, log-probabilities."""

    token_ids: list[int]
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_tokens
    prompt_tokens: int
    text: str
    timing: Timing
    logprobs: list[TokenLogprob] | None = None  # per generated token (params.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt[1:] (params.prompt_logprobs)
    cumulative_logprob: float | None = None  # of the generated tokens, where scored
    prompt_token_ids: Sequence[int] = ()

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class WindowStats:
    """The engine's work between two windows."""

    index: int
    steps: int
    mean_rows: float  # active rows per step, on average
    occupancy: float  # fraction of the KV cache held, on average over the steps
    prompt_tokens: int  # prefilled in this window
    generated_tokens: int
    seconds: float
    reused_tokens: int = 0  # prompt tokens taken from the prefix cache or a fork, not prefilled
    waiting: float = 0.0  # requests read but not yet admitted, per step, on average


@dataclass(frozen=True)
class Finished:
    """A finished request: its position in the stream, and its choices (n of them)."""

    index: int
    completions: list[Completion]

    @property
    def completion(self) -> Completion:
        """The first choice: the only one unless n > 1."""
        return self.completions[0]


@dataclass(frozen=True)
class Window:
    """The requests that finished since the last window, and what the engine did meanwhile."""

    finished: list[Finished]
    stats: WindowStats


@dataclass
class GenerateOutput:
    """The completions of one `generate` call, in request order, and its windows."""

    completions: list[Completion]
    windows: list[WindowStats]
    seconds: float

    @property
    def steps(self) -> int:
        return sum(w.steps for w in self.windows)


@dataclass(frozen=True)
class Step:
    """One engine step: the token each row that got one received, and its logits."""

    index: int
    rows: list[int]  # the rows' positions in the stream (request order in `generate`)
    tokens: np.ndarray  # int64 [len(rows)]
    # Read only if asked for: most callbacks (a job's signal check) never look at them.
    read_logits: Callable[[], np.ndarray] = field(repr=False)

    @functools.cached_property
    def logits(self) -> np.ndarray:
        """float32 [len(rows), vocab], on the host."""
        return self.read_logits()

    def token_of(self, row: int) -> int | None:
        return int(self.tokens[self.rows.index(row)]) if row in self.rows else None


# Called after every step, e.g. to stream text as it is generated.
OnStep = Callable[[Step], None]
KVCacheKind = Literal["auto", "slots", "paged"]


@dataclass(frozen=True)
class EngineConfig:
    """Where and in what precision the model runs, its KV cache, and how rows are admitted."""

    device: Literal["auto", "cpu", "gpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    kv_cache: KVCacheKind = "auto"  # auto: slots on CPU, paged on GPU
    kv_cache_gb: float | None = None  # None: a default per device
    # auto: the model's dtype; float16 halves what the slot cache holds and reads per step.
    kv_cache_dtype: Literal["auto", "float32", "float16"] = "auto"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class EngineTimings:
    """What setting the engine up cost, in seconds."""

    load_s: float = 0.0  # checkpoint and tokenizer from disk
    compile_s: float = 0.0  # the model's graphs, weights to the device included
    # The sampler's and the logprob scorer's graphs, the first time a request needs them.
    sampler_compile_s: float = 0.0


def resolve_device(config: EngineConfig) -> tuple[Device, DType]:
    """Pick the device and dtype explicitly: GPU + bfloat16 when one exists, else CPU + fp32."""
    want_gpu = config.device == "gpu" or (config.device == "auto" and accelerator_count() > 0)
    if want_gpu and accelerator_count() == 0:
        raise ValueError("--device gpu: no accelerator is visible to MAX")
    device: Device = Accelerator() if want_gpu else CPU()
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if want_gpu else "float32"
    if dtype == "bfloat16" and not want_gpu:
        # MAX's CPU bf16 kernels ran 3-5x slower than fp32; refuse rather than crawl.
        raise ValueError("bfloat16 is supported on GPU only; use float32 on CPU")
    return device, DType.float32 if dtype == "float32" else DType.bfloat16


def resolve_kv_cache(kind: KVCacheKind, device: Device, dtype: DType, config: GPT2Config) -> str:
    """slots (our Mojo kernel) on the CPU, paged (MAX's kernels) on a GPU, unless asked."""
    fits_kernel = device.is_host and dtype == DType.float32 and config.head_dim in SLOT_HEAD_DIMS
    if kind == "auto":
        return "slots" if fits_kernel else "paged"
    if kind == "slots" and not fits_kernel:
        raise ValueError(
            "--kv-cache slots runs on the CPU in float32, for head sizes "
            f"{', '.join(map(str, SLOT_HEAD_DIMS))}; use --kv-cache paged"
        )
    return kind


def kv_cache_bytes(config: EngineConfig, device: Device) -> float:
    """The KV cache's budget: as asked, else up to 4 GiB (a quarter of free memory at most)
    on the CPU, half of the free memory on a GPU."""
    if config.kv_cache_gb is not None:
        return config.kv_cache_gb * GiB
    free = float(device.stats["free_memory"])
    return min(CPU_KV_CACHE_GB * GiB, free / 4) if device.is_host else free / 2


def build_cache(
    checkpoint: Checkpoint, device: Device, dtype: DType, config: EngineConfig
) -> tuple[KVCache, Runner]:
    """The KV cache `config` asks for, allocated, and the compiled model that runs over it."""
    model = checkpoint.config
    kind = resolve_kv_cache(config.kv_cache, device, dtype, model)
    budget = kv_cache_bytes(config, device)
    rows = config.scheduler.max_rows
    if kind == "slots":
        cache_dtype = DType.float16 if config.kv_cache_dtype == "float16" else dtype
        slots = SlotCache.within(budget, rows, model, cache_dtype, device)
        return slots, SlotRunner(model, checkpoint.weights, dtype, device, slots)
    if config.kv_cache_dtype not in ("auto", str(dtype).removeprefix("DType.")):
        raise ValueError("--kv-cache-dtype other than the model's needs --kv-cache slots")
    pages = PagedCache.within(budget, rows, model, dtype, device)
    return pages, PagedRunner(model, checkpoint.weights, dtype, device, pages)


class Engine:
    """GPT-2 compiled once for any number of rows and lengths, over one KV cache."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: Device,
        dtype: DType,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig = EngineConfig(),
    ):
        self.config: GPT2Config = checkpoint.config
        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.schedule = config.scheduler
        # Sized by the model, whose vocabulary may be padded past the tokenizer's.
        self.vocab_bytes = token_bytes(tokenizer, self.config.vocab_size)
        self.timings = EngineTimings()
        self.weights_bytes = sum(_nbytes(w) for w in checkpoint.weights.values())
        start = time.perf_counter()
        self.cache, self.runner = build_cache(checkpoint, device, dtype, config)
        self.timings.compile_s = time.perf_counter() - start
        self._sampler: Sampler | None = None
        self._scorer: LogprobScorer | None = None
        # Scored prompt blocks outlive a stream, as the cache's prefixes do.
        self._scored = ScoredBlocks()

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "gpt2", config: EngineConfig = EngineConfig()
    ) -> Engine:
        """Load a Hub name or local directory and compile it for the chosen device."""
        device, dtype = resolve_device(config)
        start = time.perf_counter()
        checkpoint = load_checkpoint(model, TORCH_DTYPES[dtype])
        tokenizer = load_tokenizer(model)
        load_s = time.perf_counter() - start
        engine = cls(checkpoint, device, dtype, tokenizer, config)
        engine.timings.load_s = load_s
        return engine

    def check(self, request: Request) -> None:
        """Raise ValueError (ContextLengthError past the context window) if it cannot run."""
        n_prompt = len(request.prompt_token_ids)
        limit = self.config.n_positions
        if n_prompt == 0:
            raise ValueError("empty prompt: at least one token is required")
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})"
            )
        if request.params.logit_bias and max(t for t, _ in request.params.logit_bias) >= (
            self.config.vocab_size
        ):
            raise ValueError(f"logit_bias: token ids are 0..{self.config.vocab_size - 1}")
        if n_prompt + request.params.max_tokens > limit:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_tokens "
                f"({request.params.max_tokens}) exceeds the model's context of "
                f"{limit} tokens"
            )
        choices = request.params.choices
        if choices > self.schedule.max_rows:
            raise ValueError(
                f"the request runs {choices} choices at once (n, best_of); --batch-size "
                f"{self.schedule.max_rows} allows fewer"
            )
        if not self.cache.fits(n_prompt + request.params.max_tokens, choices):
            raise ValueError(
                f"{choices} choices of {n_prompt} + {request.params.max_tokens} tokens do not "
                "fit the whole KV cache: raise --kv-cache-gb"
            )

    def generate(
        self,
        requests: Sequence[Request],
        on_step: OnStep | None = None,
        schedule: SchedulerConfig | None = None,
    ) -> GenerateOutput:
        """Decode requests to completion; each row's output is independent of the others."""
        for request in requests:
            self.check(request)
        start = time.perf_counter()
        completions: list[Completion | None] = [None] * len(requests)
        windows = []
        for window in self.stream(requests, on_step, schedule):
            windows.append(window.stats)
            for finished in window.finished:
                completions[finished.index] = finished.completion
        done = [c for c in completions if c is not None]
        return GenerateOutput(done, windows, time.perf_counter() - start)

    def stream(
        self,
        requests: Iterable[Request | None],
        on_step: OnStep | None = None,
        schedule: SchedulerConfig | None = None,
    ) -> Iterator[Window]:
        """Run requests as they come (read lazily, a few ahead of admission); yield a Window
        whenever some finish. Leaving the loop early gives every row's cache back.

        A source may yield None: nothing to start this step; a None while no row runs ends
        the stream as the source's end does.
        """
        config = schedule or self.schedule
        if not self.cache.idle:
            raise RuntimeError("the engine is already running a stream")
        scheduler = Scheduler(config, self.cache, self._scored)
        source = iter(requests)
        arrivals = windows = 0
        clock = _WindowClock()
        groups: dict[int, Row] = {}  # each unfinished request's first row
        try:
            while True:
                while len(scheduler.waiting) < config.max_rows:
                    request = next(source, None)
                    if request is None:
                        break
                    setup_s = self.timings.sampler_compile_s
                    row = self._row(arrivals, request)
                    if spent := self.timings.sampler_compile_s - setup_s:
                        # Compiling the sampler is setup, not time anyone spent in the engine.
                        clock.start += spent
                        for other in (*scheduler.waiting, *scheduler.running):
                            other.shift(spent)
                    scheduler.add(row)
                    groups[row.index] = row
                    arrivals += 1
                if not scheduler.busy:
                    return
                finished = self._step(scheduler, clock, groups, on_step)
                if finished:
                    yield clock.window(windows, finished)
                    windows += 1
        finally:
            scheduler.abandon()

    def compile_sampler(self) -> None:
        """Compile the sampler if not yet done; the engine calls it when a request samples."""
        if self._sampler is None:
            start = time.perf_counter()
            self._sampler = Sampler(self.config.vocab_size, self.device)
            self.timings.sampler_compile_s += time.perf_counter() - start

    def compile_scorer(self) -> None:
        """Compile the logprob scorer if not yet done (when a request asks for logprobs)."""
        if self._scorer is None:
            start = time.perf_counter()
            self._scorer = LogprobScorer(self.config.vocab_size, self.device)
            self.timings.sampler_compile_s += time.perf_counter() - start

    def _row(self, index: int, request: Request) -> Row:
        """The request's first row, carrying its other choices (n, best_of) as followers."""
        self.check(request)
        params = request.params
        if not params.greedy:
            self.compile_sampler()
        if params.scores or params.prompt_logprobs is not None:
            self.compile_scorer()
        seed = secrets.randbits(64) if params.seed is None else params.seed
        rows = [
            Row(
                index,
                request.prompt_token_ids,
                params,
                # Each choice its own stream, from the request's seed: reproducible.
                seed if choice == 0 else derive_seed(seed, choice),
                time.perf_counter(),
                TextStream(self.vocab_bytes, params.stop) if params.stop else None,
                choice=choice,
            )
            for choice in range(params.choices)
        ]
        rows[0].followers = rows[1:]
        return rows[0]

    def _step(
        self,
        scheduler: Scheduler,
        clock: _WindowClock,
        groups: dict[int, Row],
        on_step: OnStep | None,
    ) -> list[Finished]:
        plan = scheduler.schedule(time.perf_counter())
        clock.step(plan, len(scheduler.waiting), self.cache.occupancy)
        emitted = self.runner.run(plan)
        chosen = self._choose(emitted)
        self._score(emitted, chosen)
        scheduler.ran(plan)
        now = time.perf_counter()
        finished = []
        appended = []
        for i, row, token in chosen:
            if row.first_token is None:
                row.first_token = now
                if row.followers:
                    # Before the row can finish and free its cache.
                    clock.reused += scheduler.fork(row)
            if row.params.max_tokens == 0:
                row.finish_reason = "length"  # a scoring request: the prompt was all
            else:
                appended.append((i, row, token))
                row.generated.append(token)
                if row.stream is not None:
                    row.stream.push(token)
                row.finish_reason = check_stop(row, self.config.eos_token_id)
            if row.finish_reason is not None:
                row.finished = now
                scheduler.finish(row)
                group = [groups[row.index], *groups[row.index].followers]
                if all(member.finished is not None for member in group):
                    finished.append(Finished(row.index, self._choices(group)))
                    del groups[row.index]
        clock.generated += len(appended)
        if on_step is not None:
            on_step(_step_record(clock.steps_total - 1, emitted, appended))
        return finished

    def _choose(self, emitted: Emitted) -> list[tuple[int, Row, int]]:
        """(output row, row, next token) per emitting row: the graph's argmax, or a seeded
        draw where asked; penalties and logit_bias first where a row has them."""
        greedy = emitted.outputs.next_token.to(CPU()).to_numpy().copy()
        logits = emitted.outputs.logits
        rows = emitted.rows
        adjusting = [i for i, row in enumerate(rows) if row is not None and row.params.adjusts]
        if adjusting:
            # Per row on the host: a row's counts and biases touch few of its logits.
            host = logits.to(CPU()).to_numpy().copy()
            for i in adjusting:
                row = rows[i]
                assert row is not None
                host[i] = adjusted(host[i], row.params, row.generated)
                greedy[i] = int(np.argmax(host[i]))
            logits = to_device(host, self.device)
        if all(row is None or row.params.greedy for row in rows):
            return [(i, row, int(greedy[i])) for i, row in enumerate(rows) if row is not None]
        assert self._sampler is not None
        # Rows that do not draw get greedy parameters and a throwaway key.
        params = [SamplingParams() if row is None else row.params for row in rows]
        seeds = np.array([0 if row is None else row.seed for row in rows], np.uint64)
        index = np.array([0 if row is None else len(row.generated) for row in rows], np.int64)
        drawn = self._sampler(logits, params, draw_keys(seeds, index))
        return [
            (i, row, int(greedy[i] if row.params.greedy else drawn[i]))
            for i, row in enumerate(rows)
            if row is not None
        ]

    def _score(self, emitted: Emitted, chosen: list[tuple[int, Row, int]]) -> None:
        """Log-probabilities of the chosen tokens and of scored prompt tokens, where asked."""
        wanted = [(i, row, token) for i, row, token in chosen if row.params.scores]
        scored = emitted.layout.scored
        if not (wanted or scored):
            return
        assert self._scorer is not None
        targets = np.zeros(len(emitted.rows), np.int64)
        for i, _, token in wanted:
            targets[i] = token
        for i, row, position in scored:
            targets[i] = row.prompt[position + 1]
        alternatives = {i: row.params.logprobs for i, row, _ in wanted if row.params.max_tokens}
        alternatives.update((i, row.params.prompt_logprobs) for i, row, _ in scored)
        top_rows = sorted(i for i, k in alternatives.items() if k)
        target, top, ids = self._scorer(emitted.outputs.logits, targets, top_rows)
        place = {i: r for r, i in enumerate(top_rows)}

        def entry(i: int, k: int | None) -> TokenLogprob:
            pairs: tuple[tuple[int, float], ...] = ()
            if k:
                r = place[i]
                pairs = tuple(zip(ids[r, :k].tolist(), top[r, :k].tolist(), strict=True))
            return TokenLogprob(int(targets[i]), float(target[i]), pairs)

        for i, row, _ in wanted:
            if row.params.max_tokens:
                row.logprobs.append(entry(i, row.params.logprobs))
        for i, row, _ in scored:
            row.prompt_logprobs.append(entry(i, row.params.prompt_logprobs))

    def _choices(self, group: list[Row]) -> list[Completion]:
        """A finished request's n choices: all of them, or with best_of the n likeliest."""
        completions = [self._completion(row) for row in group]
        n = group[0].params.n
        if len(completions) > n:
            completions.sort(key=lambda c: -(c.cumulative_logprob or 0.0))
        return completions[:n]

    def _completion(self, row: Row) -> Completion:
        assert row.admitted is not None and row.first_token is not None
        assert row.finished is not None and row.finish_reason is not None
        timing = Timing(
            queue_ms=1e3 * (row.admitted - row.arrived),
            prefill_ms=1e3 * (row.first_token - row.admitted),
            decode_ms=1e3 * (row.finished - row.first_token),
            tokens=len(row.generated),
            cached_tokens=row.reused,
        )
        if row.stream is None:
            text = decode(self.vocab_bytes, row.generated)
        else:
            text = row.stream.text + row.stream.finish()  # empty once a stop string was seen
        params = row.params
        return Completion(
            row.generated,
            row.finish_reason,
            len(row.prompt),
            text,
            timing,
            logprobs=row.logprobs if params.logprobs is not None else None,
            prompt_logprobs=row.prompt_logprobs if params.prompt_logprobs is not None else None,
            cumulative_logprob=sum(t.logprob for t in row.logprobs) if params.scores else None,
            prompt_token_ids=row.prompt,
        )


def _nbytes(array: np.ndarray | torch.Tensor) -> int:
    return array.nbytes if isinstance(array, np.ndarray) else array.numel() * array.element_size()


def check_stop(row: Row, eos: int) -> FinishReason | None:
    """Why the row ends after its latest token, if it does (vLLM's check_stop)."""
    token = row.generated[-1]
    # A stop string wins over "length" when the last allowed token completes it.
    if (token == eos and not row.params.ignore_eos) or (row.stream and row.stream.stopped):
        return "stop"
    if len(row.generated) >= row.params.max_tokens:
        return "length"
    return None


class _WindowClock:
    """Adds up the steps between two windows."""

    def __init__(self) -> None:
        self.steps_total = 0
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.start = now
        self.steps = self.rows = self.prompt_tokens = self.reused = self.generated = 0
        self.waiting = 0
        self.occupancy = 0.0

    def step(self, plan: StepPlan, waiting: int, occupancy: float) -> None:
        self.steps += 1
        self.steps_total += 1
        self.rows += plan.rows
        self.prompt_tokens += plan.prompt_tokens
        self.reused += plan.reused
        self.waiting += waiting
        self.occupancy += occupancy

    def window(self, index: int, finished: list[Finished]) -> Window:
        now = time.perf_counter()
        stats = WindowStats(
            index=index,
            steps=self.steps,
            mean_rows=self.rows / self.steps,
            occupancy=self.occupancy / self.steps,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated,
            seconds=now - self.start,
            reused_tokens=self.reused,
            waiting=self.waiting / self.steps,
        )
        self._reset(now)
        return Window(finished, stats)


def _step_record(index: int, emitted: Emitted, chosen: list[tuple[int, Row, int]]) -> Step:
    """The step as callers see it: each request's first choice that got a token."""
    first = [(i, row, token) for i, row, token in chosen if row.choice == 0]
    outputs = [i for i, _, _ in first]
    return Step(
        index,
        [row.index for _, row, _ in first],
        np.array([token for _, _, token in first], np.int64),
        lambda: emitted.outputs.logits.to(CPU()).to_numpy()[outputs],
    )
