"""The engine a job runs, loaded so that Ctrl-C is answered and failures name the model."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

from batchgen.job.errors import JobError

if TYPE_CHECKING:
    from batchgen.engine import Engine, EngineConfig


def locate_model(model: str) -> None:
    """JobError, in one line saying what to do, when the model is nowhere to be loaded from."""
    from batchgen.job.models import ModelNotFound, locate

    try:
        locate(model)
    except ModelNotFound as error:
        raise JobError(str(error)) from None


def load_engine(model: str, config: EngineConfig) -> Engine:
    """The compiled engine, or JobError naming why the model cannot load.

    Loading and compiling run in a worker thread while this one waits: a signal handler runs
    only in the main thread between bytecodes, and a cold compile holds the thread that calls
    it for a minute or more (MAX lets go of the GIL meanwhile), so Ctrl-C is answered at once.
    """
    from transformers.utils import logging

    from batchgen.engine import Engine
    from batchgen.engine.kernels import KernelBuildError

    logging.disable_progress_bar()  # transformers' loading bar would garble the job's stderr
    loaded: list[Engine] = []
    failed: list[BaseException] = []

    def load() -> None:
        # The threads MAX starts from here inherit this mask: a Ctrl-C sent to the process
        # then reaches the main thread, never one that cannot act on it (a read of stdin in
        # the main thread would wait on forever).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            loaded.append(Engine.from_pretrained(model, config))
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            failed.append(error)

    # A daemon: an interrupted start-up exits without waiting for the compile to end.
    worker = threading.Thread(target=load, name="batchgen-load", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failed and isinstance(failed[0], OSError | ValueError | KernelBuildError):
        raise JobError(f"cannot load model {model!r}: {failed[0]}") from failed[0]
    if failed:
        raise failed[0]
    return loaded[0]
