"""The model and how it runs: GPT-2 on MAX, weights, sampling, text, the engine (no files)."""

from batchgen.engine.engine import (
    BatchOutput,
    Completion,
    ContextLengthError,
    Engine,
    EngineConfig,
    Request,
    Step,
)
from batchgen.engine.sampling import SamplingParams

__all__ = [
    "BatchOutput",
    "Completion",
    "ContextLengthError",
    "Engine",
    "EngineConfig",
    "Request",
    "SamplingParams",
    "Step",
]
