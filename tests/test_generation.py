"""Greedy and sampled generation: HF parity, batch invariance, seeds, compiles, limits."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import CPU_FP32, cpu_config, hf_greedy
from max.driver import CPU
from max.dtype import DType
from transformers import GPT2Config, GPT2LMHeadModel

from batchgen.engine import ContextLengthError, Engine, Request, SamplingParams, Step
from batchgen.engine.weights import load_checkpoint

GREEDY = SamplingParams(max_tokens=16)


def tokens(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    out = engine.generate([Request(p, params) for p in prompts])
    return [c.token_ids for c in out.completions]


def test_greedy_matches_hf_generate_token_for_token(engine, hf_tiny, prompt_ids):
    got = tokens(engine, prompt_ids, GREEDY)
    expected = [hf_greedy(hf_tiny, ids, GREEDY.max_tokens) for ids in prompt_ids]
    assert got == expected
    assert len({tuple(t) for t in got}) == len(got), "rows should differ, or the test is weak"


def test_greedy_is_independent_of_batch_order_and_neighbours(engine, prompt_ids):
    together = tokens(engine, prompt_ids, GREEDY)
    alone = [tokens(engine, [ids], GREEDY)[0] for ids in prompt_ids]
    assert alone == together

    order = list(range(len(prompt_ids)))
    random.Random(1).shuffle(order)
    shuffled = tokens(engine, [prompt_ids[i] for i in order], GREEDY)
    assert shuffled == [together[i] for i in order]

    # New, longer neighbours change the padding of every original row.
    neighbours = [prompt_ids[0] * 9, prompt_ids[3] + prompt_ids[1]]
    mixed = tokens(engine, neighbours + prompt_ids[::2], GREEDY)[len(neighbours) :]
    assert mixed == together[::2]


def test_finish_reasons_and_counts(engine, hf_tiny, prompt_ids):
    lengths = [1, 5, 9]
    requests = [Request(prompt_ids[1], SamplingParams(max_tokens=n)) for n in lengths]
    out = engine.generate(requests)
    full = hf_greedy(hf_tiny, prompt_ids[1], max(lengths))
    for n, completion in zip(lengths, out.completions, strict=True):
        assert completion.token_ids == full[:n]
        assert completion.finish_reason == "length"
        assert completion.completion_tokens == n
        assert completion.prompt_tokens == len(prompt_ids[1])
        timing = completion.timing
        assert timing.queue_ms >= 0 and timing.prefill_ms > 0 and timing.tokens == n
        assert (timing.decode_ms > 0) == (n > 1)
    # One step prefills all three; each later step decodes those still going.
    assert out.steps == max(lengths)
    assert [c.timing.decode_ms for c in out.completions] == sorted(
        c.timing.decode_ms for c in out.completions
    )


def test_eos_stops_a_row(engine, tiny_dir, hf_tiny, prompt_ids, tmp_path):
    """Declare the 3rd greedy token of one prompt to be EOS; that row stops there, like HF."""
    ids = prompt_ids[0]
    eos = hf_greedy(hf_tiny, ids, 3)[2]
    for file in tiny_dir.iterdir():
        shutil.copy(file, tmp_path / file.name)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((tmp_path / name).read_text())
        config["eos_token_id"] = eos
        (tmp_path / name).write_text(json.dumps(config))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()

    eos_engine = Engine.from_pretrained(tmp_path, cpu_config(engine.cache.kind))
    out = eos_engine.generate([Request(p, GREEDY) for p in prompt_ids])
    stopped = out.completions[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == hf_greedy(hf, ids, GREEDY.max_tokens) == hf_greedy(hf_tiny, ids, 3)
    for ids, completion in zip(prompt_ids[1:], out.completions[1:], strict=True):
        assert completion.token_ids == hf_greedy(hf, ids, GREEDY.max_tokens)
        assert completion.finish_reason == ("stop" if completion.token_ids[-1] == eos else "length")

    ignoring = Request(ids, SamplingParams(max_tokens=8, ignore_eos=True))
    assert eos_engine.generate([ignoring]).completions[0].token_ids == (hf_greedy(hf_tiny, ids, 8))


def sampled(seed: int, **overrides) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 12, "temperature": 1.0, "seed": seed, **overrides})


def test_same_seed_same_tokens_whatever_the_batch(engine, prompt_ids):
    params = [sampled(seed) for seed in range(len(prompt_ids))]
    together = engine.generate([Request(p, s) for p, s in zip(prompt_ids, params, strict=True)])
    for ids, s, completion in zip(prompt_ids, params, together.completions, strict=True):
        alone = engine.generate([Request(ids, s)]).completions[0]
        assert alone.token_ids == completion.token_ids
    # Same prompt and seed in other rows, next to greedy and differently-sampled neighbours.
    target = Request(prompt_ids[3], params[3])
    crowd = [Request(prompt_ids[0], GREEDY), Request(prompt_ids[5], sampled(99, top_k=5)), target]
    greedy_row, other_row, target_row = engine.generate(crowd).completions
    assert target_row.token_ids == together.completions[3].token_ids
    assert greedy_row.token_ids == tokens(engine, [prompt_ids[0]], GREEDY)[0]
    assert other_row.token_ids != tokens(engine, [prompt_ids[5]], GREEDY)[0]


def test_different_seeds_give_different_tokens(engine, prompt_ids):
    ids = prompt_ids[1]
    runs = {tuple(tokens(engine, [ids], sampled(seed))[0]) for seed in range(4)}
    assert len(runs) == 4


def test_temperature_zero_and_top_k_one_equal_greedy(engine, prompt_ids):
    greedy = tokens(engine, prompt_ids, GREEDY)
    assert tokens(engine, prompt_ids, sampled(3, temperature=0.0, max_tokens=16)) == greedy
    assert tokens(engine, prompt_ids, sampled(3, top_k=1, max_tokens=16)) == greedy
    # Near-zero temperature goes through the sampler and still collapses to the argmax.
    assert tokens(engine, prompt_ids, sampled(3, temperature=1e-4, max_tokens=16)) == greedy


def allowed_tokens(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, float]:
    """The candidates top-k or top-p leave, and their probability mass at the row's temperature,
    computed independently from the step's logits."""
    order = np.argsort(-logits)
    probs = np.exp((logits[order] - logits[order[0]]).astype(np.float64) / params.temperature)
    cumulative = np.cumsum(probs / probs.sum())
    kept = params.top_k if params.top_k else int(np.searchsorted(cumulative, params.top_p)) + 1
    return order[:kept], float(cumulative[kept - 1])


