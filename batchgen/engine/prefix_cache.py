"""Automatic prefix reuse, as vLLM's: a prompt's full blocks of tokens are named by chained
hashes, so that two prompts with the same start name the same blocks and the keys and values
computed for one serve the other.

A block's hash covers its tokens and every block before it, so one hash names a whole prefix
and a cache that holds block i holds 0..i too. The caches (`kv_cache.py`) hold the K/V; this
module holds the names, and the prompt log-probabilities a scoring request computed per block,
which a later scoring request with the same prefix takes instead of computing them again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from batchgen.engine.scheduler import TokenLogprob

BlockHash = bytes


def block_hashes(tokens: Sequence[int], block_size: int) -> list[BlockHash]:
    """The chained hash of each full block of `tokens`, from the start."""
    ids = np.asarray(tokens, np.int64)
    hashes: list[BlockHash] = []
    parent = b""
    for start in range(0, len(ids) - block_size + 1, block_size):
        # sha256, not hash(): a collision would silently give one prompt another's keys.
        parent = hashlib.sha256(parent + ids[start : start + block_size].tobytes()).digest()
        hashes.append(parent)
    return hashes


def reusable_blocks(prompt_tokens: int, block_size: int) -> int:
    """Blocks of a prompt that may come from the cache: its last token is always computed,
    since its logits choose the first new token."""
    return (prompt_tokens - 1) // block_size


class ScoredBlocks:
    """Prompt log-probabilities per block, for scoring requests (`prompt_logprobs`).

    Block i's entries are those of the tokens at positions i*B+1 .. (i+1)*B: each depends on
    the tokens before it and on itself, so the key is block i's hash and the token after it.
    Least recently used go first once `capacity` blocks are held.
    """

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self._blocks: OrderedDict[tuple[BlockHash, int], tuple[int, list[TokenLogprob]]] = (
            OrderedDict()
        )

    def get(self, block: BlockHash, after: int, top: int) -> list[TokenLogprob] | None:
        """The block's entries with `top` alternatives each, if held with as many."""
        held = self._blocks.get((block, after))
        if held is None or held[0] < top:
            return None
        self._blocks.move_to_end((block, after))
        kept, entries = held
        if kept == top:
            return entries
        return [entry._replace(top=entry.top[:top]) for entry in entries]

    def put(self, block: BlockHash, after: int, top: int, entries: list[TokenLogprob]) -> None:
        held = self._blocks.get((block, after))
        if held is not None and held[0] >= top:
            return
        self._blocks[(block, after)] = (top, entries)
        self._blocks.move_to_end((block, after))
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
