"""Ray Data backend: a pool of actors, each loading and compiling the engine once in `__init__`,
maps batches of input lines to output lines; `RayBackend` hands them to the job's driver loop,
which writes them as a local run's.

`generate(ds, config)` is the same thing for Ray users: a Dataset of prompt rows in, a
Dataset of result rows out. Ray is imported only here (the `batchgen[ray]` extra).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

# pyarrow's compute kernels crash (SIGSEGV) when first used after MAX has compiled a graph in
# the same process (MAX 26.7, pyarrow 26); loaded before any compile, they work.
import pyarrow.compute  # noqa: F401, I001
import ray
from ray.data import ActorPoolStrategy

from batchgen.engine import EngineConfig, Timing
from batchgen.job import records
from batchgen.job.batching import JobRequest
from batchgen.job.errors import JobError
from batchgen.job.inputs import Defaults, JobLine, LineError, parse_line
from batchgen.job.loading import load_engine
from batchgen.job.metrics import window_from_record
from batchgen.job.options import RaySettings
from batchgen.job.outputs import error_line, result_line
from batchgen.job.runner import (
    Admitted,
    Hold,
    LineBatch,
    LineTokenizer,
    RunConfig,
    run_requests,
    run_setup,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from ray.data import Dataset

    from batchgen.job.options import JobOptions

# Lines handed to an actor per call: several times the rows it runs at once, so that the
# engine refills finished rows from the same call for most of it.
BATCHES_PER_CALL = 4
MAX_TASK_RETRIES = 3
NO_ROW_ID = "a row needs an id (or a custom_id): its result row is found by it"


class RayJobError(JobError):
    """Ray cannot run this job (too few resources, no cluster, actors failed): exit 1."""


@dataclass(frozen=True)
class RayConfig:
    """The model each actor runs, its engine, its decoding defaults, and the actor pool."""

    model: str
    engine: EngineConfig = field(default_factory=EngineConfig)  # its scheduler: rows per actor
    defaults: Defaults = field(default_factory=Defaults)  # as `batchgen run`'s options set them
    pool: RaySettings = field(default_factory=RaySettings)
    token_ids: bool = False


def generate(ds: Dataset, config: RayConfig) -> Dataset:
    """Prompt rows -> result rows, one for one, over an actor pool.

    A row holds a native line's fields (`id`, `prompt`, and optionally `max_tokens`,
    `temperature`, `top_k`, `top_p`, `seed`, `stop`, `ignore_eos`, `metadata`; null means
    not given) or an OpenAI batch line's (`custom_id`, `body`, ...). A result row holds `id`,
    `text`, `finish_reason`, `prompt_tokens`, `completion_tokens` and `error` (null, or why
    the row could not run).
    """
    call_size = config.engine.scheduler.max_rows * BATCHES_PER_CALL
    return _map(ds, config, ray.cluster_resources(), call_size)


def _map(ds: Dataset, config: RayConfig, resources: dict[str, float], call_size: int) -> Dataset:
    cpus = actor_cpus(config, resources)
    return ds.map_batches(
        Generator,
        fn_constructor_kwargs={"config": config},
        batch_size=call_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=config.pool.actors),
        num_cpus=cpus,
        num_gpus=config.pool.gpus_per_actor or None,
        # A crashed actor's batch is retried, but not forever: a line that kills every actor
        # it meets would otherwise hang the job.
        max_task_retries=MAX_TASK_RETRIES,
    )


def actor_cpus(config: RayConfig, resources: dict[str, float]) -> float:
    """CPUs per actor that leave one for Ray Data's own read and write tasks; RayJobError if the
    asked-for pool cannot start at all (Ray would wait for it forever, without an error)."""
    pool = config.pool
    total_cpus = resources.get("CPU", 0.0)
    total_gpus = resources.get("GPU", 0.0)
    if pool.gpus_per_actor * pool.actors > total_gpus:
        raise RayJobError(
            f"{pool.actors} actors x {pool.gpus_per_actor} GPUs need "
            f"{pool.actors * pool.gpus_per_actor:g} GPUs; the Ray cluster has {total_gpus:g}"
        )
    spare = total_cpus - 1  # Ray Data's tasks starve, and the job hangs, with none left
    cpus = pool.cpus_per_actor
    if cpus is None:
        cpus = min(1.0, spare / pool.actors) if spare > 0 else 0.0
    if cpus <= 0 or cpus * pool.actors > spare:
        raise RayJobError(
            f"{pool.actors} actors x {cpus:g} CPUs leave no CPU of this Ray cluster's "
            f"{total_cpus:g} for Ray Data's own tasks, and the job would hang: use fewer "
            "--actors or a smaller --cpus-per-actor (fractions such as 0.5 work)"
        )
    return cpus


class Generator:
    """One actor: loads and compiles the engine once, then maps batches of lines or rows."""

    def __init__(self, config: RayConfig):
        self.config = config
        self.engine = load_engine(config.model, config.engine)
        scheduler = config.engine.scheduler
        self.run_config = RunConfig(scheduler, token_ids=config.token_ids, model_name=config.model)
        self.tokenizer = LineTokenizer(self.engine)
        self.defaults = config.defaults
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.windows = 0  # this actor's windows so far, over all calls

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        if "raw" in batch.column_names:  # `batchgen run --backend ray`: input lines
            numbers = batch.column("line").to_pylist()
            lines = list(zip(numbers, batch.column("raw").to_pylist(), strict=True))
            return pa.Table.from_pylist(list(self.run_lines(lines)))
        return pa.Table.from_pylist(
            [records.summary(orjson.loads(row["output"])) for row in self._rows(batch.to_pylist())]
        )

    def run_lines(self, lines: list[tuple[int, bytes]]) -> Iterator[dict[str, Any]]:
        """An output row per line: its output line, whether it is a result, the window it
        finished in (with this actor's name) and its timing; error lines have neither."""
        yield from self._run([self._parsed(number, raw) for number, raw in lines])

    def _parsed(self, number: int, raw: bytes) -> list[JobRequest] | LineError:
        return self.tokenizer.requests(parse_line(number, raw, self.defaults))

    def _run(self, items: list[list[JobRequest] | LineError]) -> Iterator[dict[str, Any]]:
        errors: list[LineError] = []
        first = self.windows
        for results, _ in run_requests(self.engine, items, self.run_config, errors.append):
            yield from _error_rows(errors)
            self.windows += 1
            for result in results:
                vocab = self.engine.vocab_bytes
                line, ok = result_line(result, self.config.model, self.config.token_ids, vocab)
                index = first + result.window["index"]  # each call's windows count from 0
                window = orjson.dumps({"worker": self.worker, **result.window, "index": index})
                timing = orjson.dumps(asdict(result.completion.timing))
                yield {"line": result.job.line, "output": line, "ok": ok, "window": window,
                       "timing": timing}  # fmt: skip
        yield from _error_rows(errors)

    def _rows(self, rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        items: list[list[JobRequest] | LineError] = []
        for number, row in enumerate(rows, start=1):
            # A Dataset's rows share one schema: a field another row has is null in this one.
            given = {k: v for k, v in row.items() if v is not None}
            if "id" in given or "custom_id" in given:
                items.append(self._parsed(number, orjson.dumps(given)))
            else:  # a Dataset has no line numbers to stand in for ids
                items.append(LineError(number, None, "native", "id", NO_ROW_ID))
        yield from self._run(items)


def _error_rows(errors: list[LineError]) -> Iterator[dict[str, Any]]:
    """The error lines gathered so far (a prompt too long, say), as output rows; clears them."""
    for error in errors:
        yield {"line": error.line, "output": error_line(error), "ok": False, "window": None,
               "timing": None}  # fmt: skip
    errors.clear()


class RayBackend:
    """`batchgen run --backend ray`: the driver reads and filters the lines, actors generate."""

    def __init__(self, options: JobOptions, config: RunConfig):
        self.config = config
        self.ray = options.ray
        self.ray_config = RayConfig(
            options.model, options.engine_config(), options.defaults(), options.ray,
            options.run.token_ids,
        )  # fmt: skip
        self.errors: list[LineError] = []  # lines the driver refused as it read them
        self.blocks: Iterator[dict[str, Any]] = iter(())

    @classmethod
    def check(cls, options: JobOptions) -> None:
        check_reachable(options.ray.address)

    @contextlib.contextmanager
    def start(self, jobs: Iterator[Admitted]) -> Iterator[float]:
        """Every line read, the pool started, and its first block back (or no lines)."""
        rows: list[dict[str, Any]] = []
        for raw, item in jobs:
            if isinstance(item, LineError):
                self.errors.append(item)
            elif isinstance(item, JobLine):
                rows.append({"line": item.line, "raw": raw})
        with _ray_session(self.ray.address) as resources:
            start = time.perf_counter()
            if rows:
                # Several engine batches per call, but never fewer calls than actors.
                per_call = self.config.scheduler.max_rows * BATCHES_PER_CALL
                call_size = min(per_call, -(-len(rows) // self.ray.actors))
                items = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // call_size))
                mapped = _map(items, self.ray_config, resources, call_size)
                results = iter(mapped.iter_batches(batch_size=None))
                # Nothing is written before an actor has loaded the model and sent a block
                # back: a model that cannot load leaves OUTPUT as it was, as on the local backend.
                first = next(results, None)
                self.blocks = itertools.chain([first] if first is not None else [], results)
            yield start

    def batches(
        self, on_error: Callable[[LineError], None], check: Callable[[], None], hold: Hold
    ) -> Iterator[LineBatch]:
        """The actors' blocks as they come back; `hold` is not applied: Ray Data streams
        whole blocks, and the driver has read every line already."""
        for error in self.errors:
            on_error(error)
        for block in self.blocks:
            check()
            yield from block_batches(block)

    def setup(self, interrupted: str | None) -> tuple[float, dict[str, Any]]:
        """The actors' loading and compiling happen inside the run's clock: no setup time."""
        where = f"ray ({self.ray.actors} actors, device {self.ray_config.engine.device})"
        return 0.0, run_setup(self.config, interrupted, None, where)


def block_batches(block: dict[str, Any]) -> Iterator[LineBatch]:
    """The actors' rows of one block, a batch per engine window (a metrics line each)."""
    by_window: dict[bytes | None, list[int]] = {}
    for i, key in enumerate(block["window"]):
        by_window.setdefault(key, []).append(i)
    for key, rows in by_window.items():
        lines = [bytes(block["output"][i]) for i in rows]
        numbers = [int(block["line"][i]) for i in rows]
        ok = [bool(block["ok"][i]) for i in rows]
        if key is None:  # error lines the actors wrote (a prompt too long, say)
            yield LineBatch(lines, numbers, ok)
            continue
        record = orjson.loads(key)
        worker = record.pop("worker")
        timings = [Timing(**orjson.loads(block["timing"][i])) for i in rows]
        yield LineBatch(lines, numbers, ok, window_from_record(record), timings, worker)


def check_reachable(address: str | None) -> None:
    """Fail at once on a HOST:PORT nobody answers at; Ray itself retries for minutes."""
    host, colon, port = (address or "").rpartition(":")
    if not (colon and host and port.isdigit()) or "://" in address:
        return  # a local Ray, "auto", or a ray:// client address: Ray's own checks apply
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise RayJobError(f"cannot reach the Ray cluster at {address}: {error}") from None


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[dict[str, float]]:
    """Ray for one job, joined at `address` or started locally, and its resources."""
    check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except Exception as error:  # noqa: BLE001 - whatever Ray raises, the job cannot start
        where = f"join Ray at {address}" if address else "start a local Ray"
        raise RayJobError(f"cannot {where}: {error}") from error
    try:
        context = ray.data.DataContext.get_current()
        context.max_errored_blocks = 0  # a failed block fails the job, never drops lines
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        try:
            yield ray.cluster_resources()
        except ray.exceptions.RayError as error:
            # Ray's message carries the remote traceback; its last line names the cause.
            cause = str(error).strip().splitlines()[-1]
            raise RayJobError(f"Ray failed: {cause}") from error
    finally:
        ray.shutdown()
