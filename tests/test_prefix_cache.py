"""Shared prefixes: the blocks a prompt begins with come from the KV cache, not a second
prefill. The oracles: the same requests with the prefix cache off (identical results, bit for
bit), transformers for tokens and log-probabilities, and the caches' own buffers for what a
reused prefix holds."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import numpy as np
import pytest
from conftest import hf_greedy
from max.driver import CPU
from max.dtype import DType
from test_choices import hf_logprobs
from test_runner import (
    comparable_records,
    openai_line,
    read_jsonl,
    results_by_id,
    run_cli,
    write_jsonl,
)

from batchgen.engine import Request, SamplingParams, SchedulerConfig
from batchgen.engine.kv_cache import PagedCache, SlotCache
from batchgen.engine.model import GPT2Config
from batchgen.engine.prefix_cache import ScoredBlocks, block_hashes
from batchgen.engine.scheduler import TokenLogprob

ON = SchedulerConfig(prefix_cache=True)
OFF = SchedulerConfig(prefix_cache=False)
TINY = GPT2Config(n_embd=64, n_layer=2, n_head=4)


def tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(50000) for _ in range(count)]


def shared_job(seed: int) -> tuple[list[int], list[list[int]]]:
    """A 300-token preamble: 6 prompts that continue it by 3-40 tokens, an exact duplicate,
    one that leaves it mid-block (at 200), one that is the preamble alone, and 3 that share
    nothing, interleaved."""
    rng = random.Random(seed)
    preamble = tokens(rng, 300)
    prompts = [preamble + tokens(rng, rng.randint(3, 40)) for _ in range(6)]
    prompts.insert(2, tokens(rng, 50))
    prompts.insert(4, list(prompts[0]))
    prompts.insert(5, preamble[:200] + tokens(rng, 30))
    prompts += [tokens(rng, 45), list(preamble), tokens(rng, 20)]
    return preamble, prompts


def common_start(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def expected_reuse(prompts: list[list[int]], block: int) -> list[int]:
    """What each prompt can take, once every earlier one is in the cache: the longest start it
    shares with one, in whole blocks, short of its own last token."""
    reuse = []
    for i, prompt in enumerate(prompts):
        shared = max((common_start(prompt, p) for p in prompts[:i]), default=0)
        reuse.append(min(shared, len(prompt) - 1) // block * block)
    return reuse


def entries(completion) -> list[tuple]:
    return [tuple(e) for e in (completion.logprobs or []) + (completion.prompt_logprobs or [])]


def same(a, b) -> bool:
    """Equal, floats within float32 rounding: MAX's CPU matmuls are not batch-invariant, so a
    log-probability moves in its last digits with the rows beside it, prefix cache or not."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_block_hashes_chain_full_blocks_from_the_start():
    ids = list(range(100, 140))
    hashes = block_hashes(ids, 16)
    assert len(hashes) == 2  # 40 tokens: two full blocks, the last 8 are not named
    first = hashlib.sha256(np.asarray(ids[:16], np.int64).tobytes()).digest()
    assert hashes[0] == first
    assert hashes[1] == hashlib.sha256(first + np.asarray(ids[16:32], np.int64).tobytes()).digest()
    # A block's name covers every block before it: the same tokens after another start differ.
    changed = [7, *ids[1:]]
    assert block_hashes(changed, 16)[0] != hashes[0] and block_hashes(changed, 16)[1] != hashes[1]
    assert block_hashes(ids[:32] + [1] * 16, 16)[:2] == hashes


def test_shared_prefixes_give_the_records_of_no_reuse_and_hf_s_tokens(engine, hf_tiny):
    _, prompts = shared_job(seed=101)
    params = SamplingParams(max_tokens=6, logprobs=2)
    requests = [Request(p, params) for p in prompts]
    # On first: the slots it copies into hold other prompts' keys, never these.
    on = engine.generate(requests, schedule=ON)
    off = engine.generate(requests, schedule=OFF)
    for a, b, prompt in zip(off.completions, on.completions, prompts, strict=True):
        assert b.token_ids == a.token_ids == hf_greedy(hf_tiny, prompt, 6)
        assert b.text == a.text and same(entries(b), entries(a))
    # Every prompt after the first took what it shares with those before it: the siblings
    # waited for the first one's prefill rather than computing the preamble beside it.
    block = engine.cache.block_size
    assert [c.timing.cached_tokens for c in on.completions] == expected_reuse(prompts, block)
    assert [c.timing.cached_tokens for c in off.completions] == [0] * len(prompts)
    reused = sum(w.reused_tokens for w in on.windows)
    assert reused == sum(expected_reuse(prompts, block)) > 0
    assert sum(w.prompt_tokens for w in on.windows) + reused == sum(map(len, prompts))
    assert sum(w.prompt_tokens for w in off.windows) == sum(map(len, prompts))
    assert engine.cache.idle


