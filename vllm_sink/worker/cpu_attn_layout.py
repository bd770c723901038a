"""Where CPU_ATTN keeps each key and value inside a KV block.

A CPU_ATTN cache tensor is ``[num_blocks, num_kv_heads, block_size, 2 * head]``,
but the kernel packs the page per ISA (e.g. the ``vec`` ISA stores keys
dimension-major). Rather than hard-code one packing, we write known values with
vLLM's own cache-write op once at start-up and read back where they landed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_sink.worker.vllm_runner import write_cpu_attn_cache


@dataclass(frozen=True)
class PageLayout:
    """Flat offsets, within one (block, head) page, of each token's K and V."""

    key_offsets: torch.Tensor  # [block_size, head_size], int64
    value_offsets: torch.Tensor  # [block_size, head_size], int64
    page_elems: int  # elements in one (block, head) page

    @classmethod
    def probe_cpu_attn(
        cls, block_size: int, head_size: int, dtype: torch.dtype, isa: str
    ) -> PageLayout:
        page_elems = 2 * block_size * head_size
        token = torch.arange(block_size).view(block_size, 1, 1).expand(-1, 1, head_size)
        dim = torch.arange(head_size).view(1, 1, head_size).expand(block_size, 1, -1)
        # Small integers stay exact in bf16/fp16: read token and dim in base-16 digits.
        digits = [token % 16, token // 16, dim % 16, dim // 16]
        readings = []
        for digit in digits:
            kv = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
            key_cache, value_cache = kv.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
            write_cpu_attn_cache(
                (digit + 1).to(dtype),
                (-(digit + 1)).to(dtype),
                key_cache,
                value_cache,
                torch.arange(block_size, dtype=torch.int64),
                isa,
            )
            readings.append(kv.view(page_elems).to(torch.float32))

        def offsets(sign: int) -> torch.Tensor:
            values = [(sign * r).round().long() - 1 for r in readings]
            written = values[0] >= 0
            t = values[0] + 16 * values[1]
            d = values[2] + 16 * values[3]
            table = torch.full((block_size, head_size), -1, dtype=torch.int64)
            where = torch.nonzero(written).squeeze(-1)
            table[t[where], d[where]] = where
            if (table < 0).any() or int(written.sum()) != block_size * head_size:
                raise RuntimeError(
                    f"could not map the CPU_ATTN KV layout (isa={isa}, dtype={dtype}, "
                    f"block_size={block_size}, head_size={head_size}); vllm-sink "
                    "cannot re-rotate keys in this cache"
                )
            return table

        return cls(key_offsets=offsets(1), value_offsets=offsets(-1), page_elems=page_elems)


class PagedKV:
    """Read and write the keys or values of whole slots in one layer's cache.

    Where the probed packing is a plain strided layout (as for the ``vec`` ISA)
    this is a zero-copy ``[blocks, heads, slots, head_size]`` view; otherwise it
    falls back to gathering through the probed offsets.
    """

    def __init__(self, kv_cache: torch.Tensor, offsets: torch.Tensor, page_elems: int) -> None:
        num_blocks, num_heads = kv_cache.shape[:2]
        block_size, head_size = offsets.shape
        self.dtype, self.device = kv_cache.dtype, kv_cache.device
        base = int(offsets[0, 0])
        token_stride = int(offsets[1, 0]) - base if block_size > 1 else 0
        dim_stride = int(offsets[0, 1]) - base if head_size > 1 else 0
        tokens = torch.arange(block_size).view(-1, 1)
        dims = torch.arange(head_size).view(1, -1)
        if torch.equal(offsets, base + tokens * token_stride + dims * dim_stride):
            self.view: torch.Tensor | None = torch.as_strided(
                kv_cache,
                size=(num_blocks, num_heads, block_size, head_size),
                stride=(num_heads * page_elems, page_elems, token_stride, dim_stride),
                storage_offset=kv_cache.storage_offset() + base,
            )
        else:
            self.view = None
            self.flat = kv_cache.view(-1)
            heads = torch.arange(num_heads, dtype=torch.int64).view(1, -1, 1, 1) * page_elems
            self._offsets = offsets
            self._block_stride = num_heads * page_elems
            self._head_base = heads

    @classmethod
    def keys_of(cls, kv_cache: torch.Tensor, layout: PageLayout) -> PagedKV:
        return cls(kv_cache, layout.key_offsets, layout.page_elems)

    @classmethod
    def values_of(cls, kv_cache: torch.Tensor, layout: PageLayout) -> PagedKV:
        return cls(kv_cache, layout.value_offsets, layout.page_elems)

    def _index(self, blocks: torch.Tensor, slots: slice) -> torch.Tensor:
        offsets = self._offsets[slots].unsqueeze(0).unsqueeze(0)
        return blocks.view(-1, 1, 1, 1) * self._block_stride + self._head_base + offsets

    def get(self, blocks: torch.Tensor, slots: slice = slice(None)) -> torch.Tensor:
        """A copy, ``[len(blocks), heads, slots, head_size]``."""
        if self.view is not None:
            return self.view[blocks, :, slots]
        return self.flat[self._index(blocks, slots)]

    def set(self, blocks: torch.Tensor, slots: slice, data: torch.Tensor) -> None:
        if self.view is not None:
            self.view[blocks, :, slots] = data.to(self.dtype)
        else:
            self.flat[self._index(blocks, slots)] = data.to(self.dtype)
