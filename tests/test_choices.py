"""The rest of the completions API in the engine: logprobs, prompt scoring (echo), n and
best_of, penalties and logit_bias. transformers is the oracle for log-probabilities, NumPy for
the penalties; prefill work is counted in the engine's own window statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchgen.engine import Request, SamplingParams, SchedulerConfig
from batchgen.engine.sampling import adjusted
from batchgen.engine.scheduler import Row, Scheduler


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    """HF's log-softmax [len(ids), vocab]: row i is the distribution of the token after ids[i]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_greedy_logprobs_and_their_top_k_equal_hf(engine, hf_tiny, prompt_ids):
    params = SamplingParams(max_tokens=6, logprobs=5, ignore_eos=True)
    out = engine.generate([Request(ids, params) for ids in prompt_ids])
    for ids, completion in zip(prompt_ids, out.completions, strict=True):
        expected = hf_logprobs(hf_tiny, ids + completion.token_ids)[len(ids) - 1 : -1]
        assert len(completion.logprobs) == len(completion.token_ids)
        for step, entry in enumerate(completion.logprobs):
            assert entry.token == completion.token_ids[step]
            assert entry.logprob == pytest.approx(expected[step, entry.token], abs=1e-4)
            top = np.argsort(-expected[step])[:5]
            assert [t for t, _ in entry.top] == top.tolist()
            np.testing.assert_allclose([lp for _, lp in entry.top], expected[step, top], atol=1e-4)
        assert completion.cumulative_logprob == pytest.approx(
            sum(e.logprob for e in completion.logprobs)
        )


