"""Seeded random-init GPT-2 checkpoints for tests, benchmarks and offline examples.

The weights are random, so generated text is gibberish; the shapes, the tokenizer and the
numerics are real, which is what tests and throughput measurements need.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from batchgen.engine.weights import BUNDLED_TOKENIZER

# GPT-2's own init (std 0.02) gives near-uniform logits and greedy text that repeats one
# token; a wider init gives varied text with decisive argmaxes, like a trained model's.
SHAPES: dict[str, dict[str, float]] = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, initializer_range=0.2),
    "124M": dict(n_embd=768, n_layer=12, n_head=12, initializer_range=0.05),
}


def write_random_checkpoint(path: Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a seeded random GPT-2 of `shape` plus the GPT-2 tokenizer to `path`."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_positions=1024, **SHAPES[shape])
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    for file in BUNDLED_TOKENIZER.glob("tokenizer*.json"):
        shutil.copy(file, path / file.name)
    return path
