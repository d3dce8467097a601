"""Token ids to text, incrementally: UTF-8-safe streaming and stop strings that never leak."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte is spelled as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_bytes(tokenizer: PreTrainedTokenizerBase, vocab_size: int = 0) -> list[bytes]:
    """The raw bytes of every token id the model can emit; special tokens decode to nothing.

    A model's vocabulary may be padded past the tokenizer's (nanoGPT pads 50257 to 50304);
    ids the tokenizer does not know decode to nothing, as in Hugging Face's `decode`.
    """
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    known = [
        b"" if i in special else bytes(char_to_byte[c] for c in piece)
        for i, piece in enumerate(pieces)
    ]
    return known + [b""] * max(0, vocab_size - len(known))


def decode(vocab_bytes: Sequence[bytes], token_ids: Sequence[int]) -> str:
    """All of a completion's text at once (invalid UTF-8 becomes U+FFFD, as HF decodes it)."""
    return b"".join(vocab_bytes[t] for t in token_ids).decode("utf-8", errors="replace")


class TextStream:
    """Turns one row's tokens into text as they arrive.

    `push` returns only text that is final: whole characters (a multi-byte character split
    over several tokens waits for its last byte) and nothing that could still turn out to be
    the start of a stop string. Once a stop string appears, the text before it is all there is.
    """

    def __init__(self, vocab_bytes: Sequence[bytes], stop: Sequence[str] = ()):
        self._vocab_bytes = vocab_bytes
        self._stop = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded but not yet released: it may begin a stop string
        self.text = ""  # everything released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the newly final text (possibly empty)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(self._vocab_bytes[token_id])
        cut = self._stop_index()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self._held) - self._partial_stop_length())

    def finish(self) -> str:
        """The row ended without a stop string: release whatever was held back."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._release(len(self._held))

    def _stop_index(self) -> int | None:
        # Search from the start of the held text: a stop string may straddle tokens.
        found = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop_length(self) -> int:
        """Length of the longest held suffix that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if self._held.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        released, self._held = self._held[:end], self._held[end:]
        self.text += released
        if self.stopped:
            self._held = ""
        return released