def test_samples_stay_inside_top_k_and_top_p(engine, prompt_ids):
    params = [
        sampled(seed, top_k=3) if seed % 2 else sampled(seed, top_p=0.5, temperature=1.5)
        for seed in range(len(prompt_ids))
    ]
    steps: list[Step] = []
    engine.generate([Request(p, s) for p, s in zip(prompt_ids, params, strict=True)], steps.append)
    # Expected draws outside the cut had it been ignored: each draw lands outside with
    # probability 1 - (mass kept). Top-k and top-p rows are counted apart, so neither
    # kind of row can make up for the other ignoring its cut.
    outside = {"top_k": 0.0, "top_p": 0.0}
    for step in steps:
        for i, row in enumerate(step.rows):
            allowed, mass = allowed_tokens(step.logits[i], params[row])
            assert step.tokens[i] in allowed
            outside["top_k" if params[row].top_k else "top_p"] += 1 - mass
    # Ignoring a cut would put a draw outside it with a chance of 1 - exp(-5) or more.
    assert min(outside.values()) > 5, outside


def test_no_top_k_cut_samples_from_the_whole_vocabulary(engine, prompt_ids):
    """Asked for no cut, MAX's fused kernel draws from its 256 likeliest tokens only. At
    temperature 1.5 this model's distribution is flat: its 256 likeliest tokens hold a few
    percent of the mass, so most draws must rank lower, as often as the softmax says."""
    params = [sampled(seed, max_tokens=1, temperature=1.5) for seed in range(64)]
    steps: list[Step] = []
    engine.generate([Request(prompt_ids[1], p) for p in params], steps.append)
    logits = steps[0].logits[0].astype(np.float64) / 1.5
    order = np.argsort(-logits)
    probs = np.exp(logits[order] - logits[order[0]])
    beyond_256 = 1 - probs[:256].sum() / probs.sum()
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    observed = np.mean(rank[steps[0].tokens] >= 256)
    assert beyond_256 > 0.5, "the distribution should be flat, or the test is weak"
    assert abs(observed - beyond_256) < 0.2, (observed, beyond_256)


