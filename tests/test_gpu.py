"""The engine on a GPU (`pytest -m gpu`; skipped with the reason where MAX sees none): MAX's
paged kernels, bfloat16 by default and float32 on request, against transformers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hf_greedy, next_token_logits
from test_parity import assert_bfloat16_close_to_hf, hf_next_logits
from test_scheduling import mixed_requests, seeded_lines

from batchgen.engine import Engine, EngineConfig, Request, SamplingParams, SchedulerConfig
from batchgen.engine.weights import load_tokenizer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_float32(tiny_dir):
    return Engine.from_pretrained(tiny_dir, EngineConfig(device="gpu", dtype="float32"))


def test_the_default_gpu_engine_is_bfloat16_on_pages_and_close_to_hf(tiny_dir, hf_tiny, prompt_ids):
    engine = Engine.from_pretrained(tiny_dir, EngineConfig(device="gpu"))
    assert engine.device.label == "gpu" and engine.cache.kind == "paged"
    assert str(engine.dtype) == "DType.bfloat16"
    assert_bfloat16_close_to_hf(engine, hf_tiny, prompt_ids)


def test_float32_logits_match_hf(gpu_float32, hf_tiny, prompt_ids):
    logits = next_token_logits(gpu_float32, prompt_ids)
    for row, ids in enumerate(prompt_ids):
        np.testing.assert_allclose(logits[row], hf_next_logits(hf_tiny, ids), atol=1e-3, rtol=0)


def test_float32_rows_joining_mid_flight_equal_hf(gpu_float32, tiny_dir, hf_tiny):
    requests, expected = mixed_requests(load_tokenizer(tiny_dir), hf_tiny)
    out = gpu_float32.generate(requests, schedule=SchedulerConfig(max_rows=3, step_tokens=64))
    same = [c.token_ids == e for c, e in zip(out.completions, expected, strict=True)]
    # A GPU's float32 sums differ from the CPU's in the last bits: a near tie may flip.
    assert sum(same) >= len(same) - 1, same
    assert gpu_float32.cache.idle


def test_seeded_draws_do_not_depend_on_the_batch_on_a_gpu(gpu_float32):
    requests = [Request(p, s) for p, s in seeded_lines(60)]
    alone = gpu_float32.generate(requests, schedule=SchedulerConfig(max_rows=1))
    together = gpu_float32.generate(requests[::-1], schedule=SchedulerConfig(max_rows=32))
    reference = [c.token_ids for c in alone.completions]
    assert [c.token_ids for c in together.completions][::-1] == reference


def test_a_greedy_124m_shape_runs_and_matches_hf_mostly(tmp_path, prompt_ids):
    import torch
    from transformers import GPT2LMHeadModel

    from batchgen.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path, "124M", seed=1)
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine.from_pretrained(path, EngineConfig(device="gpu", dtype="float32"))
    out = engine.generate([Request(ids, SamplingParams(max_tokens=12)) for ids in prompt_ids])
    same = [
        c.token_ids == hf_greedy(hf, ids, 12)
        for c, ids in zip(out.completions, prompt_ids, strict=True)
    ]
    assert sum(same) >= len(same) - 1, same
