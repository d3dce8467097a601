"""The KV cache behind one seam, two ways, chosen per device (as vLLM keeps one attention
backend per platform):

- `SlotCache` (CPU): per layer a K and a V buffer [slots, H, maxlen, D], allocated once; a row
  owns one slot, a contiguous slice, for its whole life. batchgen's Mojo op decodes over it,
  reading only each row's own tokens.
- `PagedCache` (GPU): MAX's page pool [pages + 1, 2, layers, page, H, D] (the last page is
  the null page unused lookup entries point at); a row holds the pages its prompt and
  `max_tokens` need, reserved when it is admitted. MAX's ragged kernels read it.

Both are sized from a memory budget and allocated once, on the device, and both keep the
prefixes rows computed (`prefix_cache.py` names them by block): the paged cache shares a
prefix's pages between rows, counting who holds each; the slot cache gives a new row the free
slot that holds its prefix, or lets it read the prefix from the slot that holds it (the Mojo
op reads a row's first positions from a second slot), which stays unreused while it has
readers. Freed room keeps its prefix until it is needed, least recently used first.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
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
from batchgen.engine.prefix_cache import BlockHash

PAGE_SIZE = 128
# A slot can start reading its own positions anywhere: small blocks leave little unshared.
SLOT_BLOCK = 16


class KVCache(Protocol):
    """Room for rows' keys and values: what the scheduler admits against."""

    kind: str  # "slots" or "paged"
    block_size: int  # tokens per block of a reusable prefix

    def fits(self, tokens: int, rows: int = 1) -> bool:
        """Whether `rows` rows of this many tokens fit an empty cache at all."""
        ...

    def holds(self, blocks: Sequence[BlockHash]) -> int:
        """How many of these leading blocks (a prompt's) the cache holds keys and values of."""
        ...

    def admit(self, row: Hashable, tokens: int, blocks: Sequence[BlockHash] = ()) -> bool:
        """Reserve room for row `row`'s `tokens` positions, its first len(blocks) blocks
        (held: see `holds`) taken from the cache; False (nothing reserved) if full."""
        ...

    def commit(self, row: Hashable, blocks: Sequence[BlockHash]) -> None:
        """The row's first len(blocks) blocks are computed: later rows may take them."""
        ...

    def release(self, row: Hashable) -> None:
        """The row is done; its room goes back, keeping its committed blocks while it can."""
        ...

    def fork(self, source: Hashable, target: Hashable, tokens: int) -> bool:
        """Give another row the first `tokens` positions of one row's keys and values
        (copied or shared); False where this cache cannot (the target then prefills them)."""
        ...

    @property
    def occupancy(self) -> float:
        """The fraction of the cache's capacity held by rows."""
        ...

    @property
    def idle(self) -> bool:
        """No row holds any of it (prefixes kept for reuse aside)."""
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
    block_size = SLOT_BLOCK

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
        self._slot_of: dict[Hashable, int] = {}
        # Free slots: those holding no prefix (a heap, the lowest first, so that few slots
        # are ever touched), and those that do (least recently released first).
        self._clean = list(range(slots))
        self._kept: OrderedDict[int, None] = OrderedDict()
        self._blocks: list[list[BlockHash]] = [[] for _ in range(slots)]  # each slot's prefix
        self._holders: dict[BlockHash, set[int]] = {}  # the slots holding each block
        # Rows reading their first tokens from another slot: (that slot, tokens); and how many
        # rows read from each slot (a slot that has readers is never given to another row).
        self._prefix_of: dict[Hashable, tuple[int, int]] = {}
        self._readers = [0] * slots
        # Host views of the buffers (the slot cache lives in host memory), for copies.
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

    def holds(self, blocks: Sequence[BlockHash]) -> int:
        if not self._arrays:
            return 0  # a slot cache off the host (none is built) copies nothing: no reuse
        count = 0
        while count < len(blocks) and self._holders.get(blocks[count]):
            count += 1
        return count

    def admit(self, row: Hashable, tokens: int, blocks: Sequence[BlockHash] = ()) -> bool:
        if tokens > self.maxlen:
            return False
        holders = self._holders[blocks[-1]] if blocks else set()
        kept = [slot for slot in holders if slot in self._kept and not self._readers[slot]]
        if kept:  # a free slot holds the prefix: the row takes it
            slot = min(kept, key=lambda s: len(self._blocks[s]))  # the one that loses least
            del self._kept[slot]
            self._forget(slot, keep=len(blocks))
        else:
            taken = self._take_free()
            if taken is None:
                return False
            slot = taken
            if blocks:  # read from the slot that holds it, which runs or has readers
                holder = next(iter(holders))
                self._share(row, holder, len(blocks) * self.block_size)
        self._slot_of[row] = slot
        return True

    def commit(self, row: Hashable, blocks: Sequence[BlockHash]) -> None:
        if row in self._prefix_of:
            return  # its slot lacks the prefix it reads elsewhere: it can serve no other row
        slot = self._slot_of[row]
        self._hold(slot, blocks[len(self._blocks[slot]) :])

    def release(self, row: Hashable) -> None:
        slot = self._slot_of.pop(row)
        if row in self._prefix_of:
            holder, _ = self._prefix_of.pop(row)
            self._readers[holder] -= 1
        if self._blocks[slot]:
            self._kept[slot] = None
        else:
            heapq.heappush(self._clean, slot)

    def fork(self, source: Hashable, target: Hashable, tokens: int) -> bool:
        if not self._arrays:
            return False
        # What the source reads from another slot, the target reads there too; the rest
        # (the source's own positions) is copied.
        holder, shared = self.prefix(source)
        if shared:
            self._share(target, holder, shared)
        self._copy(self._slot_of[source], self._slot_of[target], shared, tokens)
        return True

    def slot(self, row: Hashable) -> int:
        return self._slot_of[row]

    def prefix(self, row: Hashable) -> tuple[int, int]:
        """The slot the row reads its first positions from, and how many (0: none)."""
        return self._prefix_of.get(row, (self._slot_of[row], 0))

    @property
    def occupancy(self) -> float:
        return len(self._slot_of) / self.slots

    @property
    def idle(self) -> bool:
        return not self._slot_of

    @property
    def nbytes(self) -> int:
        return sum(b.num_elements * b.element_size for b in self.buffers)

    def _take_free(self) -> int | None:
        """A free slot for a row: one holding no prefix, else the least recently released
        that no row reads from; None if there is none."""
        if self._clean:
            return heapq.heappop(self._clean)
        for slot in self._kept:
            if not self._readers[slot]:
                del self._kept[slot]
                self._forget(slot, keep=0)
                return slot
        return None

    def _share(self, row: Hashable, holder: int, tokens: int) -> None:
        self._prefix_of[row] = (holder, tokens)
        self._readers[holder] += 1

    def _copy(self, source: int, target: int, start: int, stop: int) -> None:
        for array in self._arrays:
            array[target, :, start:stop] = array[source, :, start:stop]

    def _hold(self, slot: int, blocks: Sequence[BlockHash]) -> None:
        """The slot now also holds these blocks, after those it holds."""
        self._blocks[slot].extend(blocks)
        for block in blocks:
            self._holders.setdefault(block, set()).add(slot)

    def _forget(self, slot: int, keep: int) -> None:
        """The slot's blocks past the first `keep` are about to be overwritten."""
        for block in self._blocks[slot][keep:]:
            holders = self._holders[block]
            holders.discard(slot)
            if not holders:
                del self._holders[block]
        del self._blocks[slot][keep:]


