"""The batch job: input lines -> requests -> engine -> result lines, streamed.

`drive` is the one driver loop (filter, signals, writing, setup record, shard marker); a
`Backend` runs the engine(s) for it: `LocalBackend` here, others named in job/backends.py.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from batchgen.engine import (
    Completion,
    ContextLengthError,
    Engine,
    Request,
    SchedulerConfig,
    Timing,
    WindowStats,
)
from batchgen.engine.sampling import SamplingParams
from batchgen.engine.transcript import STOP_STRINGS, render
from batchgen.job.batching import JobRequest, pack
from batchgen.job.inputs import Defaults, Form, JobLine, JsonId, LineError, parse_line
from batchgen.job.ledger import Claim, Done
from batchgen.job.loading import load_engine
from batchgen.job.metrics import RunStats, window_record
from batchgen.job.options import RunSettings
from batchgen.job.outputs import InputOrder, JobWriter, Result, error_line, result_line
from batchgen.job.shards import Shard
from batchgen.job.signals import Interrupted, SignalGuard

if TYPE_CHECKING:
    from batchgen.job.options import JobOptions


@dataclass(frozen=True)
class RunConfig:
    """How a job is scheduled and reported."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    window: int = RunSettings.window  # requests read ahead and ordered (see _ordered)
    token_ids: bool = False  # also write each completion's token ids
    model_name: str = "gpt2"
    shard: Shard | None = None  # run only this shard's lines
    chat_template: str | None = None  # Jinja text; None: the transcript GPT-2 continues
    order: str = RunSettings.order  # "finished": lines as they finish; "input": INPUT's order


@dataclass(frozen=True)
class LineBatch:
    """Output lines finished together, as a backend hands them to the sink to write."""

    lines: list[bytes]
    numbers: list[int]  # each one's input line number
    ok: list[bool]  # whether each is a result (False: an error line)
    window: WindowStats | None = None  # the engine window they finished in; None: error lines
    timings: list[Timing] = field(default_factory=list)
    worker: str | None = None  # the engine's process, where it is not this one

    @property
    def failed(self) -> int:
        return self.ok.count(False)


# A line the driver admitted: its raw bytes (what a remote engine parses again) and its parse.
Admitted = tuple[bytes, JobLine | LineError]
# The input line that enough finished lines wait for (None: none): start no more once it runs.
Hold = Callable[[], int | None]


class Backend(Protocol):
    """Where a job's engines run: admitted lines in, batches of finished lines out."""

    def __init__(self, options: JobOptions, config: RunConfig) -> None: ...

    @classmethod
    def check(cls, options: JobOptions) -> None:
        """What --dry-run can check without starting anything; JobError if it cannot run."""

    def start(self, jobs: Iterator[Admitted]) -> contextlib.AbstractContextManager[float]:
        """Engines ready for `jobs`; gives the run clock's start. OUTPUT opens only after."""

    def batches(
        self, on_error: Callable[[LineError], None], check: Callable[[], None], hold: Hold
    ) -> Iterator[LineBatch]:
        """Finished lines as they come; lines refused on the way go to `on_error` at once,
        `check` runs between steps (a signal raised there ends the run), and while `hold`
        names a line, no more are started once it runs (--order input's bound)."""

    def setup(self, interrupted: str | None) -> tuple[float, dict[str, Any]]:
        """Seconds of setup inside the run's clock (not run time), and the setup record."""


