"""The KV cache behind one seam, two ways, chosen per device (as vLLM keeps one attention
backend per platform):

- `SlotCache` (CPU): per layer a K and a V buffer [slots, H, maxlen, D], allocated once; a row
  owns one slot, a contiguous slice, for its whole life. batchgen's Mojo op decodes over it,
  reading only each row's own tokens.
- `PagedCache` (GPU): MAX's page pool [pages + 1, 2, layers, page, H, D] (the last page is
  the null page unused lookup entries point at); a row holds the pages its prompt and
  `max_tokens` need, reserved when it is admitted. MAX's ragged kernels read it.

Both are sized from a memory budget and allocated once, on the device.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from typing import Protocol

import numpy as np
from max import tree
from max.driver import Buffer, Device
from max.dtype import DType
from max.graph import DeviceRef
from max.nn.kv_cache import KVCacheInputsPerDevice, MHAKVCacheParams
from max.nn.kv_cache.utils import padded_lut_cols

from batchgen.engine.model import GPT2Config, to_device

PAGE_SIZE = 128


class KVCache(Protocol):
    """Room for rows' keys and values: what the scheduler admits against."""

    kind: str  # "slots" or "paged"

    def fits(self, tokens: int, rows: int = 1) -> bool:
        """Whether `rows` rows of this many tokens fit an empty cache at all."""
        ...

    def admit(self, row: Hashable, tokens: int) -> bool:
        """Reserve room for row `row`'s `tokens` positions; False (nothing reserved) if full."""
        ...

    def release(self, row: Hashable) -> None: ...

    def fork(self, source: Hashable, target: Hashable, tokens: int) -> bool:
        """Copy the first `tokens` positions of one row's keys and values to another's;
        False where this cache cannot (the target then prefills them itself)."""
        ...

    @property
    def occupancy(self) -> float:
        """The fraction of the cache's capacity held by rows."""
        ...

    @property
    def idle(self) -> bool:
        """No row holds any of it."""
        ...

    @property
    def nbytes(self) -> int:
        """The memory it holds on its device."""
        ...


def bytes_per_token(config: GPT2Config, dtype: DType) -> int:
    """One position's keys and values across all layers."""
    return 2 * config.n_layer * config.n_embd * dtype.size_in_bytes


