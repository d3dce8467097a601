"""One `batchgen run`: check every argument and file, load the model, then run the job.

The checks come first and import nothing heavy, so a run that cannot start says so at once
and leaves every file as it was; OUTPUT is opened only once the model has loaded.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from batchgen.job import ledger

if TYPE_CHECKING:
    from batchgen.engine import Engine


class JobError(Exception):
    """The job cannot start (exit 1); no file has been touched."""


@dataclass(frozen=True)
class JobOptions:
    """Everything `batchgen run` was asked to do; paths are None for stdin/stdout."""

    input: Path | None
    output: Path | None
    model: str = "gpt2"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    window: int = 1024
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    resume: bool = False
    overwrite: bool = False
    metrics: Path | None = None
    token_ids: bool = False
    progress: bool = False


def usage_problem(options: JobOptions) -> str | None:
    """What is wrong with the options themselves (a usage error), if anything."""
    if options.resume and options.overwrite:
        return "--resume and --overwrite exclude each other"
    if options.resume and options.output is None:
        return "--resume needs an OUTPUT file, not stdout"
    if "" in options.stop:
        return "--stop must not be empty"
    named = {"INPUT": options.input, "OUTPUT": options.output}
    for path, name in ((options.output, "OUTPUT"), (options.metrics, "--metrics")):
        for other_name, other in named.items():
            if path and other and other_name != name and ledger.same_file(path, other):
                return f"{name} {path} is the {other_name} file too"
    return None


def run_file_job(options: JobOptions) -> dict[str, Any]:
    """Run the job; return its summary. JobError when it cannot start."""
    opened = _open_input(options.input)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(opened)
        try:
            output = ledger.claim(
                options.output, resume=options.resume, overwrite=options.overwrite
            )
            stack.callback(output.close)
            metrics = None
            if options.metrics:
                metrics = ledger.claim(
                    options.metrics,
                    resume=options.resume,
                    overwrite=options.overwrite,
                    kind="metrics",
                )
                stack.callback(metrics.close)
        except ledger.ClaimError as error:
            raise JobError(str(error)) from None
        # The heavy imports (torch, MAX, transformers) wait until every check has passed.
        from tqdm import tqdm

        from batchgen.engine import SamplingParams
        from batchgen.job.inputs import Defaults, count_lines, read_lines
        from batchgen.job.runner import RunConfig, run_job

        total = None  # the bar's total costs a pass over INPUT: only for a bar, only for a file
        if options.progress and options.input is not None:
            total = count_lines(options.input) - len(output.done)
        engine = load_engine(options.model, options.device, options.dtype)
        params = SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            stop=options.stop,
        )
        config = RunConfig(options.batch_size, options.window, options.token_ids, options.model)
        progress = stack.enter_context(
            tqdm(total=total, unit="req", disable=not options.progress, file=sys.stderr)
        )
        try:
            return run_job(
                read_lines(source),
                engine,
                Defaults(params, options.seed),
                config,
                output,
                metrics,
                progress,
            )
        except ledger.ClaimError as error:
            raise JobError(str(error)) from None
        except OSError as error:  # a full disk, say; --resume cuts a line torn by it
            raise JobError(
                f"I/O error mid-run: {error}; --resume continues once it is fixed"
            ) from error


def load_engine(model: str, device: str, dtype: str) -> Engine:
    """The compiled engine, or JobError naming why the model cannot load.

    Loading and compiling run in a worker thread while this one waits: a signal handler runs
    only in the main thread between bytecodes, and a cold compile holds the thread that calls
    it for a minute or more (MAX lets go of the GIL meanwhile), so Ctrl-C is answered at once.
    """
    from transformers.utils import logging

    from batchgen.engine import Engine, EngineConfig

    logging.disable_progress_bar()  # transformers' loading bar would garble the job's stderr
    loaded: list[Engine] = []
    failed: list[BaseException] = []

    def load() -> None:
        try:
            loaded.append(Engine.from_pretrained(model, EngineConfig(device=device, dtype=dtype)))
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            failed.append(error)

    # A daemon: an interrupted start-up exits without waiting for the compile to end.
    worker = threading.Thread(target=load, name="batchgen-load", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failed and isinstance(failed[0], OSError | ValueError):
        raise JobError(f"cannot load model {model!r}: {failed[0]}") from failed[0]
    if failed:
        raise failed[0]
    return loaded[0]


def _open_input(path: Path | None) -> contextlib.AbstractContextManager[IO[bytes]]:
    if path is None:
        return contextlib.nullcontext(sys.stdin.buffer)
    try:
        return path.open("rb")
    except OSError as error:
        raise JobError(f"cannot read {path}: {error.strerror}") from None
