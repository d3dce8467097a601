"""Numerical parity with Hugging Face transformers' GPT-2, the reference implementation."""

from __future__ import annotations

import numpy as np
import torch

from batchgen.engine import Request, Step
from batchgen.sampling import SamplingParams


def hf_next_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def test_prefill_logits_match_hf_for_padded_batch(engine, hf_tiny, prompt_ids):
    lengths = {len(p) for p in prompt_ids}
    assert len(lengths) >= 4, "the batch must mix prompt lengths so rows get padded"
    logits = engine.next_token_logits(prompt_ids)
    for row, ids in enumerate(prompt_ids):
        np.testing.assert_allclose(logits[row], hf_next_logits(hf_tiny, ids), atol=1e-4, rtol=0)


def test_decode_step_logits_match_hf(engine, hf_tiny, prompt_ids):
    """Every KV-cached decode step of a padded batch gives HF's full-recompute logits."""
    steps: list[Step] = []
    requests = [Request(ids, SamplingParams(max_tokens=6, ignore_eos=True)) for ids in prompt_ids]
    out = engine.generate(requests, on_step=steps.append)
    assert len(steps) == 6
    for row, (ids, completion) in enumerate(zip(prompt_ids, out.completions, strict=True)):
        for step in steps:
            context = ids + completion.token_ids[: step.index]
            got = np.from_dlpack(step.logits.to_numpy())[row]
            np.testing.assert_allclose(got, hf_next_logits(hf_tiny, context), atol=1e-4, rtol=0)
