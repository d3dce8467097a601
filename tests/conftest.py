"""Shared fixtures: seeded random checkpoints, their HF reference models, compiled engines.

Compiling a graph costs seconds warm and a minute or more cold, so every engine here is
session-scoped: one compile per checkpoint shape and KV cache for the whole test run. The
`engine` fixture is both caches in turn (`slots`, batchgen's Mojo kernel; `paged`, MAX's), so
every test that takes it holds on both. Parity with transformers is asserted at float32 on
the CPU, whatever the machine has; tests that need a GPU are marked `gpu` and skipped where
MAX sees none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from max.driver import accelerator_count
from transformers import GPT2LMHeadModel

from batchgen.engine import (
    Engine,
    EngineConfig,
    Request,
    SamplingParams,
    SchedulerConfig,
    Step,
)
from batchgen.engine.weights import load_tokenizer
from batchgen.random_checkpoint import write_random_checkpoint

KV_CACHES = ("slots", "paged")
ON_CPU = ("--device", "cpu")  # the same for `batchgen` commands (cpu is float32)


def cpu_config(
    kv_cache: str = "slots", kv_cache_gb: float = 0.25, **scheduler: object
) -> EngineConfig:
    """float32 on the CPU with a small KV cache; `scheduler` overrides SchedulerConfig."""
    return EngineConfig(
        device="cpu",
        dtype="float32",
        kv_cache=kv_cache,  # type: ignore[arg-type]
        kv_cache_gb=kv_cache_gb,
        scheduler=SchedulerConfig(**scheduler),  # type: ignore[arg-type]
    )


CPU_FP32 = cpu_config()

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then",
    "A",
    "In 1905, Albert Einstein published four papers that changed physics:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Ünïcödé and emoji 🎉 survive byte-level BPE",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir: Path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session", params=KV_CACHES)
def engine(request: pytest.FixtureRequest, tiny_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_dir, cpu_config(request.param))


@pytest.fixture(scope="session", params=KV_CACHES)
def small_cache_engine(request: pytest.FixtureRequest, tiny_dir: Path) -> Engine:
    """A cache of 2 slots, or of 19 pages (three rows of 600 tokens)."""
    config = cpu_config(request.param, kv_cache_gb=0.0025, max_rows=8, step_tokens=256)
    return Engine.from_pretrained(tiny_dir, config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if accelerator_count() == 0:
        skip = pytest.mark.skip(reason="needs a GPU, and MAX sees none on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def next_token_logits(engine: Engine, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Float32 logits [len(prompts), vocab] for the token after each prompt."""
    first: dict[int, np.ndarray] = {}

    def record(step: Step) -> None:
        for i, row in enumerate(step.rows):
            first.setdefault(row, step.logits[i])

    engine.generate([Request(p, SamplingParams(max_tokens=1)) for p in prompts], record)
    return np.stack([first[row] for row in range(len(prompts))])


def hf_greedy(model: GPT2LMHeadModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face's greedy continuation of one unpadded prompt, EOS stopping included."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
    return out[0, len(ids) :].tolist()
