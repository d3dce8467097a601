"""GPT-2 in MAX: module names mirror Hugging Face's so its state dict maps one-to-one.

One module tree, run two ways, one per KV cache (the weights are shared). Both take the new
tokens of many rows concatenated (ragged: a decode row brings one token, a prompt chunk many),
so one graph serves prefill, decode and mixed steps, with no padding and no host-built mask:

- `SlotGPT2`: caches [slots, H, maxlen, D] per layer; batchgen's Mojo op stores each row's
  K/V at its own slot and positions and attends over that row's own tokens only.
- `PagedGPT2`: MAX's paged cache and its `flash_attention_ragged` kernels.

Each returns `ModelOutputs`: the logits after the new tokens the step asks for (each row's
last, or every token of a prompt being scored) and their argmax.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
from max.driver import Buffer, Device
from max.dtype import DType
from max.experimental import functional as F
from max.experimental.nn import Embedding, LayerNorm, Linear, Module, ModuleList
from max.experimental.tensor import Tensor
from max.graph import BufferType, DeviceRef, TensorType
from max.nn import kernels
from max.nn.attention import MHAMaskVariant
from max.nn.kv_cache import MHAKVCacheParams

# Attention over one layer's cache: q, k, v [..., H, D] of this call's tokens -> [..., H, D].
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]

_store_k_ragged = F.functional(kernels.store_k_cache_ragged)
_store_v_ragged = F.functional(kernels.store_v_cache_ragged)
_flash_attention_ragged = F.functional(kernels.flash_attention_ragged)


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


class ModelOutputs(NamedTuple):
    """What every forward returns, one row per row of the call."""

    next_token: Tensor  # int64 [L]: argmax of `logits`, the greedy choice
    logits: Tensor  # float32 [L, V]: after each token named by `logit_indices`


# Graph inputs: each dataclass below fixes its graph's argument order once, by field order.
def graph_input(dtype: DType, shape: list[str]) -> Any:
    """A field that is one graph input of this dtype and (symbolic) shape."""
    return field(metadata={"dtype": dtype, "shape": shape})


class GraphInputs:
    """Host arrays for a graph's named inputs, in the order its fields declare."""

    @classmethod
    def types(cls, device: DeviceRef) -> list[TensorType]:
        return [
            TensorType(f.metadata["dtype"], f.metadata["shape"], device=device)
            for f in fields(cls)  # type: ignore[arg-type]
        ]

    def buffers(self, device: Device) -> list[Buffer]:
        arrays = (getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]
        return [to_device(a, device) for a in arrays]


@dataclass(frozen=True)
class RaggedInputs(GraphInputs):
    """The new tokens of every row of a step, concatenated."""

    tokens: np.ndarray = graph_input(DType.int64, ["tokens"])
    positions: np.ndarray = graph_input(DType.int64, ["tokens"])
    # Row b's tokens are [row_offsets[b], row_offsets[b + 1]).
    row_offsets: np.ndarray = graph_input(DType.uint32, ["rows_plus_one"])
    # The tokens whose next-token logits are computed: each row's last, or all of a prompt
    # chunk being scored (the LM head is a fifth of a token's cost: only where needed).
    logit_indices: np.ndarray = graph_input(DType.int64, ["logit_rows"])


@dataclass(frozen=True)
class SlotInputs(RaggedInputs):
    """A ragged step on the slot cache: where each row's keys and values live."""

    slots: np.ndarray = graph_input(DType.int64, ["rows"])
    starts: np.ndarray = graph_input(DType.int64, ["rows"])  # tokens cached before this step
    # Positions [0, prefix_lens[b]) are read from slot prefix_slots[b] (a shared prefix).
    prefix_slots: np.ndarray = graph_input(DType.int64, ["rows"])
    prefix_lens: np.ndarray = graph_input(DType.int64, ["rows"])


def slot_cache_types(config: GPT2Config, dtype: DType, device: DeviceRef) -> list[BufferType]:
    """Per layer a K and a V buffer [slots, H, maxlen, D] of `dtype` (the model's, or float16
    for a model in float32), written in place."""
    cache = BufferType(dtype, ["slots", config.n_head, "maxlen", config.head_dim], device=device)
    return [cache] * (2 * config.n_layer)


class Attention(Module):
    def __init__(self, config: GPT2Config):
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        # x: [..., E] -> q, k, v: [..., H, D]; the cache layout decides how they meet.
        q, k, v = F.split(self.c_attn(x), [x.shape[-1]] * 3, axis=-1)
        heads = [*x.shape[:-1], self.n_head, self.head_dim]
        out = attend(q.reshape(heads), k.reshape(heads), v.reshape(heads))
        return self.c_proj(out.reshape(x.shape))


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

    def forward(self, x: Tensor, attend: Attend) -> Tensor:
        x = x + self.attn(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x))


