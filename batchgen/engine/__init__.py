"""The model and how it runs: GPT-2 on MAX, weights, KV caches, scheduling, sampling, text."""

import signal

# MAX's runtime (and torch's) start native threads as they are imported, and a thread starts
# with its parent's signal mask. Imported with SIGINT and SIGTERM blocked, none of them can
# take a Ctrl-C meant for the main thread, which would then not see it (a read of stdin
# waits on forever). A signal that comes meanwhile is delivered once the mask is restored.
_MASK = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
try:
    from batchgen.engine.engine import (
        Completion,
        ContextLengthError,
        Engine,
        EngineConfig,
        Finished,
        GenerateOutput,
        Request,
        Step,
        Timing,
        Window,
        WindowStats,
    )
    from batchgen.engine.sampling import SamplingParams
    from batchgen.engine.scheduler import SchedulerConfig
finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, _MASK)

__all__ = [
    "Completion",
    "ContextLengthError",
    "Engine",
    "EngineConfig",
    "Finished",
    "GenerateOutput",
    "Request",
    "SamplingParams",
    "SchedulerConfig",
    "Step",
    "Timing",
    "Window",
    "WindowStats",
]