def test_a_seeded_row_ignores_its_neighbours_sampling_settings(engine, prompt_ids):
    """The fused sampler takes batch-wide bounds (max_k, min_top_p); a row must not see them."""
    target = Request(prompt_ids[1], sampled(11, top_k=5))
    alone = engine.generate([target]).completions[0].token_ids
    wide = Request(prompt_ids[2], sampled(12))  # top_k=0: full-vocabulary bound
    narrow = Request(prompt_ids[4], sampled(13, top_p=0.3))  # lowers min_top_p
    assert engine.generate([wide, target, narrow]).completions[1].token_ids == alone


def test_a_finished_row_never_runs_past_the_position_table(engine, hf_tiny, prompt_ids):
    """A 1000-token prompt done after 4 tokens rides along while a short row decodes 60."""
    long = (prompt_ids[3] * 100)[:1000]
    short = prompt_ids[0]
    out = engine.generate(
        [Request(long, SamplingParams(max_tokens=4)), Request(short, SamplingParams(max_tokens=60))]
    )
    assert out.completions[0].token_ids == hf_greedy(hf_tiny, long, 4)
    assert out.completions[1].token_ids == hf_greedy(hf_tiny, short, 60)


def test_one_compile_serves_all_batch_sizes_and_lengths(tiny_dir, prompt_ids, monkeypatch):
    from max.experimental import compilation
    from max.experimental.nn import Module

    calls = {"model": 0, "sampler": 0}
    module_compile, function_compile = Module.compile, compilation.compile

    def count_module(self, *args, **kwargs):
        calls["model"] += 1
        return module_compile(self, *args, **kwargs)

    def count_function(fn, **kwargs):
        calls["sampler"] += 1
        return function_compile(fn, **kwargs)

    monkeypatch.setattr(Module, "compile", count_module)
    monkeypatch.setattr(compilation, "compile", count_function)
    engine = Engine.from_pretrained(tiny_dir, CPU_FP32)
    for size in range(1, len(prompt_ids) + 1):
        for max_tokens in (1, 3, 7):
            engine.generate([Request(p, SamplingParams(max_tokens)) for p in prompt_ids[:size]])
            engine.generate([Request(p, sampled(size, max_tokens=max_tokens))
                             for p in prompt_ids[-size:]])  # fmt: skip
    assert calls == {"model": 1, "sampler": 1}


def test_context_limit_is_refused_before_any_graph_runs(engine, prompt_ids, monkeypatch):
    class NoGraph:
        def run(self, plan):
            raise AssertionError("a graph ran")

    monkeypatch.setattr(engine, "runner", NoGraph())
    limit = engine.config.n_positions
    ok = Request(prompt_ids[0], GREEDY)
    too_long = Request([15496] * (limit - 10), SamplingParams(max_tokens=11))
    with pytest.raises(ContextLengthError, match=r"1014 tokens.*max_tokens \(11\).*1024"):
        engine.generate([ok, too_long])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([Request([], GREEDY)])
    with pytest.raises(ValueError, match="token id 50257 is outside the vocabulary"):
        engine.generate([Request([1, 50257], GREEDY)])
    assert engine.generate([]).completions == []
    edge = Request([15496] * (limit - 11), SamplingParams(max_tokens=11))
    engine.check(edge)  # exactly at the limit is allowed