def drive(
    backend: Backend,
    lines: Iterable[tuple[int, bytes]],
    defaults: Defaults,
    config: RunConfig,
    output: Claim,
    metrics: Claim | None = None,
    progress: tqdm | None = None,
    marker: Path | None = None,
    errors: Claim | None = None,
) -> dict[str, Any]:
    """Run every line `output` (and `errors`) does not already hold, one output line per
    input line: error lines go to `errors` where there is one.

    Returns the run summary. A first SIGINT/SIGTERM abandons the requests in flight and ends
    the run early ("interrupted" names the signal); OUTPUT holds only whole lines either way.
    An engine failure propagates, also leaving only whole lines. The shard's old `marker`
    goes once the backend has started.
    """
    stats = RunStats()
    admit = LineFilter(defaults, done_by(output, errors), stats, config.shard).admit
    order = InputOrder() if config.order == "input" else None

    def admitted() -> Iterator[Admitted]:
        for number, raw in lines:
            job = admit(number, raw)
            if job is not None:
                if order is not None:
                    order.expect(number)
                yield raw, job

    def hold() -> int | None:
        return order.waiting_on(config.window) if order is not None else None

    jobs = admitted()
    head = list(_through_first_runnable(jobs))
    claims = (output, metrics, errors)
    if not head or not isinstance(head[-1][1], JobLine):
        # No line can run (all bad, or OUTPUT holds them all): no model is loaded for it.
        if marker:
            marker.unlink(missing_ok=True)
        with SignalGuard() as signals:
            sink = JobSink(claims, stats, signals, progress, order=order)
            for _, error in head:
                assert isinstance(error, LineError)
                sink.error(error)
            return sink.close(0.0, run_setup(config, None, None))
    with backend.start(itertools.chain(head, jobs)) as clock:
        if marker:
            marker.unlink(missing_ok=True)  # this shard is being rewritten: no longer complete
        interrupted: str | None = None
        with SignalGuard() as signals:
            sink = JobSink(claims, stats, signals, progress, clock, order)
            try:
                for batch in backend.batches(sink.error, signals.check, hold):
                    sink.write(batch)
                signals.check()
            except Interrupted as error:
                interrupted = str(error)
            with signals.shielded():  # a second signal must not cut what is still to write
                setup_s, setup = backend.setup(interrupted)
                return sink.close(setup_s, setup)


def _through_first_runnable(jobs: Iterator[Admitted]) -> Iterator[Admitted]:
    """The lines up to the first that can run (those before it are error lines)."""
    for item in jobs:
        yield item
        if isinstance(item[1], JobLine):
            return


def done_by(output: Claim, errors: Claim | None) -> Done:
    """What OUTPUT and the error file already account for, together."""
    return output.done if errors is None else output.done.joined(errors.done)


class LocalBackend:
    """The engine in this process: loaded and compiled once, then fed a window at a time."""

    def __init__(self, options: JobOptions, config: RunConfig):
        self.options = options
        self.config = config
        self.jobs: Iterator[Admitted] = iter(())
        self.engine: Engine | None = None
        self.sampler_s = 0.0

    @classmethod
    def check(cls, options: JobOptions) -> None:
        """Nothing to check beyond what every run checks."""

    @contextlib.contextmanager
    def start(self, jobs: Iterator[Admitted]) -> Iterator[float]:
        self.engine = load_engine(self.options.model, self.options.engine_config())
        self.sampler_s = self.engine.timings.sampler_compile_s
        self.jobs = jobs
        yield time.perf_counter()

    def batches(
        self, on_error: Callable[[LineError], None], check: Callable[[], None], hold: Hold
    ) -> Iterator[LineBatch]:
        engine, config = self._engine(), self.config
        tokenizer = LineTokenizer(engine, config.chat_template)
        items = (tokenizer.requests(job) for _, job in self.jobs)
        for results, window in run_requests(engine, items, config, on_error, check, hold):
            written = [
                result_line(r, config.model_name, config.token_ids, engine.vocab_bytes)
                for r in results
            ]
            timings = [r.completion.timing for r in results]
            numbers = [r.job.line for r in results]
            lines, ok = [line for line, _ in written], [ok for _, ok in written]
            yield LineBatch(lines, numbers, ok, window, timings)

    def setup(self, interrupted: str | None) -> tuple[float, dict[str, Any]]:
        engine = self._engine()
        # Compiling the sampler mid-run, the first time a line samples, is setup.
        setup_s = engine.timings.sampler_compile_s - self.sampler_s
        return setup_s, run_setup(self.config, interrupted, engine)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("the local backend has not started")
        return self.engine


def run_requests(
    engine: Engine,
    items: Iterable[list[JobRequest] | LineError],
    config: RunConfig,
    on_error: Callable[[LineError], None],
    check: Callable[[], None] = lambda: None,
    hold: Hold = lambda: None,
) -> Iterator[tuple[list[Result], WindowStats]]:
    """Stream the requests through the engine; yield each window's results as they finish
    (a line of several prompts once all of them have).

    Error lines go to `on_error` as soon as they are read; `check` runs after every step (a
    signal raised there abandons the requests in flight); while `hold` names a line that the
    engine is running, no request is started.
    """
    pending: dict[int, JobRequest] = {}
    # By input line, per prompt: every line the engine has started and not finished.
    parts: dict[int, list[list[Completion] | None]] = {}
    arrivals = itertools.count()
    flat = (one for item in items for one in ([item] if isinstance(item, LineError) else item))

    def requests() -> Iterator[Request | None]:
        for item in _ordered(flat, config):
            if isinstance(item, LineError):
                on_error(item)
                continue
            pending[next(arrivals)] = item
            parts.setdefault(item.job.line, [None] * max(len(item.job.prompts), 1))
            yield item.request
            # Nothing to start this step (the engine's None) while the line held lines wait
            # for runs: it will finish, so the engine is never left idle by it.
            while hold() in parts:
                yield None

    stream = engine.stream(requests(), lambda _step: check(), config.scheduler)
    for window in stream:
        record = window_record(window.stats, len(window.finished))
        results = []
        for finished in window.finished:
            item = pending.pop(finished.index)
            line = parts[item.job.line]
            line[item.part] = finished.completions
            if all(choices is not None for choices in line):
                del parts[item.job.line]
                results.append(Result(item.job, line, record))  # type: ignore[arg-type]
        yield results, window.stats