class SlotCache:
    """One slot [H, maxlen, D] per row in every layer's K and V buffer."""

    kind = "slots"

    def __init__(self, config: GPT2Config, dtype: DType, device: Device, slots: int):
        if slots < 1:
            raise ValueError("the KV cache budget holds no slot: raise --kv-cache-gb")
        self.maxlen = config.n_positions
        self.slots = slots
        self.dtype = dtype
        shape = [slots, config.n_head, self.maxlen, config.head_dim]
        # Not zeroed: a slot's positions are always written before they are read (the kernel
        # reads only [0, pos]), so memory is touched only as rows use it. Zeroing would
        # cost seconds at start-up and commit the whole budget at once.
        self.buffers = [Buffer(dtype, shape, device) for _ in range(2 * config.n_layer)]
        self._free = list(range(slots))  # a heap: the lowest free slot goes first
        self._slot_of: dict[Hashable, int] = {}
        # Host views of the buffers (the slot cache lives in host memory), for forks.
        self._arrays = [b.to_numpy() for b in self.buffers] if device.is_host else []

    @classmethod
    def within(
        cls, budget_bytes: float, rows: int, config: GPT2Config, dtype: DType, device: Device
    ) -> SlotCache:
        """As many slots as the budget holds, but no more than `rows` (no more can run)."""
        per_slot = bytes_per_token(config, dtype) * config.n_positions
        return cls(config, dtype, device, min(int(budget_bytes // per_slot), rows))

    def fits(self, tokens: int, rows: int = 1) -> bool:
        return tokens <= self.maxlen and rows <= self.slots

    def admit(self, row: Hashable, tokens: int) -> bool:
        if not self._free or tokens > self.maxlen:
            return False
        self._slot_of[row] = heapq.heappop(self._free)
        return True

    def release(self, row: Hashable) -> None:
        heapq.heappush(self._free, self._slot_of.pop(row))

    def fork(self, source: Hashable, target: Hashable, tokens: int) -> bool:
        if not self._arrays:
            return False
        src, dst = self._slot_of[source], self._slot_of[target]
        for array in self._arrays:
            array[dst, :, :tokens] = array[src, :, :tokens]
        return True

    def slot(self, row: Hashable) -> int:
        return self._slot_of[row]

    @property
    def occupancy(self) -> float:
        return len(self._slot_of) / self.slots

    @property
    def idle(self) -> bool:
        return not self._slot_of and len(self._free) == self.slots

    @property
    def nbytes(self) -> int:
        return sum(b.num_elements * b.element_size for b in self.buffers)


class PagedCache:
    """MAX's paged KV cache: a page pool and each row's pages, as its ragged kernels read them."""

    kind = "paged"

    def __init__(
        self,
        config: GPT2Config,
        dtype: DType,
        device: Device,
        pages: int,
        page_size: int = PAGE_SIZE,
    ):
        if pages * page_size < config.n_positions:
            raise ValueError(
                "the KV cache budget does not hold one full-length row: raise --kv-cache-gb"
            )
        self.device = device
        self.page_size = page_size
        self.pages = pages
        self.params = MHAKVCacheParams(
            dtype=dtype,
            n_kv_heads=config.n_head,
            head_dim=config.head_dim,
            num_layers=config.n_layer,
            page_size=page_size,
            devices=[DeviceRef.from_device(device)],
        )
        # Zeroed: the kernels read whole pages, masking positions past a row's length, and a
        # zero weight times garbage could be NaN.
        self.blocks = Buffer.zeros([pages + 1, *self.params.shape_per_block], dtype, device)
        self._free = list(range(pages))
        self._pages_of: dict[Hashable, list[int]] = {}

    @classmethod
    def within(
        cls, budget_bytes: float, rows: int, config: GPT2Config, dtype: DType, device: Device
    ) -> PagedCache:
        """As many pages as the budget holds (the null page included), but no more than
        `rows` rows of the full context can use."""
        per_page = bytes_per_token(config, dtype) * PAGE_SIZE
        full_rows = rows * -(-config.n_positions // PAGE_SIZE)
        return cls(config, dtype, device, min(int(budget_bytes // per_page) - 1, full_rows))

    def fits(self, tokens: int, rows: int = 1) -> bool:
        return rows * self._pages_for(tokens) <= self.pages

    def admit(self, row: Hashable, tokens: int) -> bool:
        need = self._pages_for(tokens)
        if need > len(self._free):
            return False
        self._pages_of[row] = [self._free.pop() for _ in range(need)]
        return True

    def release(self, row: Hashable) -> None:
        self._free.extend(self._pages_of.pop(row))

    def fork(self, source: Hashable, target: Hashable, tokens: int) -> bool:
        # Whole pages, copied on the device; the kernels mask what lies past a row's length.
        rest = (slice(None),) * (self.blocks.rank - 1)  # Buffer views take no Ellipsis
        count = self._pages_for(tokens)
        for src, dst in zip(self._pages_of[source][:count], self._pages_of[target], strict=False):
            page = self.blocks[(slice(src, src + 1), *rest)]
            self.blocks[(slice(dst, dst + 1), *rest)].inplace_copy_from(page)
        return True

    def kv_inputs(
        self, rows: Sequence[Hashable], cached: Sequence[int], new: Sequence[int]
    ) -> list[Buffer]:
        """The paged cache's graph inputs for a step: row i has `cached[i]` tokens in the
        cache and `new[i]` arriving (MHAKVCacheParams.flattened_kv_inputs order)."""
        totals = [c + n for c, n in zip(cached, new, strict=True)]
        columns = padded_lut_cols(max(self._pages_for(t) for t in totals))
        lookup = np.full((len(rows), columns), self.pages, np.uint32)  # the null page
        for i, row in enumerate(rows):
            pages = self._pages_of[row][:columns]  # reserved ahead: more than this step needs
            lookup[i, : len(pages)] = pages
        max_new, max_total = max(new), max(totals)
        key = self.params.resolve_attn_key(len(rows), max_new, max_total)
        dispatch = np.zeros(key.dispatch_metadata_spec().shape, np.int64)
        key.pack_into(dispatch, max_total)
        values = KVCacheInputsPerDevice(
            kv_blocks=self.blocks,
            cache_lengths=to_device(np.asarray(cached, np.uint32), self.device),
            lookup_table=to_device(lookup, self.device),
            max_prompt_length=Buffer.from_numpy(np.array([max_new], np.uint32)),
            max_cache_length=Buffer.from_numpy(np.array([max_total], np.uint32)),
            page_stride=Buffer.from_numpy(np.array([-1], np.int64)),  # pages are packed
            attention_dispatch_metadata=Buffer.from_numpy(dispatch),
        )
        return list(tree.leaves(values))

    @property
    def occupancy(self) -> float:
        return 1.0 - len(self._free) / self.pages

    @property
    def idle(self) -> bool:
        return not self._pages_of and len(self._free) == self.pages

    @property
    def nbytes(self) -> int:
        return self.blocks.num_elements * self.blocks.element_size

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)
