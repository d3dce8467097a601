"""The generation engine: GPT-2 compiled once, batched prefill + KV-cached decode."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from max.driver import CPU, Accelerator, Device, accelerator_count
from max.dtype import DType
from max.experimental import functional as F
from max.experimental.tensor import Tensor, default_device, default_dtype
from max.graph import DeviceRef
from transformers import PreTrainedTokenizerBase

from batchgen.engine.model import GPT2Config, GPT2LMHeadModel, input_types
from batchgen.engine.sampling import Sampler, SamplingParams, step_seeds
from batchgen.engine.textstream import TextStream, decode, token_bytes
from batchgen.engine.weights import Checkpoint, load_checkpoint, load_tokenizer

FinishReason = Literal["stop", "length"]
# The host-side torch dtype that carries each MAX dtype (numpy has no bfloat16).
TORCH_DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16}
_MASKED = np.finfo(np.float32).min


class ContextLengthError(ValueError):
    """A request's prompt plus max_tokens does not fit the model's context."""


@dataclass(frozen=True)
class Request:
    """One prompt, already tokenized, and how to decode it."""

    prompt_token_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    """What one request produced: its tokens (EOS included) and its text (stop string cut)."""

    token_ids: list[int]
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_tokens
    prompt_tokens: int
    text: str = ""

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class BatchOutput:
    """The completions of one `generate` call, in request order, and its timing."""

    completions: list[Completion]
    padded_length: int
    prefill_s: float
    decode_s: float
    decode_steps: int


@dataclass(frozen=True)
class Step:
    """One forward pass of a batch: the token each active row received, and the logits."""

    index: int
    tokens: np.ndarray
    active: np.ndarray
    logits: Tensor


# Called after every forward pass, e.g. to stream text as it is generated.
OnStep = Callable[[Step], None]


@dataclass(frozen=True)
class EngineConfig:
    """Where and in what precision the model runs."""

    device: Literal["auto", "cpu", "gpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


def resolve_device(config: EngineConfig) -> tuple[Device, DType]:
    """Pick the device and dtype explicitly: GPU + bfloat16 when one exists, else CPU + fp32."""
    want_gpu = config.device == "gpu" or (config.device == "auto" and accelerator_count() > 0)
    if want_gpu and accelerator_count() == 0:
        raise ValueError("--device gpu: no accelerator is visible to MAX")
    device: Device = Accelerator() if want_gpu else CPU()
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if want_gpu else "float32"
    if dtype == "bfloat16" and not want_gpu:
        # MAX's CPU bf16 kernels ran 3-5x slower than fp32; refuse rather than crawl.
        raise ValueError("bfloat16 is supported on GPU only; use float32 on CPU")
    return device, DType.float32 if dtype == "float32" else DType.bfloat16


class Engine:
    """GPT-2 compiled once for any batch size and length; `generate` runs one batch."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: Device,
        dtype: DType,
        tokenizer: PreTrainedTokenizerBase,
    ):
        self.config: GPT2Config = checkpoint.config
        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer
        # Sized by the model, whose vocabulary may be padded past the tokenizer's.
        self.vocab_bytes = token_bytes(tokenizer, self.config.vocab_size)
        self.timings: dict[str, float] = {}
        start = time.perf_counter()
        # Lazy: parameters are declared, never initialised; `weights=` supplies them. The
        # dtype and device are explicit because MAX's defaults differ between CPU and GPU.
        with F.lazy(), default_dtype(dtype), default_device(device):
            model = GPT2LMHeadModel(self.config)
        self.timings["init_s"] = time.perf_counter() - start
        start = time.perf_counter()
        device_ref = DeviceRef.from_device(device)
        self._model = model.compile(
            *input_types(self.config, dtype, device_ref), weights=checkpoint.weights
        )
        self.timings["compile_s"] = time.perf_counter() - start  # weights to device included
        self._sampler: Sampler | None = None

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "gpt2", config: EngineConfig = EngineConfig()
    ) -> Engine:
        """Load a Hub name or local directory and compile it for the chosen device."""
        device, dtype = resolve_device(config)
        start = time.perf_counter()
        checkpoint = load_checkpoint(model, TORCH_DTYPES[dtype])
        tokenizer = load_tokenizer(model)
        load_s = time.perf_counter() - start
        engine = cls(checkpoint, device, dtype, tokenizer)
        engine.timings["load_s"] = load_s
        return engine

    def check(self, request: Request) -> None:
        """Raise ValueError (ContextLengthError past the context window) if it cannot run."""
        n_prompt = len(request.prompt_token_ids)
        limit = self.config.n_positions
        if n_prompt == 0:
            raise ValueError("empty prompt: at least one token is required")
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})"
            )
        if n_prompt + request.params.max_tokens > limit:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_tokens "
                f"({request.params.max_tokens}) exceeds the model's context of "
                f"{limit} tokens"
            )

    def generate(self, requests: Sequence[Request], on_step: OnStep | None = None) -> BatchOutput:
        """Decode requests as one batch; each row's output is independent of the others."""
        for request in requests:
            self.check(request)
        if not requests:
            return BatchOutput([], 0, 0.0, 0.0, 0)
        if any(not r.params.greedy for r in requests):
            self.compile_sampler()
        batch = _DecodeBatch(requests, self.config, self.vocab_bytes)
        caches = self._new_caches(len(requests), batch.cache_len)

        start = time.perf_counter()
        self._step(batch, batch.prefill_inputs(), caches, on_step)
        prefill_s = time.perf_counter() - start

        start = time.perf_counter()
        steps = 0
        while not batch.done:
            self._step(batch, batch.decode_inputs(), caches, on_step)
            steps += 1
        decode_s = time.perf_counter() - start
        return BatchOutput(batch.completions(), batch.prompt_len, prefill_s, decode_s, steps)

    def _step(
        self,
        batch: _DecodeBatch,
        inputs: Sequence[np.ndarray],
        caches: list[Tensor],
        on_step: OnStep | None,
    ) -> None:
        active = batch.active_rows()
        greedy, logits = self._run(inputs, caches)
        tokens = self._choose(batch, greedy, logits)
        batch.advance(tokens)
        if on_step is not None:
            on_step(Step(batch.step - 1, tokens, active, logits))

    def _run(self, inputs: Sequence[np.ndarray], caches: list[Tensor]) -> tuple[Tensor, Tensor]:
        tensors = [Tensor.from_dlpack(a).to(self.device) for a in inputs]
        return self._model(*tensors, *caches)

    def _new_caches(self, batch: int, length: int) -> list[Tensor]:
        # Zeroed, not empty: masked slots get zero attention weight, but 0 * NaN is NaN.
        shape = (batch, self.config.n_head, length, self.config.head_dim)
        torch_dtype = TORCH_DTYPES[self.dtype]
        return [
            Tensor.from_dlpack(torch.zeros(shape, dtype=torch_dtype)).to(self.device)
            for _ in range(2 * self.config.n_layer)
        ]

    def compile_sampler(self) -> None:
        """Compile the sampler if not yet done; `generate` calls it when a request samples."""
        if self._sampler is None:
            start = time.perf_counter()
            self._sampler = Sampler(self.config.vocab_size, self.device)
            self.timings["sampler_compile_s"] = time.perf_counter() - start

    def _choose(self, batch: _DecodeBatch, greedy: Tensor, logits: Tensor) -> np.ndarray:
        """Next token per row: the graph's argmax, or a seeded sample where asked."""
        tokens = greedy.to(CPU()).to_numpy().astype(np.int64)
        sampled = batch.sampled_rows()
        if not sampled.any():
            return tokens
        assert self._sampler is not None
        drawn = self._sampler(logits, batch.params, step_seeds(batch.seeds, batch.step))
        return np.where(sampled, drawn, tokens)


