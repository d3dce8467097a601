"""GPT-2 in MAX: module names mirror Hugging Face's so its state dict maps one-to-one.

One forward serves both prefill (S prompt tokens) and decode (S = 1): the new keys and
values are written in place into preallocated per-layer caches at positions
[total - S, total), and attention reads the cache up to `total`, the last dim of the
additive attention bias. Padding and causality live entirely in that bias, built on the
host, so the graph never branches on the phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from max.dtype import DType
from max.experimental import functional as F
from max.experimental.nn import Embedding, LayerNorm, Linear, Module, ModuleList
from max.experimental.tensor import Tensor
from max.graph import BufferType, DeviceRef, Dim, TensorType, TensorValue


@dataclass(frozen=True)
class GPT2Config:
    """The GPT-2 hyper-parameters batchgen needs (names as in Hugging Face's config)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd


class Attention(Module):
    def __init__(self, config: GPT2Config):
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def _heads(self, x: Tensor) -> Tensor:
        batch, seqlen = x.shape[0], x.shape[1]
        return x.reshape([batch, seqlen, self.n_head, self.head_dim]).permute([0, 2, 1, 3])

    def forward(self, x: Tensor, bias: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        batch, seqlen, total = bias.shape[0], bias.shape[1], bias.shape[2]
        q, k, v = F.split(self.c_attn(x), [x.shape[-1]] * 3, axis=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)

        # Cache rows [start, total) receive this call's keys/values; [0, total) are read.
        total_value = _dim_value(total)
        start_value = total_value - _dim_value(seqlen)
        write = (slice(None), slice(None), (slice(start_value, total_value), seqlen))
        F.buffer_store_slice(k_cache, k, write)
        F.buffer_store_slice(v_cache, v, write)
        read = (slice(None), slice(None), (slice(0, total_value), total))
        keys = F.slice_tensor(k_cache, read)
        values = F.slice_tensor(v_cache, read)

        # Softmax in float32 whatever the model dtype: the bias's float32-min entries would
        # round to -inf in bfloat16.
        scores = _as(q @ keys.transpose(-1, -2), DType.float32) * (1.0 / math.sqrt(self.head_dim))
        scores = scores + bias.reshape([batch, 1, seqlen, total])
        out = _as(F.softmax(scores), values.dtype) @ values
        out = out.permute([0, 2, 1, 3]).reshape([batch, seqlen, x.shape[-1]])
        return self.c_proj(out)


class MLP(Module):
    def __init__(self, config: GPT2Config):
        self.c_fc = Linear(config.n_embd, config.mlp_dim)
        self.c_proj = Linear(config.mlp_dim, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(Module):
    def __init__(self, config: GPT2Config):
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, bias: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), bias, k_cache, v_cache)
        return x + self.mlp(self.ln_2(x))


class Transformer(Module):
    def __init__(self, config: GPT2Config):
        self.wte = Embedding(config.vocab_size, dim=config.n_embd)
        self.wpe = Embedding(config.n_positions, dim=config.n_embd)
        self.h = ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(Module):
    """GPT-2 with its LM head tied to `wte`; returns last-position logits and their argmax."""

    def __init__(self, config: GPT2Config):
        self.config = config
        self.transformer = Transformer(config)

    def forward(
        self, tokens: Tensor, positions: Tensor, bias: Tensor, *caches: Tensor
    ) -> tuple[Tensor, Tensor]:
        t = self.transformer
        x = t.wte(tokens) + t.wpe(positions)
        for i, block in enumerate(t.h):
            x = block(x, bias, caches[2 * i], caches[2 * i + 1])
        # Left padding puts every row's last real token in the last column.
        last = t.ln_f(x[:, -1, :])
        logits = _as(last @ t.wte.weight.T, DType.float32)
        return F.argmax(logits, axis=-1).reshape([logits.shape[0]]), logits


def input_types(
    config: GPT2Config, dtype: DType, device: DeviceRef
) -> list[TensorType | BufferType]:
    """Graph input types with symbolic batch, sequence, context and cache-length dims."""
    cache = BufferType(dtype, ["batch", config.n_head, "maxlen", config.head_dim], device=device)
    return [
        TensorType(DType.int64, ["batch", "seqlen"], device=device),
        TensorType(DType.int64, ["batch", "seqlen"], device=device),
        TensorType(DType.float32, ["batch", "seqlen", "total"], device=device),
        *[cache] * (2 * config.n_layer),
    ]


def _dim_value(dim: Dim) -> TensorValue:
    """A symbolic dim as a scalar int64 graph value (slice bounds need one)."""
    return TensorValue(F.reshape(F.shape_to_tensor([dim]), []))


def _as(x: Tensor, dtype: DType) -> Tensor:
    return x if x.dtype == dtype else x.cast(dtype)
