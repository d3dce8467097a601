"""Numerical parity with Hugging Face transformers' GPT-2, the reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import KV_CACHES, cpu_config, hf_greedy, next_token_logits
from max.driver import CPU
from max.dtype import DType
from transformers import GPT2LMHeadModel

from batchgen.engine import Engine, Request, SamplingParams, SchedulerConfig, Step
from batchgen.engine.weights import load_checkpoint
from batchgen.random_checkpoint import write_random_checkpoint


def hf_next_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def test_prefill_logits_match_hf_for_a_ragged_batch(engine, hf_tiny, prompt_ids):
    lengths = {len(p) for p in prompt_ids}
    assert len(lengths) >= 4, "the batch must mix prompt lengths"
    logits = next_token_logits(engine, prompt_ids)
    for row, ids in enumerate(prompt_ids):
        np.testing.assert_allclose(logits[row], hf_next_logits(hf_tiny, ids), atol=1e-4, rtol=0)


def test_decode_step_logits_match_hf(engine, hf_tiny, prompt_ids):
    """Every KV-cached step of a ragged batch gives HF's full-recompute logits, for rows that
    join while others decode (at most 4 rows at once, prompts prefilled in chunks of 8)."""
    steps: list[Step] = []
    requests = [Request(ids, SamplingParams(max_tokens=6, ignore_eos=True)) for ids in prompt_ids]
    schedule = SchedulerConfig(max_rows=4, step_tokens=8)
    out = engine.generate(requests, on_step=steps.append, schedule=schedule)
    assert len(steps) > 6, "rows should join at different steps"
    seen = [0] * len(prompt_ids)
    for step in steps:
        for i, row in enumerate(step.rows):
            context = prompt_ids[row] + out.completions[row].token_ids[: seen[row]]
            expected = hf_next_logits(hf_tiny, context)
            np.testing.assert_allclose(step.logits[i], expected, atol=1e-4, rtol=0)
            seen[row] += 1
    assert seen == [6] * len(prompt_ids)


@pytest.fixture(scope="module")
def checkpoint_124m(tmp_path_factory: pytest.TempPathFactory):
    """The real GPT-2 124M shape (12 layers, 12 heads, 768 dims) with seeded random weights."""
    path = write_random_checkpoint(tmp_path_factory.mktemp("gpt2-124m"), "124M", seed=1)
    return path, GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=KV_CACHES)
def gpt2_124m(request: pytest.FixtureRequest, checkpoint_124m):
    path, hf = checkpoint_124m
    return Engine.from_pretrained(path, cpu_config(request.param)), hf


def test_124m_shape_logits_and_greedy_match_hf(gpt2_124m, prompt_ids):
    engine, hf = gpt2_124m
    logits = next_token_logits(engine, prompt_ids)
    for row, ids in enumerate(prompt_ids):
        np.testing.assert_allclose(logits[row], hf_next_logits(hf, ids), atol=1e-4, rtol=0)
    out = engine.generate([Request(ids, SamplingParams(max_tokens=12)) for ids in prompt_ids])
    assert [c.token_ids for c in out.completions] == [hf_greedy(hf, ids, 12) for ids in prompt_ids]


def assert_bfloat16_close_to_hf(engine: Engine, hf_tiny, prompt_ids) -> None:
    logits = next_token_logits(engine, prompt_ids)
    assert np.isfinite(logits).all()
    reference = np.stack([hf_next_logits(hf_tiny, ids) for ids in prompt_ids])
    # bfloat16 keeps 8 significant bits: about 1% of these logits' magnitude (up to ~25).
    tolerance = 0.3
    assert np.abs(logits - reference).max() < tolerance
    # The token bfloat16 picks is, by HF's float32 logits, within that error of the best one
    # (this random model's top two are often closer than bfloat16 can tell apart).
    picked = reference[np.arange(len(prompt_ids)), logits.argmax(-1)]
    assert (picked >= reference.max(-1) - 2 * tolerance).all(), (picked, reference.max(-1))
    sampled = SamplingParams(max_tokens=4, temperature=0.8, seed=0)
    out = engine.generate([Request(ids, sampled) for ids in prompt_ids])
    assert all(c.completion_tokens == 4 or c.finish_reason == "stop" for c in out.completions)


def test_bfloat16_engine_runs_clean_and_close_to_hf(tiny_dir, hf_tiny, tokenizer, prompt_ids):
    """bfloat16 is MAX's GPU default; run that graph here (slowly, on CPU) to catch dtype slips."""
    checkpoint = load_checkpoint(tiny_dir, torch.bfloat16)
    engine = Engine(checkpoint, CPU(), DType.bfloat16, tokenizer, cpu_config("auto"))
    assert engine.cache.kind == "paged", "bfloat16 runs on MAX's paged kernels, as on a GPU"
    assert_bfloat16_close_to_hf(engine, hf_tiny, prompt_ids)