def test_echo_scoring_equals_hf_prompt_logprobs_and_prefills_only(engine, hf_tiny, prompt_ids):
    params = SamplingParams(max_tokens=0, prompt_logprobs=3)
    # A small step budget puts the longest prompts through in chunks.
    out = engine.generate([Request(ids, params) for ids in prompt_ids])
    for ids, completion in zip(prompt_ids, out.completions, strict=True):
        assert completion.token_ids == [] and completion.text == ""
        assert completion.finish_reason == "length"
        expected = hf_logprobs(hf_tiny, ids)
        got = [e.logprob for e in completion.prompt_logprobs]
        assert [e.token for e in completion.prompt_logprobs] == ids[1:]
        np.testing.assert_allclose(got, expected[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
        for i, entry in enumerate(completion.prompt_logprobs):
            assert [t for t, _ in entry.top] == np.argsort(-expected[i])[:3].tolist()
    assert sum(w.generated_tokens for w in out.windows) == 0
    assert sum(w.prompt_tokens for w in out.windows) == sum(map(len, prompt_ids))


def test_a_chunked_prompt_is_scored_whole(tiny_dir, hf_tiny, prompt_ids):
    from conftest import cpu_config

    from batchgen.engine import Engine

    engine = Engine.from_pretrained(tiny_dir, cpu_config("slots", step_tokens=4))
    ids = prompt_ids[3]  # longer than a step's budget
    (completion,) = engine.generate(
        [Request(ids, SamplingParams(max_tokens=2, prompt_logprobs=0))]
    ).completions
    expected = hf_logprobs(hf_tiny, ids)
    got = [e.logprob for e in completion.prompt_logprobs]
    np.testing.assert_allclose(got, expected[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    assert len(completion.token_ids) == 2


def test_n_choices_are_distinct_reproducible_and_share_one_prefill(engine, prompt_ids):
    ids = prompt_ids[1]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=4, ignore_eos=True)
    out = engine.generate([Request(ids, params)])
    choices = _choices(engine, Request(ids, params))
    assert out.completions[0].token_ids == choices[0].token_ids
    assert len(choices) == 4
    assert len({tuple(c.token_ids) for c in choices}) == 4  # each its own stream
    again = _choices(engine, Request(ids, params))
    assert [c.token_ids for c in again] == [c.token_ids for c in choices]
    # Choice 0 is the same draw as the request alone (n=1) with that seed.
    alone = engine.generate([Request(ids, SamplingParams(max_tokens=8, temperature=1.0, seed=11,
                                                         ignore_eos=True))])  # fmt: skip
    assert choices[0].token_ids == alone.completions[0].token_ids
    # The prompt is prefilled once; each other choice recomputes only its last token.
    prefilled = sum(w.prompt_tokens for w in out.windows)
    assert prefilled == len(ids) + 3


def test_n_choices_greedy_all_equal_the_single_greedy_row(engine, prompt_ids, hf_tiny):
    from conftest import hf_greedy

    ids = prompt_ids[3]
    choices = _choices(engine, Request(ids, SamplingParams(max_tokens=6, n=3)))
    expected = hf_greedy(hf_tiny, ids, 6)
    assert [c.token_ids for c in choices] == [expected] * 3


def test_best_of_keeps_the_n_likeliest_choices(engine, prompt_ids):
    ids = prompt_ids[0]
    wide = SamplingParams(max_tokens=5, temperature=1.5, seed=3, n=5, logprobs=0, ignore_eos=True)
    everything = _choices(engine, Request(ids, wide))
    best = SamplingParams(max_tokens=5, temperature=1.5, seed=3, n=2, best_of=5, logprobs=0,
                          ignore_eos=True)  # fmt: skip
    kept = _choices(engine, Request(ids, best))
    ranked = sorted(everything, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in kept] == [c.token_ids for c in ranked]


def _choices(engine, request):
    finished = [f for w in engine.stream([request]) for f in w.finished]
    (only,) = finished
    return only.completions


def test_penalties_and_bias_follow_openai_s_formula_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    generated = [3, 3, 7, 3, 9]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias=((7, 100.0), (1, -100.0)))  # fmt: skip
    expected = logits.copy()
    counts = np.zeros(50)
    for t in generated:
        counts[t] += 1
    expected -= counts * 0.25 + (counts > 0) * 0.5
    expected[7] += 100.0
    expected[1] -= 100.0
    np.testing.assert_allclose(adjusted(logits, params, generated), expected, rtol=0, atol=1e-6)


def test_logit_bias_and_penalties_steer_the_engine(engine, prompt_ids, hf_tiny):
    ids = prompt_ids[2]
    forced = SamplingParams(max_tokens=4, logit_bias=((42, 100.0),), ignore_eos=True)
    (completion,) = engine.generate([Request(ids, forced)]).completions
    assert completion.token_ids == [42] * 4
    # A frequency penalty large enough forbids repeating: every token differs, greedy,
    # and each is the argmax of HF's logits less the penalty of what came before.
    penalised = SamplingParams(max_tokens=6, frequency_penalty=2.0, presence_penalty=2.0,
                               ignore_eos=True)  # fmt: skip
    (completion,) = engine.generate([Request(ids, penalised)]).completions
    tokens = completion.token_ids
    for step in range(len(tokens)):
        with torch.no_grad():
            logits = hf_tiny(torch.tensor([ids + tokens[:step]])).logits[0, -1].numpy()
        assert int(np.argmax(adjusted(logits, penalised, tokens[:step]))) == tokens[step]


def test_a_group_is_admitted_whole_and_its_followers_wait_for_the_prompt():
    from test_scheduling import RowsCache, run_plan

    cache = RowsCache(rows=8)
    scheduler = Scheduler(SchedulerConfig(max_rows=4, step_tokens=100), cache)
    first = Row(0, [7] * 5, SamplingParams(max_tokens=3, n=3), 0, 0.0)
    first.followers = [Row(0, first.prompt, first.params, c, 0.0, choice=c) for c in (1, 2)]
    scheduler.add(first)
    scheduler.add(Row(1, [7] * 2, SamplingParams(max_tokens=3), 0, 0.0))
    # The group takes 3 of the 4 rows; its followers do not prefill the prompt.
    assert run_plan(scheduler) == [("prefill", 0, 5), ("prefill", 1, 2)]
    assert len(cache.held) == 4
    scheduler.fork(first)
    assert cache.forks == [((0, 0), (0, c), 4) for c in (1, 2)]
    # Each follower recomputes only the prompt's last token.
    assert run_plan(scheduler) == [("decode", 0, 1), ("decode", 1, 1), ("prefill", 0, 1),
                                   ("prefill", 0, 1)]  # fmt: skip
    with pytest.raises(ValueError, match="batch-size 4"):
        big = Row(2, [7], SamplingParams(n=5), 0, 0.0)
        big.followers = [Row(2, [7], big.params, 0, 0.0, choice=c) for c in range(1, 5)]
        scheduler.add(big)
