"""Where vLLM's GPU attention backends keep each key and value.

FLASH_ATTN, FLASHINFER, TRITON_ATTN and FLEX_ATTENTION share one logical per-layer
tensor, ``[kernel blocks, kv heads, kernel block size, head_size + head_size_v]``
(keys first in the last dimension); the physical order (``KVCacheLayout``: NHD,
HND, layer- or block-outermost) lives only in the view's strides, which vLLM's
allocator sets. A scheduler block may span several consecutive kernel blocks
(``block_size / kernel_block_size`` of them) where a backend supports only
smaller kernel blocks. Reading and writing through the view honours any strides,
so one class covers every backend and layout.
"""

from __future__ import annotations

import torch


class KernelBlockKV:
    """Read and write the keys or values of whole slots in one layer's GPU cache.

    The same interface as :class:`~vllm_sink.worker.cpu_attn_layout.PagedKV`:
    ``get(blocks, slots)`` gives ``[len(blocks), heads, slots, head_size]`` for
    scheduler block ids ``blocks``.
    """

    def __init__(self, part: torch.Tensor, block_size: int) -> None:
        """``part``: ``[kernel blocks, heads, kernel block size, head_size]``, any strides."""
        kernel_blocks, _, kernel_block_size, _ = part.shape
        per_block, rest = divmod(block_size, kernel_block_size)
        if rest or kernel_blocks % per_block:
            raise ValueError(
                f"a scheduler block of {block_size} tokens is not a whole number of "
                f"{kernel_block_size}-token kernel blocks ({kernel_blocks} of them)"
            )
        self.dtype, self.device = part.dtype, part.device
        self.block_size = block_size
        self.kernel_block_size = kernel_block_size
        # [scheduler blocks, kernel blocks per scheduler block, heads, kernel slots, dim]
        self.view = part.unflatten(0, (kernel_blocks // per_block, per_block))

    @classmethod
    def keys_of(cls, kv_cache: torch.Tensor, head_size: int, block_size: int) -> KernelBlockKV:
        return cls(kv_cache[..., :head_size], block_size)

    @classmethod
    def values_of(cls, kv_cache: torch.Tensor, head_size: int, block_size: int) -> KernelBlockKV:
        return cls(kv_cache[..., head_size:], block_size)

    def _where(self, blocks: torch.Tensor, slots: slice) -> tuple[torch.Tensor, ...]:
        slot = torch.arange(self.block_size, device=blocks.device)[slots]
        kernel_block, kernel_slot = slot // self.kernel_block_size, slot % self.kernel_block_size
        return blocks.view(-1, 1), kernel_block.view(1, -1), slice(None), kernel_slot.view(1, -1)

    def get(self, blocks: torch.Tensor, slots: slice = slice(None)) -> torch.Tensor:
        """A copy, ``[len(blocks), heads, slots, head_size]``."""
        return self.view[self._where(blocks, slots)].transpose(1, 2)

    def set(self, blocks: torch.Tensor, slots: slice, data: torch.Tensor) -> None:
        self.view[self._where(blocks, slots)] = data.transpose(1, 2).to(self.dtype)