def _ordered(
    items: Iterable[JobRequest | LineError], config: RunConfig
) -> Iterator[JobRequest | LineError]:
    """The order requests reach the engine, a window of them at a time (errors at once).

    Continuous batching takes the longest (max_tokens) first, so a job does not end on a
    tail of a few long rows decoding alone; static batches are cut from requests sorted by
    length, so a batch's rows end at about the same time. With --order input they start in
    input order: the line results wait for is then always one the engine already runs.
    """
    if config.order == "input":
        yield from items
        return
    static = config.scheduler.policy == "static"
    for work in pack(items, config.scheduler.max_rows, config.window, longest_first=not static):
        if isinstance(work, LineError):
            yield work
        else:
            yield from work


class JobSink:
    """Writes a run's lines as they come, each write whole and flushed, and counts them: the
    one place results are written (OUTPUT, the error file, the metrics file)."""

    def __init__(
        self,
        claims: tuple[Claim, Claim | None, Claim | None],
        stats: RunStats,
        signals: SignalGuard,
        progress: tqdm | None,
        start: float | None = None,
        order: InputOrder | None = None,
    ):
        """`claims`: OUTPUT, the metrics file, the error file; `start`: when the run's clock
        started (default: now, once OUTPUT is open); `order`: OUTPUT in input order."""
        output, metrics, errors = claims
        self.stats = stats
        self.signals = signals
        self.progress = progress
        self.order = order
        with signals.shielded():  # the caller closes the claims
            self.writer = JobWriter(output.open())
            self.metrics = JobWriter(metrics.open()) if metrics else None
            self.errors = JobWriter(errors.open()) if errors else None
        self.start = time.perf_counter() if start is None else start
        if progress is not None:
            progress.reset()  # the bar's rate and ETA leave out the loading and compiling

    def error(self, error: LineError) -> None:
        """A line refused before it ran: its error line, at once."""
        self.write(LineBatch([error_line(error)], [error.line], [False]))

    def write(self, batch: LineBatch) -> None:
        """Lines finished together, whole; an engine window's also a metrics line."""
        window = batch.window
        rows = list(zip(batch.numbers, batch.lines, batch.ok, strict=True))
        # OUTPUT's share, by input line: None for an error line that goes to the error file.
        to_errors = self.errors is not None
        share = [(n, None if to_errors and not ok else line) for n, line, ok in rows]
        with self.signals.shielded():
            if self.errors is not None:
                self.errors.write([line for _, line, ok in rows if not ok])
            if self.order is not None:
                self.writer.write(self.order.ready(share))
            else:
                self.writer.write([line for _, line in share if line is not None])
            if self.metrics and window is not None:
                worker = {"worker": batch.worker} if batch.worker else {}
                record = window_record(window, len(rows))
                self.metrics.write_record({"type": "window", **record, **worker})
        if window is None:
            self.stats.failed += len(rows)
        else:
            self.stats.add_window(window, batch.timings, failed=batch.failed)
        self._advance(len(rows))

    def close(self, setup_s: float, setup: dict[str, Any]) -> dict[str, Any]:
        """The run summary (also the metrics file's last line); `setup_s` is not run time."""
        run_s = time.perf_counter() - self.start - setup_s
        summary = self.stats.summary(run_s, setup)
        with self.signals.shielded():
            if self.order is not None:  # an interrupted run: what finished, out of order
                self.writer.write(self.order.rest())
            if self.metrics:
                self.metrics.write_record(summary)
        return summary

    def _advance(self, n: int) -> None:
        if self.progress is not None:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            rate = f"{self.stats.generated_tokens / elapsed:.0f} tok/s"
            self.progress.set_postfix_str(rate, refresh=False)
            self.progress.update(n)