class _DecodeBatch:
    """Host-side state of one left-padded batch: tokens, positions, masks, finished rows."""

    def __init__(
        self, requests: Sequence[Request], config: GPT2Config, vocab_bytes: Sequence[bytes]
    ):
        self.params = [r.params for r in requests]
        self.vocab_bytes = vocab_bytes
        # Rows with stop strings watch their text as it grows.
        self.streams = {
            row: TextStream(vocab_bytes, p.stop) for row, p in enumerate(self.params) if p.stop
        }
        self.eos = config.eos_token_id
        self.prompt_lens = np.array([len(r.prompt_token_ids) for r in requests])
        self.prompt_len = int(self.prompt_lens.max())
        self.max_tokens = np.array([p.max_tokens for p in self.params])
        self.cache_len = self.prompt_len + int(self.max_tokens.max())
        n = len(requests)
        self.prompt = np.full((n, self.prompt_len), self.eos, np.int64)
        # key_valid[b, j]: cache slot j of row b holds a real token (not left padding).
        self.key_valid = np.zeros((n, self.cache_len), bool)
        for row, request in enumerate(requests):
            pad = self.prompt_len - self.prompt_lens[row]
            self.prompt[row, pad:] = request.prompt_token_ids
            self.key_valid[row, pad:] = True
        self.seeds = np.array(
            [secrets.randbits(64) if p.seed is None else p.seed for p in self.params],
            np.uint64,
        )
        self.generated: list[list[int]] = [[] for _ in requests]
        self.finished: list[FinishReason | None] = [None] * n
        self.step = 0

    @property
    def done(self) -> bool:
        return all(self.finished)

    @property
    def total(self) -> int:
        """Cache slots in use after this step's tokens are written."""
        return self.prompt_len + self.step

    def prefill_inputs(self) -> list[np.ndarray]:
        s = self.prompt_len
        positions = np.maximum(np.cumsum(self.key_valid[:, :s], axis=1) - 1, 0)
        causal = np.tril(np.ones((s, s), bool))
        # A padding query may see only itself, so no row of the bias is fully masked.
        allowed = causal[None] & self.key_valid[:, None, :s] | np.eye(s, dtype=bool)
        return [self.prompt, positions, _bias(allowed)]

    def decode_inputs(self) -> list[np.ndarray]:
        last = np.array([g[-1] for g in self.generated], np.int64)[:, None]
        # A finished row is still fed; hold its position at its last one so it never runs
        # past the position table while longer rows go on.
        positions = np.minimum(self.prompt_lens + self.step, self.prompt_lens + self.max_tokens) - 1
        positions = positions[:, None].astype(np.int64)
        allowed = self.key_valid[:, None, : self.total]
        return [last, positions, _bias(allowed)]

    def active_rows(self) -> np.ndarray:
        return np.array([f is None for f in self.finished])

    def sampled_rows(self) -> np.ndarray:
        return np.array([not p.greedy for p in self.params]) & self.active_rows()

    def advance(self, tokens: np.ndarray) -> None:
        """Record this step's tokens and which rows finished."""
        self.key_valid[:, self.total] = True
        self.step += 1
        for row, token in enumerate(tokens.tolist()):
            if self.finished[row]:
                continue
            self.generated[row].append(token)
            params = self.params[row]
            stream = self.streams.get(row)
            if stream is not None:
                stream.push(token)
            # A stop string wins over "length" when the last allowed token completes it.
            if (token == self.eos and not params.ignore_eos) or (stream and stream.stopped):
                self.finished[row] = "stop"
            elif len(self.generated[row]) >= params.max_tokens:
                self.finished[row] = "length"

    def completions(self) -> list[Completion]:
        return [
            Completion(tokens, reason, int(n), self._text(row))
            for row, (tokens, reason, n) in enumerate(
                zip(self.generated, self.finished, self.prompt_lens, strict=True)
            )
        ]

    def _text(self, row: int) -> str:
        stream = self.streams.get(row)
        if stream is None:
            return decode(self.vocab_bytes, self.generated[row])
        return stream.text + stream.finish()  # finish() is empty once a stop string was seen


def _bias(allowed: np.ndarray) -> np.ndarray:
    """Additive attention bias: 0 where attending is allowed, float32 min elsewhere."""
    return np.where(allowed, np.float32(0), _MASKED).astype(np.float32)