class PagedCache:
    """MAX's paged KV cache: a page pool and each row's pages, as its ragged kernels read them.

    A page of a computed prefix is named by its block's hash and may be in several rows'
    lookup tables at once (no row writes to it: all of it lies before what they compute).
    `_refs` counts the rows holding each page; a named page no row holds is kept until the
    pool runs out of unnamed ones, least recently released first.
    """

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
        self.page_size = self.block_size = page_size
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
        self._free = list(range(pages))  # held by no row, named by no block
        self._kept: OrderedDict[int, None] = OrderedDict()  # held by no row, named
        self._refs = [0] * pages
        self._page_of_block: dict[BlockHash, int] = {}
        self._block_of_page: dict[int, BlockHash] = {}
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

    def holds(self, blocks: Sequence[BlockHash]) -> int:
        count = 0
        while count < len(blocks) and blocks[count] in self._page_of_block:
            count += 1
        return count

    def admit(self, row: Hashable, tokens: int, blocks: Sequence[BlockHash] = ()) -> bool:
        shared = [self._page_of_block[block] for block in blocks]
        need = self._pages_for(tokens) - len(shared)
        revived = sum(1 for page in shared if self._refs[page] == 0)
        if need > len(self._free) + len(self._kept) - revived:
            return False
        for page in shared:
            self._kept.pop(page, None)
            self._refs[page] += 1
        self._pages_of[row] = shared + [self._take_free() for _ in range(need)]
        return True

    def commit(self, row: Hashable, blocks: Sequence[BlockHash]) -> None:
        for block, page in zip(blocks, self._pages_of[row], strict=False):
            # A block two rows computed at once keeps the first's page; the other's is freed.
            if page not in self._block_of_page and block not in self._page_of_block:
                self._block_of_page[page] = block
                self._page_of_block[block] = page

    def release(self, row: Hashable) -> None:
        # Last pages first: a prefix's tail is given up before its start.
        for page in reversed(self._pages_of.pop(row)):
            self._drop(page)

    def fork(self, source: Hashable, target: Hashable, tokens: int) -> bool:
        # The full pages are shared; the last, partial one is copied on the device (the
        # target writes into it). The kernels mask what lies past a row's length.
        full, partial = divmod(tokens, self.page_size)
        theirs, mine = self._pages_of[source], self._pages_of[target]
        for i in range(full):
            self._drop(mine[i])
            mine[i] = theirs[i]
            self._refs[mine[i]] += 1
        if partial:
            rest = (slice(None),) * (self.blocks.rank - 1)  # Buffer views take no Ellipsis
            src, dst = theirs[full], mine[full]
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
        return 1.0 - (len(self._free) + len(self._kept)) / self.pages

    @property
    def idle(self) -> bool:
        return not self._pages_of

    @property
    def nbytes(self) -> int:
        return self.blocks.num_elements * self.blocks.element_size

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _take_free(self) -> int:
        """An unnamed page, else the least recently released named one (its name dropped)."""
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._kept.popitem(last=False)
            del self._page_of_block[self._block_of_page.pop(page)]
        self._refs[page] = 1
        return page

    def _drop(self, page: int) -> None:
        """One row fewer holds the page."""
        self._refs[page] -= 1
        if self._refs[page] == 0:
            if page in self._block_of_page:
                self._kept[page] = None
            else:
                self._free.append(page)