def test_a_finished_prefix_is_reused_by_a_later_stream_and_seeded_draws_hold(engine):
    preamble, prompts = shared_job(seed=102)
    params = SamplingParams(max_tokens=5, temperature=1.2, seed=3, n=3)
    engine.generate([Request(prompts[0], params)], schedule=ON)
    later = [Request(p, replace(params, seed=i)) for i, p in enumerate(prompts[1:])]
    on = engine.generate(later, schedule=ON)
    off = engine.generate(later, schedule=OFF)
    for a, b in zip(off.completions, on.completions, strict=True):
        assert b.token_ids == a.token_ids
    block = engine.cache.block_size
    assert on.completions[0].timing.cached_tokens == min(len(prompts[1]) - 1, 300) // block * block


def test_n_choices_share_their_prompt_and_each_keeps_its_seed(engine):
    _, prompts = shared_job(seed=103)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3, logprobs=1)
    requests = [Request(p, params) for p in prompts[:4]]
    off = engine.stream(requests, schedule=OFF)
    on = engine.stream(requests, schedule=ON)
    results = {}
    for label, stream in (("on", on), ("off", off)):
        results[label] = {
            f.index: [(c.token_ids, entries(c), c.timing.cached_tokens) for c in f.completions]
            for window in stream
            for f in window.finished
        }
    for index, choices in results["on"].items():
        assert same([c[:2] for c in choices], [c[:2] for c in results["off"][index]])
        assert len({tuple(c[0]) for c in choices}) > 1  # distinct draws
        # Every choice but the first took the whole prompt but its last token.
        assert [c[2] for c in results["off"][index]][1:] == [len(prompts[index]) - 1] * 2


