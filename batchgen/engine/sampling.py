"""Per-request sampling parameters and the compiled sampler they drive."""

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
from max.nn.kernels import topk_fused_sampling

_fused_sampling = F.functional(topk_fused_sampling)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# What "no top-k cut" draws from. MAX 26.7's fused kernel reads a cut at the whole vocabulary
# (or 0) as "no cut" and then draws from its 256 likeliest tokens only; and past about 20,000
# candidates its draws change with the batch (both measured on CPU). 16,384 keeps draws
# batch-invariant and leaves out only the least likely tail of GPT-2's 50,257 tokens.
NO_CUT_TOP_K = 16_384


class ParamError(ValueError):
    """A sampling parameter is out of range; `field` names it."""

    def __init__(self, field: str, value: object):
        super().__init__(f"invalid {field}: {value!r}")
        self.field = field
        self.value = value


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded; temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    ignore_eos: bool = False
    # The row ends as soon as its text contains one of these; the text excludes it.
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The sampler computes in float32: the values must survive the cast.
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "temperature": 0.0 <= self.temperature <= _FLOAT32_MAX,
            "top_k": self.top_k >= 0,
            "top_p": np.float32(self.top_p) > 0.0 and self.top_p <= 1.0,
            "seed": self.seed is None or 0 <= self.seed < 2**64,
            "stop": isinstance(self.stop, tuple) and all(self.stop),
        }
        for field, ok in checks.items():
            if not ok:
                raise ParamError(field, getattr(self, field))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def derive_seed(base: int, key: str | int) -> int:
    """A request's seed from a run's base seed and the request's id (a line id, a turn)."""
    digest = hashlib.blake2b(orjson.dumps([base, key]), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def step_seeds(seeds: np.ndarray, step: int) -> np.ndarray:
    """Per-row seeds for one decode step: a hash of (request seed, step).

    Each row's random stream depends only on its own seed and step, so a request samples
    the same tokens whatever it is batched with.
    """
    with np.errstate(over="ignore"):
        return _splitmix64(_splitmix64(seeds.astype(np.uint64)) + np.uint64(step))


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixing hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _sample(
    logits: Tensor,
    top_k: Tensor,
    max_k: Tensor,
    temperature: Tensor,
    top_p: Tensor,
    min_top_p: Tensor,
    seed: Tensor,
) -> Tensor:
    tokens = _fused_sampling(
        logits,
        top_k,
        temperature=temperature,
        max_k=max_k,
        top_p=top_p,
        min_top_p=min_top_p,
        seed=seed,
    )
    return tokens.reshape([logits.shape[0]])


class Sampler:
    """MAX's fused top-k/top-p/temperature sampler, compiled once for [batch, vocab] logits."""

    def __init__(self, vocab_size: int, device: Device):
        self.device = device
        self.vocab_size = vocab_size
        on_device, cpu = DeviceRef.from_device(device), DeviceRef.CPU()
        self._graph = compilation.compile(_sample, name="sampler")(
            TensorType(DType.float32, ["batch", vocab_size], device=on_device),
            TensorType(DType.int64, ["batch"], device=on_device),
            TensorType(DType.int64, [], device=cpu),
            TensorType(DType.float32, ["batch"], device=on_device),
            TensorType(DType.float32, ["batch"], device=on_device),
            TensorType(DType.float32, [], device=cpu),
            TensorType(DType.uint64, ["batch"], device=on_device),
        )

    def __call__(
        self, logits: Tensor, params: Sequence[SamplingParams], seeds: np.ndarray
    ) -> np.ndarray:
        """One token per row, drawn with that row's params and seed.

        Greedy rows get a throwaway top-1 draw; the caller keeps the argmax for them.
        """
        no_cut = min(NO_CUT_TOP_K, self.vocab_size - 1)
        top_k = np.array(
            [1 if p.greedy else min(p.top_k or no_cut, no_cut) for p in params], np.int64
        )
        top_p = np.array([1.0 if p.greedy else p.top_p for p in params], np.float32)
        temperature = np.array([1.0 if p.greedy else p.temperature for p in params], np.float32)
        # Launch-wide bounds, read on the host; a row's draw does not depend on them.
        max_k = np.array(top_k.max(), np.int64)
        min_top_p = np.array(top_p.min(), np.float32)
        tokens = self._graph(
            logits,
            self._to_device(top_k),
            Tensor.from_dlpack(max_k),
            self._to_device(temperature),
            self._to_device(top_p),
            Tensor.from_dlpack(min_top_p),
            self._to_device(seeds),
        )
        return tokens.to(CPU()).to_numpy()

    def _to_device(self, array: np.ndarray) -> Tensor:
        return Tensor.from_dlpack(array).to(self.device)
