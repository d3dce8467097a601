"""Continuous batching: the scheduler's decisions, rows joining mid-flight, the cache's limits,
and seeded draws that nothing beside a row can move. transformers is the oracle for tokens."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import hf_greedy

from batchgen.engine import Request, SamplingParams, SchedulerConfig
from batchgen.engine.scheduler import Row, Scheduler


class RowsCache:
    """A cache with room for `rows` rows of up to `tokens` positions (what the scheduler sees)."""

    kind = "test"
    block_size = 4096  # no prompt here has a full block: it keeps no prefix

    def __init__(self, rows: int, tokens: int = 1024):
        self.rows, self.tokens = rows, tokens
        self.held: set[tuple[int, int]] = set()
        self.forks: list[tuple[tuple[int, int], tuple[int, int], int]] = []

    def fits(self, tokens: int, rows: int = 1) -> bool:
        return tokens <= self.tokens and rows <= self.rows

    def holds(self, blocks) -> int:
        return 0  # it keeps no prefix

    def admit(self, row: tuple[int, int], tokens: int, blocks=()) -> bool:
        if len(self.held) == self.rows or tokens > self.tokens:
            return False
        self.held.add(row)
        return True

    def commit(self, row: tuple[int, int], blocks) -> None:
        pass

    def release(self, row: tuple[int, int]) -> None:
        self.held.remove(row)

    def fork(self, source: tuple[int, int], target: tuple[int, int], tokens: int) -> bool:
        self.forks.append((source, target, tokens))
        return True

    @property
    def occupancy(self) -> float:
        return len(self.held) / self.rows

    @property
    def idle(self) -> bool:
        return not self.held


def row(index: int, prompt: int, max_tokens: int = 4) -> Row:
    return Row(index, [7] * prompt, SamplingParams(max_tokens=max_tokens), 0, 0.0)


def run_plan(scheduler: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule one step and apply it as the engine would; (kind, row, tokens) per entry."""
    plan = scheduler.schedule(0.0)
    for r in plan.decode:
        r.computed += 1
        r.generated.append(1)
    for r, n in plan.prefill:
        r.computed += n
        if not r.prefilling:
            r.generated.append(1)
    entries = [("decode", r.index, 1) for r in plan.decode]
    return entries + [("prefill", r.index, n) for r, n in plan.prefill]


def test_decode_rows_first_then_prompt_chunks_within_the_step_budget():
    scheduler = Scheduler(SchedulerConfig(max_rows=8, step_tokens=10), RowsCache(8))
    for i, n in enumerate([4, 3, 25]):
        scheduler.add(row(i, n))
    # Step 1: rows 0 and 1 whole (7 tokens), row 2 gets the 3 left over.
    assert run_plan(scheduler) == [("prefill", 0, 4), ("prefill", 1, 3), ("prefill", 2, 3)]
    # Step 2: two decode rows take 2 of the 10; row 2's prompt goes on in chunks.
    assert run_plan(scheduler) == [("decode", 0, 1), ("decode", 1, 1), ("prefill", 2, 8)]
    assert run_plan(scheduler) == [("decode", 0, 1), ("decode", 1, 1), ("prefill", 2, 8)]
    assert run_plan(scheduler)[-1] == ("prefill", 2, 6)  # its last chunk
    assert run_plan(scheduler) == [("decode", r, 1) for r in (0, 1, 2)]


def test_rows_are_admitted_first_come_up_to_max_rows_and_the_cache():
    cache = RowsCache(rows=2)
    scheduler = Scheduler(SchedulerConfig(max_rows=3, step_tokens=100), cache)
    for i in range(4):
        scheduler.add(row(i, 5))
    assert [e[1] for e in run_plan(scheduler)] == [0, 1]  # the cache holds two
    first = scheduler.running[0]
    scheduler.finish(first)
    assert cache.held == {(1, 0)}
    assert [e[:2] for e in run_plan(scheduler)] == [("decode", 1), ("prefill", 2)]
    # A row too big for any cache is refused when it arrives, never queued forever.
    with pytest.raises(ValueError, match="needs 2004 tokens of KV cache"):
        scheduler.add(row(9, 2000, max_tokens=4))


def test_continuous_refills_at_once_and_static_waits_for_the_whole_batch():
    for policy, admitted_after_one_finishes in (("continuous", [2]), ("static", [])):
        config = SchedulerConfig(policy, max_rows=2, step_tokens=100)
        scheduler = Scheduler(config, RowsCache(8))
        for i in range(4):
            scheduler.add(row(i, 5))
        run_plan(scheduler)
        scheduler.finish(scheduler.running[0])
        entries = run_plan(scheduler)
        assert [i for kind, i, _ in entries if kind == "prefill"] == admitted_after_one_finishes
        scheduler.finish(scheduler.running[-1])
        if policy == "static":  # the batch is done: the next one comes in whole
            assert [e[1] for e in run_plan(scheduler)] == [2, 3]


