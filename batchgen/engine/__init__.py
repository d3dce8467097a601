"""The model and how it runs: GPT-2 on MAX, weights, KV caches, scheduling, sampling, text."""

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
