"""How one scheduled step runs on each KV cache: the compiled graph and its inputs.

A step is one ragged call: the decode rows' last tokens and the prompt chunks, concatenated.
`SlotRunner` adds each row's slot and start (`SlotGPT2`, CPU); `PagedRunner` adds MAX's paged
cache inputs (`PagedGPT2`, GPU). Each compiles once, for any number of rows and any lengths,
and only reads the row state: the engine owns it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from max.driver import Buffer, Device
from max.dtype import DType
from max.experimental import functional as F
from max.experimental.nn import Module
from max.experimental.tensor import default_device, default_dtype
from max.graph import DeviceRef

from batchgen.engine.kernels import built_package
from batchgen.engine.kv_cache import PagedCache, SlotCache
from batchgen.engine.model import (
    GPT2Config,
    ModelOutputs,
    PagedGPT2,
    RaggedInputs,
    SlotGPT2,
    SlotInputs,
    slot_cache_types,
)
from batchgen.engine.scheduler import Row, StepPlan


@dataclass(frozen=True)
class Layout:
    """What each output row of a step is for: rows[i] gets its next token from output i (None:
    a prompt chunk that does not end its prompt); `scored` are (output, row, position) whose
    logits are those of prompt[position + 1], for a prompt being scored."""

    rows: list[Row | None]
    scored: list[tuple[int, Row, int]]


@dataclass(frozen=True)
class Emitted:
    """A step's outputs and what each output row is for."""

    layout: Layout
    outputs: ModelOutputs

    @property
    def rows(self) -> list[Row | None]:
        return self.layout.rows


class Runner(Protocol):
    def inputs(self, plan: StepPlan) -> list[Buffer]:
        """The graph's arguments for this step, on the device."""
        ...

    def run(self, plan: StepPlan) -> Emitted: ...


class SlotRunner:
    def __init__(
        self,
        config: GPT2Config,
        weights: Mapping[str, Any],
        dtype: DType,
        device: Device,
        cache: SlotCache,
    ):
        self.device = device
        self.cache = cache
        kernel = built_package()
        model = declared(lambda: SlotGPT2(config), dtype, device)
        where = DeviceRef.from_device(device)
        self.graph = model.compile(
            *SlotInputs.types(where),
            *slot_cache_types(config, cache.dtype, where),
            weights=weights,
            custom_extensions=[kernel],
        )

    def inputs(self, plan: StepPlan) -> list[Buffer]:
        return self._buffers(*ragged_step(plan)[:2])

    def run(self, plan: StepPlan) -> Emitted:
        rows, ragged, layout = ragged_step(plan)
        return Emitted(layout, ModelOutputs(*self.graph(*self._buffers(rows, ragged))))

    def _buffers(self, rows: list[Row], ragged: RaggedInputs) -> list[Buffer]:
        prefixes = [self.cache.prefix(r.key) for r in rows]
        inputs = SlotInputs(
            ragged.tokens,
            ragged.positions,
            ragged.row_offsets,
            ragged.logit_indices,
            slots=np.array([self.cache.slot(r.key) for r in rows], np.int64),
            starts=np.array([r.computed for r in rows], np.int64),
            prefix_slots=np.array([prefix[0] for prefix in prefixes], np.int64),
            prefix_lens=np.array([prefix[1] for prefix in prefixes], np.int64),
        )
        return [*inputs.buffers(self.device), *self.cache.buffers]


class PagedRunner:
    def __init__(
        self,
        config: GPT2Config,
        weights: Mapping[str, Any],
        dtype: DType,
        device: Device,
        cache: PagedCache,
    ):
        self.device = device
        self.cache = cache
        model = declared(lambda: PagedGPT2(config, cache.params), dtype, device)
        where = DeviceRef.from_device(device)
        self.graph = model.compile(
            *RaggedInputs.types(where), *cache.params.flattened_kv_inputs(), weights=weights
        )

    def inputs(self, plan: StepPlan) -> list[Buffer]:
        return self._buffers(*ragged_step(plan)[:2])

    def run(self, plan: StepPlan) -> Emitted:
        rows, ragged, layout = ragged_step(plan)
        return Emitted(layout, ModelOutputs(*self.graph(*self._buffers(rows, ragged))))

    def _buffers(self, rows: list[Row], ragged: RaggedInputs) -> list[Buffer]:
        new = np.diff(ragged.row_offsets).tolist()
        kv = self.cache.kv_inputs([r.key for r in rows], [r.computed for r in rows], new)
        return [*ragged.buffers(self.device), *kv]


def declared(build: Callable[[], Module], dtype: DType, device: Device) -> Module:
    """The model's modules, lazily: parameters declared, never initialised (`compile`'s
    `weights=` supplies them). dtype and device are explicit: MAX's defaults differ by device."""
    with F.lazy(), default_dtype(dtype), default_device(device):
        return build()


def ragged_step(plan: StepPlan) -> tuple[list[Row], RaggedInputs, Layout]:
    """The step's rows (decode rows first), their new tokens concatenated, and what each
    output row is for."""
    rows = [*plan.decode, *(row for row, _ in plan.prefill)]
    pieces = [[row.generated[-1]] for row in plan.decode]
    pieces += [row.prompt[row.computed : row.computed + n] for row, n in plan.prefill]
    counts = [len(p) for p in pieces]
    positions = [np.arange(r.computed, r.computed + n) for r, n in zip(rows, counts, strict=True)]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices: list[int] = []
    layout = Layout([], [])
    for row, start, count in zip(rows, offsets[:-1].tolist(), counts, strict=True):
        first = row.computed  # the position of the row's first new token
        ends_prompt = first + count >= len(row.prompt)
        scoring = row.prefilling and row.params.prompt_logprobs is not None and row.choice == 0
        for position in range(first, first + count) if scoring else [first + count - 1]:
            if scoring and position < len(row.prompt) - 1:
                layout.scored.append((len(indices), row, position))
                layout.rows.append(None)
            else:
                layout.rows.append(row if ends_prompt else None)
            indices.append(start + position - first)
    ragged = RaggedInputs(
        tokens=np.concatenate([np.asarray(p, np.int64) for p in pieces]),
        positions=np.concatenate(positions).astype(np.int64),
        row_offsets=offsets.astype(np.uint32),
        logit_indices=np.asarray(indices, np.int64),
    )
    return rows, ragged, layout