def test_stop_strings_end_a_row_in_the_engine(engine, hf_tiny, tokenizer, prompt_ids):
    """SamplingParams.stop: the row ends on the token that completes the string, text cut."""
    full = hf_greedy(hf_tiny, prompt_ids[0], 12)
    text = tokenizer.decode(full, skip_special_tokens=True)
    stop = tokenizer.decode(full[4:6])
    params = SamplingParams(max_tokens=12, stop=("never there", stop))
    out = engine.generate([Request(prompt_ids[0], params), Request(prompt_ids[1], GREEDY)])
    stopped, neighbour = out.completions
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]
    assert stopped.token_ids == full[:6]
    assert neighbour.token_ids == hf_greedy(hf_tiny, prompt_ids[1], GREEDY.max_tokens)
    assert neighbour.text == tokenizer.decode(neighbour.token_ids, skip_special_tokens=True)


def test_top_k_past_the_vocabulary_keeps_every_token(engine, prompt_ids):
    huge = tokens(engine, prompt_ids[:2], sampled(5, top_k=2**64 - 1))
    assert huge == tokens(engine, prompt_ids[:2], sampled(5, top_k=0))


def test_a_padded_vocabulary_decodes_ids_the_tokenizer_lacks(tmp_path, tokenizer, prompt_ids):
    """nanoGPT pads the vocabulary to 50304: ids past the tokenizer's 50257 decode to nothing."""
    config = GPT2Config(vocab_size=50304, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # every hidden state becomes ln_f's bias, whose best match is 50300
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.normal_()
        hf.transformer.wte.weight[50300] = 10 * hf.transformer.ln_f.bias
    hf.save_pretrained(tmp_path)
    checkpoint = load_checkpoint(tmp_path, torch.float32)
    padded = Engine(checkpoint, CPU(), DType.float32, tokenizer, CPU_FP32)
    requests = [Request(prompt_ids[0], GREEDY), Request(prompt_ids[1], sampled(1, stop=("x",)))]
    out = padded.generate(requests)
    assert out.completions[0].token_ids == hf_greedy(hf, prompt_ids[0], GREEDY.max_tokens)
    assert set(out.completions[0].token_ids) == {50300}
    assert [c.text for c in out.completions] == ["", ""]


def test_a_float16_slot_cache_stays_within_its_tolerance_of_hf(tiny_dir, hf_tiny, prompt_ids):
    """float16 keys and values, float32 maths: logits within 0.05 of HF's float32 ones (about
    2e-3 of their range here), and the token it picks is, by HF's logits, that close to best."""
    config = cpu_config("slots")
    engine = Engine.from_pretrained(tiny_dir, replace(config, kv_cache_dtype="float16"))
    assert engine.cache.nbytes * 2 == Engine.from_pretrained(tiny_dir, config).cache.nbytes
    steps: list[Step] = []
    requests = [Request(ids, SamplingParams(max_tokens=8, ignore_eos=True)) for ids in prompt_ids]
    out = engine.generate(requests, steps.append)
    seen = [0] * len(prompt_ids)
    worst = 0.0
    for step in steps:
        for i, row in enumerate(step.rows):
            context = prompt_ids[row] + out.completions[row].token_ids[: seen[row]]
            with torch.no_grad():
                expected = hf_tiny(torch.tensor([context])).logits[0, -1].numpy()
            worst = max(worst, float(np.abs(step.logits[i] - expected).max()))
            assert expected[step.tokens[i]] >= expected.max() - 0.1
            seen[row] += 1
    assert 1e-5 < worst < 0.05, worst  # not float32 exact, but close