class LineFilter:
    """Which lines this run takes: its shard's, less what OUTPUT holds; duplicate ids refused."""

    def __init__(self, defaults: Defaults, done: Done, stats: RunStats, shard: Shard | None):
        self.defaults = defaults
        self.done = done
        self.stats = stats
        self.shard = shard
        self.seen: set[JsonId] = set()
        self.form: Form = "native"  # the file's, as far as read: for lines that cannot be

    def admit(self, number: int, raw: bytes) -> JobLine | LineError | None:
        """The parsed line, its error line, or None when this run leaves it alone."""
        item = parse_line(number, raw, self.defaults, self.form)
        self.form = item.form
        if self.shard is not None and not self.shard.holds(item.id, number):
            return None
        first = item.id is None or item.id not in self.seen
        if item.id is not None:
            self.seen.add(item.id)
        if self.done.covers(number, item.id if first else None):
            self.stats.skipped += 1
            self.stats.failed_earlier += number in self.done.error_lines
            return None
        if isinstance(item, JobLine) and not first:
            field = "custom_id" if item.form == "openai" else "id"
            return item.error(field, f"duplicate {field} {item.id!r}: not run again")
        return item


class LineTokenizer:
    """Lines -> engine requests: chats rendered, prompts tokenized, checked against one
    engine's model."""

    def __init__(self, engine: Engine, chat_template: str | None = None):
        self.engine = engine
        self.chat_template = chat_template
        # No token is longer than the vocabulary's longest, so a prompt of more characters
        # than this cannot fit; it is refused untokenized (a multi-MB prompt takes seconds).
        self.max_chars = engine.config.n_positions * max(map(len, engine.vocab_bytes))

    def requests(self, item: JobLine | LineError) -> list[JobRequest] | LineError:
        """The line's requests (one per prompt), or its error line when one cannot run."""
        if isinstance(item, LineError):
            return item
        job = item
        params = job.params
        prompts = job.prompts
        if job.messages is not None:
            try:
                prompts = [render(self.engine.tokenizer, job.messages, self.chat_template)]
            except Exception as error:  # noqa: BLE001 - a template that fails is one line's
                return job.error("messages", f"the chat template cannot render them: {error}")
            if self.chat_template is None:  # the transcript's reply ends at the next turn
                params = replace(params, stop=(*params.stop, *STOP_STRINGS))
        requests = []
        for part, prompt in enumerate(prompts):
            request = self._request(job, prompt, params)
            if isinstance(request, LineError):
                return request
            requests.append(JobRequest(job, request, part))
        return requests

    def _request(
        self, job: JobLine, prompt: str | list[int], params: SamplingParams
    ) -> Request | LineError:
        engine = self.engine
        context = engine.config.n_positions
        if isinstance(prompt, str):
            if len(prompt) > self.max_chars:
                message = f"prompt ({len(prompt)} characters) exceeds the model's context"
                return job.error("prompt", f"{message} of {context} tokens")
            try:
                ids = engine.tokenizer(prompt, verbose=False).input_ids
            except Exception as error:  # noqa: BLE001 - a prompt the tokenizer rejects is one line's
                return job.error("prompt", f"cannot be tokenized: {error}")
        else:
            ids = prompt
        request = Request(ids, params)
        try:
            engine.check(request)
        except ContextLengthError as error:
            return job.error("max_tokens" if len(ids) < context else "prompt", str(error))
        except ValueError as error:
            field = "n" if "choices" in str(error) else "prompt"
            return job.error("logit_bias" if "logit_bias" in str(error) else field, str(error))
        return request


def run_setup(
    config: RunConfig, interrupted: str | None, engine: Engine | None, where: str = ""
) -> dict[str, Any]:
    """Where the run ran and what it cost before generating; kept apart from throughput.

    `engine` is None where the engines load elsewhere (Ray actors, described by `where`):
    their setup is inside run_s; and where none loaded (`where` empty: no line could run).
    """
    timings = asdict(engine.timings) if engine else {}

    def seconds(name: str) -> float | None:
        return round(timings[name], 3) if engine else None

    return {
        "model": config.model_name,
        "device": engine.device.label if engine else where,
        "dtype": str(engine.dtype).removeprefix("DType.") if engine else None,
        "kv_cache": engine.cache.kind if engine else None,
        "schedule": config.scheduler.policy,
        "max_rows": config.scheduler.max_rows,
        "prefix_cache": config.scheduler.prefix_cache,
        "load_s": seconds("load_s"),
        "compile_s": seconds("compile_s"),
        "sampler_compile_s": seconds("sampler_compile_s"),
        "shard": str(config.shard) if config.shard else None,
        "interrupted": interrupted,  # the signal's name, or None
    }