def test_scoring_against_one_document_reuses_its_scored_blocks(engine, hf_tiny):
    rng = random.Random(104)
    document = tokens(rng, 280)
    prompts = [document + tokens(rng, rng.randint(2, 12)) for _ in range(6)]
    scored = SamplingParams(max_tokens=0, prompt_logprobs=2)
    requests = [Request(p, scored) for p in prompts]
    on = engine.generate(requests, schedule=ON)
    off = engine.generate(requests, schedule=OFF)
    block = engine.cache.block_size
    for a, b, prompt in zip(off.completions, on.completions, prompts, strict=True):
        assert same(entries(b), entries(a))
        assert [e.token for e in b.prompt_logprobs] == prompt[1:]
        expected = hf_logprobs(hf_tiny, prompt)
        got = [e.logprob for e in b.prompt_logprobs]
        np.testing.assert_allclose(got, expected[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
        for i, entry in enumerate(b.prompt_logprobs):
            assert [t for t, _ in entry.top] == np.argsort(-expected[i])[:2].tolist()
    assert [c.timing.cached_tokens for c in on.completions] == expected_reuse(prompts, block)
    # Blocks scored with 2 alternatives serve a request that asks for 1; one that asks for 3
    # computes them again, as does one after rows that held the blocks but did not score them.
    fewer = engine.generate([Request(prompts[1], replace(scored, prompt_logprobs=1))], schedule=ON)
    assert fewer.completions[0].timing.cached_tokens > 0
    assert same(
        [e.top for e in fewer.completions[0].prompt_logprobs],
        [e.top[:1] for e in on.completions[1].prompt_logprobs],
    )
    more = engine.generate([Request(prompts[1], replace(scored, prompt_logprobs=3))], schedule=ON)
    assert more.completions[0].timing.cached_tokens == 0
    fresh = document[:] + [5, 6, 7]
    fresh[0] += 1  # a new document, first generated from, then scored
    engine.generate([Request(fresh, SamplingParams(max_tokens=2))], schedule=ON)
    late = engine.generate([Request(fresh, scored)], schedule=ON).completions[0]
    assert late.timing.cached_tokens == 0
    expected = hf_logprobs(hf_tiny, fresh)
    got = [e.logprob for e in late.prompt_logprobs]
    np.testing.assert_allclose(got, expected[np.arange(len(fresh) - 1), fresh[1:]], atol=1e-4)


def test_an_evicted_prefix_is_computed_again(small_cache_engine, hf_tiny):
    engine = small_cache_engine
    rng = random.Random(105)
    preamble = tokens(rng, 300)
    first, again, later = (preamble + tokens(rng, 10) for _ in range(3))
    params = SamplingParams(max_tokens=4)
    engine.generate([Request(first, params)], schedule=ON)
    # Other prompts, enough to take every slot and page the preamble's blocks were kept in.
    others = [Request(tokens(rng, 600), params) for _ in range(7)]
    engine.generate(others, schedule=ON)
    out = engine.generate([Request(again, params)], schedule=ON).completions[0]
    assert out.timing.cached_tokens == 0
    assert out.token_ids == hf_greedy(hf_tiny, again, 4)
    out = engine.generate([Request(later, params)], schedule=ON).completions[0]
    assert out.timing.cached_tokens == 300 // engine.cache.block_size * engine.cache.block_size
    assert out.token_ids == hf_greedy(hf_tiny, later, 4)


def filled(cache: SlotCache, slot: int, value: float) -> None:
    for array in cache._arrays:
        array[slot] = value


def test_the_slot_cache_takes_a_free_slot_holding_the_prefix_or_reads_it_where_it_is():
    cache = SlotCache(TINY, DType.float32, CPU(), slots=3)
    blocks = block_hashes(list(range(64)), cache.block_size)  # 4 blocks
    assert cache.admit("a", 100)
    a = cache.slot("a")
    cache.commit("a", blocks)
    assert cache.holds(blocks) == 4 and cache.holds(block_hashes([9] * 64, 16)) == 0
    # While "a" runs, "b" gets a slot of its own and reads its first 2 blocks from a's.
    assert cache.admit("b", 100, blocks[:2])
    assert cache.slot("b") != a and cache.prefix("b") == (a, 32)
    assert cache.prefix("a") == (a, 0)
    cache.commit("b", blocks)  # b's slot lacks the prefix: it serves no one
    assert cache._holders[blocks[0]] == {a}
    # "a" ends; its slot keeps the prefix and has a reader: no other row may take it.
    cache.release("a")
    assert cache.admit("x", 100) and cache.slot("x") == 2
    assert not cache.admit("y", 100)
    cache.release("b")
    cache.release("x")
    assert cache.idle
    # Free and unread, a's slot still holds the prefix: "c" takes that slot itself.
    assert cache.admit("c", 100, blocks[:3])
    assert cache.slot("c") == a and cache.prefix("c") == (a, 0)
    # "c" overwrites what lies past its 3 blocks: the fourth is no longer held anywhere.
    assert cache.holds(blocks) == 3
    # A fork from a row that reads another slot's prefix reads it there too.
    assert cache.admit("d", 100, blocks[:3]) and cache.prefix("d") == (a, 48)
    assert cache.admit("e", 100)
    filled(cache, cache.slot("d"), 7.0)
    assert cache.fork("d", "e", 60)
    assert cache.prefix("e") == (a, 48)
    for array in cache._arrays:
        assert (array[cache.slot("e"), :, 48:60] == 7.0).all()
    for row in ("c", "d", "e"):
        cache.release(row)
    assert cache.idle and cache._readers == [0, 0, 0]


def test_the_slot_cache_gives_up_the_least_recently_released_prefix_first():
    cache = SlotCache(TINY, DType.float32, CPU(), slots=2)
    p, q = (block_hashes([k] * 32, 16) for k in (1, 2))
    for row, blocks in (("p", p), ("q", q)):
        assert cache.admit(row, 50)
        cache.commit(row, blocks)
    cache.release("p")
    cache.release("q")
    assert cache.admit("p again", 50, p[:1])  # p is now the most recently used
    cache.release("p again")
    assert cache.admit("other", 50)  # no slot is clean: q's, released longest ago, goes
    assert cache.holds(q) == 0 and cache.holds(p) == 1
    assert cache.admit("last", 50) and cache.holds(p) == 0
    assert not cache.admit("full", 50)


def test_the_paged_cache_shares_pages_counts_their_holders_and_evicts_least_recent():
    cache = PagedCache(TINY, DType.float32, CPU(), pages=10, page_size=128)
    blocks = block_hashes(list(range(384)), 128)  # 3 pages
    assert cache.admit("a", 400)  # 4 pages
    cache.commit("a", blocks)
    prefix_pages = cache._pages_of["a"][:2]
    assert cache.admit("b", 400, blocks[:2])  # shares 2, takes 2
    assert cache._pages_of["b"][:2] == cache._pages_of["a"][:2]
    assert cache.occupancy == pytest.approx(0.6)
    cache.release("a")  # its pages that "b" holds stay; its named third page is kept
    assert cache.holds(blocks) == 3 and cache.occupancy == pytest.approx(0.4)
    cache.release("b")
    assert cache.idle and cache.holds(blocks) == 3 and cache.occupancy == 0
    # 10 pages: 3 named and kept, 7 unnamed. A row of 8 pages takes the 7 unnamed and then
    # the least recently released named one: the prefix's last page goes first.
    assert cache.admit("big", 8 * 128)
    assert cache.holds(blocks) == 2
    # A row sharing the 2 kept pages fits beside it only if its other pages do.
    assert not cache.admit("c", 3 * 128, blocks[:2])
    cache.release("big")
    assert cache.admit("c", 3 * 128, blocks[:2])
    assert cache._pages_of["c"][:2] == prefix_pages and cache.occupancy == pytest.approx(0.3)
    cache.release("c")
    assert cache.idle


def test_the_paged_cache_forks_by_sharing_full_pages_and_copying_the_last():
    cache = PagedCache(TINY, DType.float32, CPU(), pages=10, page_size=128)
    assert cache.admit("first", 300) and cache.admit("second", 300)
    blocks = cache.blocks.to_numpy()
    source = cache._pages_of["first"]
    blocks[source[2]] = 3.0
    cache.fork("first", "second", 299)  # 2 full pages and 43 tokens
    cache.blocks.device.synchronize()  # the page is copied on the device's queue (seen unfinished)
    mine = cache._pages_of["second"]
    assert mine[:2] == source[:2] and mine[2] != source[2]
    assert (blocks[mine[2]] == 3.0).all()
    cache.release("first")
    cache.release("second")
    assert cache.idle and cache.occupancy == 0


def test_scored_blocks_serve_as_many_alternatives_as_they_hold():
    store = ScoredBlocks(capacity=2)
    entry = [TokenLogprob(5, -1.0, ((5, -1.0), (6, -2.0)))]
    store.put(b"a", 7, 2, entry)
    assert store.get(b"a", 7, 1) == [TokenLogprob(5, -1.0, ((5, -1.0),))]
    assert store.get(b"a", 8, 1) is None  # another next token: another entry
    assert store.get(b"a", 7, 3) is None
    store.put(b"b", 7, 0, entry)
    store.put(b"c", 7, 0, entry)
    assert store.get(b"a", 7, 0) is None  # least recently used, beyond the capacity


def test_a_job_writes_the_same_records_with_the_prefix_cache_on_and_off(
    tiny_dir, tokenizer, tmp_path
):
    rng = random.Random(106)
    preamble = "Answer briefly. " + " ".join(
        rng.choice(["alpha", "beta", "gamma"]) for _ in range(120)
    )
    lines = [
        {"id": f"g{i}", "prompt": f"{preamble} Question {i}:", "max_tokens": 5, "logprobs": 2}
        for i in range(5)
    ]
    lines += [
        openai_line(f"n{i}", f"{preamble} Pick {i}:", max_tokens=4, n=2, temperature=1.0, seed=i)
        for i in range(3)
    ]
    lines += [
        {
            "id": f"s{i}",
            "prompt": f"{preamble} {word}",
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
        }
        for i, word in enumerate(["yes", "no", "maybe"])
    ]
    lines.append({"id": "alone", "prompt": "Nothing shared here.", "max_tokens": 3})
    job = write_jsonl(tmp_path / "in.jsonl", lines)
    outputs = {}
    for flag in ("on", "off"):
        out, metrics = tmp_path / f"out-{flag}.jsonl", tmp_path / f"metrics-{flag}.jsonl"
        result = run_cli(job, out, "--model", tiny_dir, "--prefix-cache", flag, "--metrics",
                         metrics, "--batch-size", "4")  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[flag] = (out, read_jsonl(metrics)[-1])
    assert same(comparable_records(outputs["on"][0]), comparable_records(outputs["off"][0]))
    on, off = outputs["on"][1], outputs["off"][1]
    assert on["prefix_cache"] is True and off["prefix_cache"] is False
    # Off, only the n choices' prompts are taken (from their first choice), never a prefix.
    # The longest max_tokens start first: the g lines, in order, on the slot cache (16-token
    # blocks), each taking what it shares with those before it.
    greedy = [tokenizer(line["prompt"]).input_ids for line in lines[:5]]
    for flag, counts in (("off", [0] * 5), ("on", expected_reuse(greedy, 16))):
        cached = {
            i: r["timing"]["cached_tokens"] for i, r in results_by_id(outputs[flag][0]).items()
        }
        assert [cached[f"g{i}"] for i in range(5)] == counts
    assert on["prompt_tokens"] + on["reused_tokens"] == off["prompt_tokens"] + off["reused_tokens"]
    assert on["prefix_hit_rate"] == round(
        on["reused_tokens"] / (on["reused_tokens"] + on["prompt_tokens"]), 4
    )
    assert on["prompt_tokens"] < off["prompt_tokens"] / 2