def test_static_admits_a_full_batch_whatever_the_step_budget():
    scheduler = Scheduler(SchedulerConfig("static", max_rows=3, step_tokens=4), RowsCache(8))
    for i in range(3):
        scheduler.add(row(i, 6))
    assert run_plan(scheduler) == [("prefill", 0, 4)]
    assert len(scheduler.running) == 3  # all three admitted; their prompts share the budget


def test_abandon_gives_all_the_cache_back():
    cache = RowsCache(4)
    scheduler = Scheduler(SchedulerConfig(max_rows=4), cache)
    for i in range(6):
        scheduler.add(row(i, 3))
    run_plan(scheduler)
    assert not cache.idle
    scheduler.abandon()
    assert cache.idle and not scheduler.busy


@pytest.mark.parametrize(
    ("field", "value"), [("policy", "greedy"), ("max_rows", 0), ("step_tokens", 0)]
)
def test_scheduler_config_checks_itself(field, value):
    with pytest.raises(ValueError, match=f"invalid {field}"):
        SchedulerConfig(**{field: value})


def mixed_requests(tokenizer, hf_tiny) -> tuple[list[Request], list[list[int]]]:
    """Prompts of 1 to 900 tokens, max_tokens from 1 to 40, two rows ending on stop strings;
    and what HF generates for each alone."""
    rng = random.Random(5)
    lengths = [1, 900, 3, 17, 250, 2, 64, 511, 9, 130]
    prompts = [[rng.randrange(50000) for _ in range(n)] for n in lengths]
    max_tokens = [7, 30, 1, 40, 12, 25, 3, 9, 18, 5]
    requests, expected = [], []
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        full = hf_greedy(hf_tiny, prompt, n)
        stop: tuple[str, ...] = ()
        if i in (3, 5):  # stop on the text of the 5th and 6th tokens: the row ends after 6
            stop = (tokenizer.decode(full[4:6]),)
            full = full[:6]
        requests.append(Request(prompt, SamplingParams(max_tokens=n, stop=stop)))
        expected.append(full)
    return requests, expected


@pytest.fixture(scope="module")
def mixed(tokenizer, hf_tiny):
    return mixed_requests(tokenizer, hf_tiny)


@pytest.mark.parametrize(
    "schedule",
    [
        SchedulerConfig(max_rows=3, step_tokens=64),  # the 900-token prompt in 15 chunks
        SchedulerConfig(max_rows=10, step_tokens=2048),
        SchedulerConfig("static", max_rows=4, step_tokens=100),
    ],
    ids=["continuous-small-steps", "continuous-wide", "static"],
)
def test_rows_joining_mid_flight_equal_hf_per_row(engine, mixed, schedule):
    requests, expected = mixed
    out = engine.generate(requests, schedule=schedule)
    assert [c.token_ids for c in out.completions] == expected
    assert [c.finish_reason for c in out.completions][3] == "stop"
    assert engine.cache.idle  # every slot and page is back
    if schedule.policy == "continuous" and schedule.max_rows == 3:
        assert max(w.mean_rows for w in out.windows) <= 3
        # Rows left and others took their place while long ones went on.
        assert len(out.windows) >= 5


def test_more_work_than_the_cache_holds_queues_rather_than_fails(small_cache_engine, hf_tiny):
    engine = small_cache_engine
    rng = random.Random(9)
    prompts = [[rng.randrange(50000) for _ in range(600)] for _ in range(7)]
    requests = [Request(p, SamplingParams(max_tokens=4 + i)) for i, p in enumerate(prompts)]
    held = []
    out = engine.generate(requests, on_step=lambda _: held.append(engine.cache.occupancy))
    expected = [hf_greedy(hf_tiny, p, 4 + i) for i, p in enumerate(prompts)]
    assert [c.token_ids for c in out.completions] == expected
    assert max(held) <= 1.0 and max(w.mean_rows for w in out.windows) <= 3
    assert engine.cache.idle


def test_an_abandoned_stream_gives_every_slot_and_page_back(engine, prompt_ids):
    requests = [Request(ids, SamplingParams(max_tokens=5 + i)) for i, ids in enumerate(prompt_ids)]
    stream = engine.stream(requests)
    window = next(stream)
    assert window.finished and not engine.cache.idle
    stream.close()
    assert engine.cache.idle
    assert len(engine.generate(requests[:2]).completions) == 2  # and it runs again


def test_an_engine_failure_mid_stream_gives_the_cache_back(engine, prompt_ids):
    class Boom(Exception):
        pass

    def fail(step):
        if step.index == 2:
            raise Boom

    with pytest.raises(Boom):
        engine.generate([Request(ids, SamplingParams(max_tokens=9)) for ids in prompt_ids], fail)
    assert engine.cache.idle


def seeded_lines(count: int) -> list[tuple[list[int], SamplingParams]]:
    """Seeded requests at a temperature that leaves this random model's next-token
    distribution flat, a third each with top-p, top-k or no cut, prompts of 1-40 tokens."""
    rng = random.Random(11)
    lines = []
    for i in range(count):
        prompt = [rng.randrange(50000) for _ in range(rng.randint(1, 40))]
        cut = [{"top_p": 0.9}, {"top_k": 50}, {}][i % 3]
        params = SamplingParams(max_tokens=8, temperature=1.3, seed=1000 + i, **cut)
        lines.append((prompt, params))
    return lines