class Transformer(Module):
    def __init__(self, config: GPT2Config):
        self.wte = Embedding(config.vocab_size, dim=config.n_embd)
        self.wpe = Embedding(config.n_positions, dim=config.n_embd)
        self.h = ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(Module):
    """GPT-2 with its LM head tied to `wte`; subclasses differ only in how they attend."""

    def __init__(self, config: GPT2Config):
        self.config = config
        self.transformer = Transformer(config)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.config.head_dim)

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        t = self.transformer
        return t.wte(tokens) + t.wpe(positions)

    def head(self, x: Tensor, logit_indices: Tensor) -> ModelOutputs:
        """[T, E] hidden states -> logits [L, V] after the tokens asked for, and their argmax."""
        t = self.transformer
        chosen = F.gather(x, logit_indices, axis=0)  # [L, E]
        logits = _as(t.ln_f(chosen) @ t.wte.weight.T, DType.float32)
        return ModelOutputs(F.argmax(logits, axis=-1).reshape([logits.shape[0]]), logits)


class SlotGPT2(GPT2LMHeadModel):
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        row_offsets: Tensor,
        logit_indices: Tensor,
        slots: Tensor,
        starts: Tensor,
        prefix_slots: Tensor,
        prefix_lens: Tensor,
        *caches: Tensor,
    ) -> ModelOutputs:
        x = self.embed(tokens, positions)  # [T, E]
        for i, block in enumerate(self.transformer.h):
            attend = functools.partial(
                slot_attention,
                k_cache=caches[2 * i],
                v_cache=caches[2 * i + 1],
                row_offsets=row_offsets,
                slots=slots,
                starts=starts,
                prefix_slots=prefix_slots,
                prefix_lens=prefix_lens,
            )
            x = block(x, attend)
        return self.head(x, logit_indices)


class PagedGPT2(GPT2LMHeadModel):
    def __init__(self, config: GPT2Config, kv_params: MHAKVCacheParams):
        super().__init__(config)
        self.kv_params = kv_params

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        row_offsets: Tensor,
        logit_indices: Tensor,
        *kv_inputs: Tensor,
    ) -> ModelOutputs:
        (kv,) = self.kv_params.unflatten_kv_inputs(iter(t._graph_value for t in kv_inputs))
        x = self.embed(tokens, positions)  # [T, E]
        for i, block in enumerate(self.transformer.h):
            attend = functools.partial(
                paged_attention,
                kv=kv,
                kv_params=self.kv_params,
                layer=i,
                row_offsets=row_offsets,
                scale=self.scale,
            )
            x = block(x, attend)
        return self.head(x, logit_indices)


def slot_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    k_cache: Tensor,
    v_cache: Tensor,
    row_offsets: Tensor,
    slots: Tensor,
    starts: Tensor,
    prefix_slots: Tensor,
    prefix_lens: Tensor,
) -> Tensor:
    """q, k, v [T, H, D]; caches [slots, H, maxlen, D] -> [T, H, D] (kernels/slot_attention).

    Row b's token i goes to (slots[b], :, starts[b] + i) and attends over [0, starts[b] + i],
    reading positions before prefix_lens[b] from slot prefix_slots[b].
    """
    (out,) = F.inplace_custom(
        "slot_attention",
        device=DeviceRef.CPU(),
        values=[
            q,
            k,
            v,
            k_cache.__buffervalue__(),
            v_cache.__buffervalue__(),
            row_offsets,
            slots,
            starts,
            prefix_slots,
            prefix_lens,
        ],
        out_types=[TensorType(q.dtype, q.shape, device=DeviceRef.CPU())],
    )
    return out


def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kv: Any,
    kv_params: MHAKVCacheParams,
    layer: int,
    row_offsets: Tensor,
    scale: float,
) -> Tensor:
    """q, k, v [T, H, D] of every row's new tokens -> [T, H, D], causal within each row."""
    layer_index = F.constant(layer, DType.uint32, device=DeviceRef.CPU())
    _store_k_ragged(kv, k, row_offsets, layer_index)
    _store_v_ragged(kv, v, row_offsets, layer_index)
    return _flash_attention_ragged(
        kv_params,
        q,
        row_offsets,
        kv,
        layer_index,
        mask_variant=MHAMaskVariant.CAUSAL_MASK,
        scale=scale,
    )


def to_device(array: np.ndarray, device: Device) -> Buffer:
    """A host array as a graph argument on `device` (no copy on the CPU)."""
    buffer = Buffer.from_numpy(np.ascontiguousarray(array))
    return buffer if device.is_host else buffer.to(device)


def _as(x: Tensor, dtype: DType) -> Tensor:
    return x if x.dtype == dtype else x.cast(dtype)
