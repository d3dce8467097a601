"""Shared fixtures: seeded random checkpoints, their HF reference models, compiled engines.

Compiling a graph costs seconds warm and a minute or more cold, so every engine here is
session-scoped: one compile per checkpoint shape for the whole test run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from batchgen.engine import Engine
from batchgen.testing import write_random_checkpoint
from batchgen.weights import load_tokenizer

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


@pytest.fixture(scope="session")
def engine(tiny_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_dir)


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