def test_seeded_draws_do_not_depend_on_batch_neighbours_or_join_time(engine, hf_tiny):
    """210 seeded lines, run at batch 1, 5, 16 and 32, in other orders, beside greedy and
    other sampled rows, joining at other steps: every line draws the same tokens."""
    lines = seeded_lines(210)
    requests = [Request(p, s) for p, s in lines]
    alone = engine.generate(requests, schedule=SchedulerConfig(max_rows=1))
    reference = [c.token_ids for c in alone.completions]
    assert len({tuple(t) for t in reference}) > 200, "draws should differ, or the test is weak"
    neighbour = Request([464] * 30, SamplingParams(max_tokens=20))  # a long greedy row
    for max_rows, step_tokens, seed in ((5, 7, 1), (16, 64, 2), (32, 512, 3)):
        order = list(range(len(requests)))
        random.Random(seed).shuffle(order)
        shuffled = [requests[i] for i in order]
        crowd = [x for i, r in enumerate(shuffled) for x in ([neighbour, r] if i % 7 == 0 else [r])]
        schedule = SchedulerConfig(max_rows=max_rows, step_tokens=step_tokens)
        out = engine.generate(crowd, schedule=schedule)
        got = [
            c.token_ids for c, r in zip(out.completions, crowd, strict=True) if r is not neighbour
        ]
        assert got == [reference[i] for i in order], (max_rows, step_tokens)
    # The greedy neighbour is still HF's greedy continuation.
    assert out.completions[0].token_ids == hf_greedy(hf_tiny, neighbour.prompt_token_ids, 20)


def test_a_draw_is_gumbel_max_over_the_row_s_own_logits_and_key(engine, prompt_ids):
    """Recompute each draw independently in NumPy from the step's logits: the noise of token v
    is a hash of (seed, token index, v); the draw is argmax(logits / T + noise) over the
    tokens its cut allows."""
    from batchgen.engine.sampling import cut, draw_keys

    params = [
        SamplingParams(max_tokens=5, temperature=t, seed=s, **c)
        for t, s, c in ((0.7, 1, {}), (1.3, 2, {"top_k": 20}), (1.0, 3, {"top_p": 0.8}))
    ]
    steps = []
    engine.generate([Request(prompt_ids[i], p) for i, p in enumerate(params)], steps.append)
    seen = [0, 0, 0]
    for step in steps:
        for i, row in enumerate(step.rows):
            p, logits = params[row], step.logits[i]
            key = draw_keys(np.array([p.seed], np.uint64), np.array([seen[row]]))[0]
            noise = gumbel_noise(key, logits.shape[-1])
            allowed = logits >= (cut(logits, p) if p.cuts else -np.inf)
            scaled = logits * np.float32(1.0 / p.temperature)  # as the sampler scales
            scores = np.where(allowed, scaled + noise, -np.inf)
            assert step.tokens[i] == np.argmax(scores), (row, seen[row])
            seen[row] += 1


def gumbel_noise(key: np.uint64, vocab: int) -> np.ndarray:
    """The sampler's noise, written again in NumPy: murmur3's finaliser with + for ^."""

    def mix(x: np.ndarray) -> np.ndarray:
        x = x + x // np.uint32(1 << 16)
        x = x * np.uint32(0x85EBCA6B)
        x = x + x // np.uint32(1 << 13)
        x = x * np.uint32(0xC2B2AE35)
        return x + x // np.uint32(1 << 16)

    lo = np.uint32(int(key) & 0xFFFFFFFF)
    hi = np.uint32(int(key) >> 32)
    with np.errstate(over="ignore"):
        bits = mix(mix(np.arange(vocab, dtype=np.uint32) * np.uint32(0x9E3779B9) + lo) + hi)
    uniform = ((bits // np.uint32(256)).astype(np.float32) + np.float32(0.5)) * np.float32(2**-24)
    return -np.log(-np.log(uniform))


def test_sampled_frequencies_follow_the_softmax(engine, prompt_ids):
    """2,000 one-token draws of one prompt with distinct seeds: each of the likeliest tokens
    comes up as often as softmax(logits / T) says (the noise hash is good enough)."""
    temperature = 0.25
    requests = [
        Request(prompt_ids[3], SamplingParams(max_tokens=1, temperature=temperature, seed=s))
        for s in range(2000)
    ]
    steps = []
    engine.generate(requests, steps.append, SchedulerConfig(max_rows=256, step_tokens=4096))
    logits = steps[0].logits[0].astype(np.float64) / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    tokens = np.concatenate([s.tokens for s in steps])
    top = np.argsort(-probs)[:5]
    assert probs[top].sum() > 0.5, "the test needs a peaked enough distribution"
    for token in top:
        expected = probs[token] * len(tokens)
        observed = np.sum(tokens == token)
        assert abs(observed - expected) < 4 * np.sqrt(expected) + 2, (token, observed, expected)
