"""Per-request sampling parameters, and the sampler they drive.

A sampled row draws by Gumbel-max: argmax over its allowed tokens of logits / T + g, where the
noise g of token v is a hash of (the row's seed, the index of the token being drawn, v). So a
draw depends only on the row's own logits and its own key: neither its neighbours, nor the
batch, nor the order of a reduction can move it, short of an exact tie. The allowed tokens
(top-k, then top-p) are the row's logits at or above a cut computed from that row alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from max.driver import CPU, Device
from max.dtype import DType
from max.experimental import compilation
from max.experimental import functional as F
from max.experimental.tensor import Tensor
from max.graph import DeviceRef, TensorType

from batchgen.engine.model import to_device
from batchgen.limits import MAX_CHOICES, MAX_LOGPROBS

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NO_CUT = np.float32(-np.inf)
# How many of the likeliest tokens a top-p cut looks at first; more only if they hold too
# little of the mass (a trained model's nucleus is far smaller; a flat one may need all).
_TOP_P_FIRST_LOOK = 1024
MAX_LOGIT_BIAS = 100.0


class ParamError(ValueError):
    """A sampling parameter is out of range; `field` names it."""

    def __init__(self, field: str, value: object, allowed: str):
        super().__init__(f"invalid {field}: {value!r} (allowed: {allowed})")
        self.field = field
        self.value = value
        self.allowed = allowed


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded; temperature 0 means greedy."""

    max_tokens: int = 16  # 0: prefill only (a scoring request, with prompt_logprobs)
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    ignore_eos: bool = False
    # The row ends as soon as its text contains one of these; the text excludes it.
    stop: tuple[str, ...] = ()
    n: int = 1  # choices returned
    best_of: int | None = None  # choices generated (None: n); the n likeliest are returned
    # Log-probabilities under the model's own distribution (log-softmax of its float32 logits,
    # before penalties, bias, temperature, top-k and top-p), with this many alternatives:
    logprobs: int | None = None  # of each generated token; None: none
    prompt_logprobs: int | None = None  # of each prompt token after the first (echo)
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token has been generated
    frequency_penalty: float = 0.0  # minus this times how often it has been generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self) -> None:
        # The sampler computes in float32: the values must survive the cast.
        float32 = f"{_FLOAT32_MAX:.4g}"
        checks = {  # field: (whether it is in range, the range)
            "max_tokens": (self.max_tokens >= 0, ">= 0"),
            "temperature": (0.0 <= self.temperature <= _FLOAT32_MAX, f"0 to {float32}"),
            "top_k": (self.top_k >= 0, ">= 0 (0: no cut)"),
            "top_p": (np.float32(self.top_p) > 0.0 and self.top_p <= 1.0, "above 0, up to 1"),
            "seed": (self.seed is None or 0 <= self.seed < 2**64, "0 to 2**64 - 1"),
            "stop": (isinstance(self.stop, tuple) and all(self.stop), "non-empty strings"),
            "n": (1 <= self.n <= MAX_CHOICES, f"1 to {MAX_CHOICES}"),
            "best_of": (
                self.best_of is None or self.n <= self.best_of <= MAX_CHOICES,
                f"n to {MAX_CHOICES}",
            ),
            "logprobs": (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"0 to {MAX_LOGPROBS}",
            ),
            "prompt_logprobs": (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"0 to {MAX_LOGPROBS}",
            ),
            "presence_penalty": (-2.0 <= self.presence_penalty <= 2.0, "-2 to 2"),
            "frequency_penalty": (-2.0 <= self.frequency_penalty <= 2.0, "-2 to 2"),
            "logit_bias": (
                all(abs(b) <= MAX_LOGIT_BIAS and token >= 0 for token, b in self.logit_bias),
                f"token ids >= 0 to biases of -{MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}",
            ),
        }
        for field, (ok, allowed) in checks.items():
            if not ok:
                raise ParamError(field, getattr(self, field), allowed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def cuts(self) -> bool:
        """Whether top-k or top-p leaves out any token."""
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def choices(self) -> int:
        """Rows the request runs as: best_of, or n."""
        return self.best_of or self.n

    @property
    def adjusts(self) -> bool:
        """Whether penalties or a bias change the logits before a token is chosen."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def scores(self) -> bool:
        """Whether each generated token's log-probability is needed (asked, or best_of)."""
        return self.logprobs is not None or self.choices > self.n


def adjusted(logits: np.ndarray, params: SamplingParams, generated: Sequence[int]) -> np.ndarray:
    """One row's logits after OpenAI's presence and frequency penalties and the logit bias."""
    out = logits.astype(np.float32, copy=True)
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = np.bincount(np.asarray(generated), minlength=out.shape[-1])[: out.shape[-1]]
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    for token, bias in params.logit_bias:
        if token < out.shape[-1]:
            out[token] += bias
    return out


def derive_seed(base: int, key: str | int) -> int:
    """A request's seed from a run's base seed and the request's id (a line id, a turn)."""
    digest = hashlib.blake2b(orjson.dumps([base, key]), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def draw_keys(seeds: np.ndarray, token_index: np.ndarray) -> np.ndarray:
    """uint64 key per row for drawing its token number `token_index`: SplitMix64 of both."""
    with np.errstate(over="ignore"):
        mixed = splitmix64(seeds.astype(np.uint64)) + token_index.astype(np.uint64)
        return splitmix64(mixed)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixing hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def cut(logits: np.ndarray, params: SamplingParams) -> np.float32:
    """The lowest logit a row may still draw after top-k, then top-p (as HF applies them).

    Computed from this row's float32 logits alone; -inf when nothing is cut.
    """
    vocab = logits.shape[-1]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    kept = logits if k == vocab else np.partition(logits, vocab - k)[vocab - k :]  # the top k
    if params.top_p >= 1.0:
        return _NO_CUT if k == vocab else kept.min()
    # Top-p over the top k at the row's temperature: the smallest set of likeliest tokens
    # whose probability reaches top_p. Sorting all of them is rarely needed.
    peak = np.float64(kept.max())
    total = np.exp((kept - peak) / params.temperature).sum()
    look = min(_TOP_P_FIRST_LOOK, k)
    while True:
        top = np.sort(np.partition(kept, k - look)[k - look :])[::-1]
        mass = np.cumsum(np.exp((top - peak) / params.temperature)) / total
        n = int(np.searchsorted(mass, params.top_p)) + 1
        if n <= look or look == k:
            return top[min(n, look) - 1]  # tokens tied with the last one kept stay in
        look = min(8 * look, k)


def _mix(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser with + for ^ (MAX graphs have no bitwise ops); wraps."""
    x = x + F.floor_div(x, np.uint32(1 << 16))
    x = x * np.uint32(0x85EBCA6B)
    x = x + F.floor_div(x, np.uint32(1 << 13))
    x = x * np.uint32(0xC2B2AE35)
    return x + F.floor_div(x, np.uint32(1 << 16))


def _gumbel_max(
    logits: Tensor, inv_temperature: Tensor, cut: Tensor, key_lo: Tensor, key_hi: Tensor
) -> Tensor:
    """logits [B, V]; per row [B, 1]: 1/T, the cut, the two halves of its key -> tokens [B]."""
    vocab = logits.shape[-1]
    ids = F.range(0, vocab, 1, out_dim=vocab, dtype=DType.uint32, device=logits.device)
    bits = _mix(_mix(ids * np.uint32(0x9E3779B9) + key_lo) + key_hi)  # [B, V]
    # The top 24 bits as a uniform in (0, 1), exact in float32.
    uniform = (F.floor_div(bits, np.uint32(256)).cast(DType.float32) + 0.5) * (2.0**-24)
    noise = -F.log(-F.log(uniform))
    scores = logits * inv_temperature + noise
    allowed = F.greater_equal(logits, cut)
    scores = F.where(allowed, scores, F.full_like(scores, -np.inf))
    return F.argmax(scores, axis=-1).reshape([logits.shape[0]])


def _target_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """logits [L, V], targets int64 [L] -> each target's log-probability [L]."""
    logprobs = F.logsoftmax(logits, axis=-1)
    vocab = logits.shape[-1]
    ids = F.range(0, vocab, 1, out_dim=vocab, dtype=DType.int64, device=logits.device)
    hit = F.equal(ids, targets.reshape([logits.shape[0], 1]))  # [L, V]
    target = F.sum(F.where(hit, logprobs, F.full_like(logprobs, 0.0)), axis=-1)
    return target.reshape([logits.shape[0]])


def _top_logprobs(logits: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """logits [L, V], rows int64 [R] -> those rows' top MAX_LOGPROBS log-probabilities [R, K]
    and their token ids [R, K]."""
    picked = F.gather(logits, rows, axis=0)  # [R, V]
    return F.top_k(F.logsoftmax(picked, axis=-1), MAX_LOGPROBS, axis=-1)


class LogprobScorer:
    """Log-softmax of [rows, vocab] float32 logits on the device, compiled once; only each
    row's target and, for the rows that ask, the top MAX_LOGPROBS values cross to the host.

    The top-k is a graph of its own, run over those rows only: on the CPU it costs ~50x the
    log-softmax (measured: 2048 rows, 4.4 s with it, 80 ms without), and a scoring request
    (echo, logprobs 0) or a best_of row needs none.
    """

    def __init__(self, vocab_size: int, device: Device):
        self.device = device
        on_device = DeviceRef.from_device(device)
        logits = TensorType(DType.float32, ["rows", vocab_size], device=on_device)
        self._targets = compilation.compile(_target_logprobs, name="target_logprobs")(
            logits, TensorType(DType.int64, ["rows"], device=on_device)
        )
        self._top = compilation.compile(_top_logprobs, name="top_logprobs")(
            logits, TensorType(DType.int64, ["picked"], device=on_device)
        )

    def __call__(
        self, logits: Tensor, targets: np.ndarray, top_rows: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(target logprob [L], top logprobs [R, K] and their ids [R, K] of the R top_rows)."""
        target = self._targets(logits, to_device(targets.astype(np.int64), self.device))
        host_target = target.to(CPU()).to_numpy()
        if not top_rows:
            empty = np.zeros((0, MAX_LOGPROBS))
            return host_target, empty.astype(np.float32), empty.astype(np.int64)
        rows = to_device(np.asarray(top_rows, np.int64), self.device)
        top, ids = (o.to(CPU()).to_numpy() for o in self._top(logits, rows))
        return host_target, top, ids.astype(np.int64)


class Sampler:
    """Gumbel-max over [rows, vocab] float32 logits, compiled once; greedy rows ignore it."""

    def __init__(self, vocab_size: int, device: Device):
        self.device = device
        on_device = DeviceRef.from_device(device)
        per_row = ["rows", 1]
        self._graph = compilation.compile(_gumbel_max, name="sampler")(
            TensorType(DType.float32, ["rows", vocab_size], device=on_device),
            TensorType(DType.float32, per_row, device=on_device),
            TensorType(DType.float32, per_row, device=on_device),
            TensorType(DType.uint32, per_row, device=on_device),
            TensorType(DType.uint32, per_row, device=on_device),
        )

    def __call__(
        self, logits: Tensor, params: Sequence[SamplingParams], keys: np.ndarray
    ) -> np.ndarray:
        """One token per row, drawn with that row's params and uint64 key."""
        inv_temperature = np.array(
            [1.0 if p.greedy else 1.0 / p.temperature for p in params], np.float32
        )
        cuts = np.full(len(params), _NO_CUT, np.float32)
        if any(p.cuts and not p.greedy for p in params):
            host = logits.to(CPU()).to_numpy()
            for row, p in enumerate(params):
                if p.cuts and not p.greedy:
                    cuts[row] = cut(host[row], p)
        keys = keys.astype(np.uint64)
        halves = [
            (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32),
            (keys >> np.uint64(32)).astype(np.uint32),
        ]
        columns = [inv_temperature, cuts, *halves]
        tokens = self._graph(logits, *(to_device(c[:, None], self.device) for c in columns))
        return tokens.to(CPU()).to_numpy().astype(np.int64)
