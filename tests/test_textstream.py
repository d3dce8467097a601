"""Incremental detokenization against the Hugging Face tokenizer's own decode."""

from __future__ import annotations

import random

import pytest
from conftest import PROMPTS

from batchgen.engine.textstream import TextStream, decode, token_bytes


@pytest.fixture(scope="module")
def vocab_bytes(tokenizer) -> list[bytes]:
    return token_bytes(tokenizer)


def stream_all(vocab_bytes, ids, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(vocab_bytes, stop)
    chunks = [stream.push(t) for t in ids]
    chunks.append(stream.finish())
    return chunks, stream


def test_decode_matches_hf_on_prompts_and_random_ids(tokenizer, vocab_bytes):
    rng = random.Random(0)
    sequences = [tokenizer(p).input_ids for p in PROMPTS]
    # Random ids include byte fragments that are not valid UTF-8, and the EOS token.
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(40)] for _ in range(50)]
    sequences.append([tokenizer.eos_token_id, *sequences[0], tokenizer.eos_token_id])
    for ids in sequences:
        assert decode(vocab_bytes, ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stream_joins_to_decode(tokenizer, vocab_bytes):
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(30)]
        chunks, stream = stream_all(vocab_bytes, ids)
        assert "".join(chunks) == stream.text == decode(vocab_bytes, ids)


def test_multibyte_character_split_over_tokens_is_never_broken(tokenizer, vocab_bytes):
    text = " 😀 héllo 🎉🎉 wörld 日本語"
    ids = tokenizer(text).input_ids
    # The oracle: some single tokens are partial characters on their own.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    chunks, stream = stream_all(vocab_bytes, ids)
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == text


def test_stop_string_across_tokens_is_held_back_and_cut(tokenizer, vocab_bytes):
    text = "Hello there\nHuman: how are you"
    ids = tokenizer(text).input_ids
    pieces = [tokenizer.decode([t]) for t in ids]
    assert "\nHuman:" not in pieces  # the stop string really spans several tokens
    chunks, stream = stream_all(vocab_bytes, ids, stop=["\nAI:", "\nHuman:"])
    assert stream.stopped
    assert stream.text == "".join(chunks) == "Hello there"
    # No chunk ever showed a piece of the stop string.
    assert all("\n" not in chunk and "Human" not in chunk for chunk in chunks)


def test_partial_stop_that_does_not_complete_is_released(tokenizer, vocab_bytes):
    text = "a\nHum and\nHumans"
    chunks, stream = stream_all(vocab_bytes, tokenizer(text).input_ids, stop=["\nHuman:"])
    assert not stream.stopped
    assert "".join(chunks) == stream.text == text


def test_earliest_of_several_stop_strings_wins(tokenizer, vocab_bytes):
    text = "one, two. three"
    _, stream = stream_all(vocab_bytes, tokenizer(text).input_ids, stop=[".", ","])
    assert stream.text == "one"
