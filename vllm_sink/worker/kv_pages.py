"""Whole KV blocks, as raw pages: copied, read out and written back in any backend's layout.

A block id indexes the same block in every KV cache tensor, and a tensor that
layers share (a hybrid model's groups) holds each block once. Seen as
``[num_blocks, bytes]`` per distinct storage, a block is one row in each: the
whole of its keys and values, however the backend packs them. vLLM copies
blocks for its own copy-on-write the same way
(``vllm.v1.worker.utils.copy_kv_cache_blocks_inplace``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class KVPages:
    """Every KV cache tensor as ``[num_blocks, page bytes]`` views, each block's bytes once."""

    def __init__(self, kv_caches: Iterable[torch.Tensor], num_blocks: int) -> None:
        self.pages: list[torch.Tensor] = []
        storages_seen: set[tuple[torch.device, int]] = set()
        tensors_seen: set[tuple[torch.device, int]] = set()
        for cache in kv_caches:
            storage = cache.untyped_storage()
            whole_storage = (cache.device, storage.data_ptr())
            tensor = (cache.device, cache.data_ptr())
            if whole_storage in storages_seen or tensor in tensors_seen:
                continue
            if cache.shape[0] % num_blocks:
                raise RuntimeError(
                    f"vllm-sink: a KV cache tensor of shape {tuple(cache.shape)} does not "
                    f"start with its {num_blocks} blocks; snapshots cannot copy its blocks: "
                    "set --streaming-snapshots 0"
                )
            row_bytes = cache.stride(0) * cache.element_size() * (cache.shape[0] // num_blocks)
            if storage.nbytes() == num_blocks * row_bytes:
                # Blocks outermost over the whole storage (layers sharing it included).
                storages_seen.add(whole_storage)
                raw = torch.empty(0, dtype=torch.uint8, device=cache.device)
                raw.set_(storage)
                self.pages.append(raw.view(num_blocks, -1))
            else:
                # One layer's blocks in a larger storage (vLLM's layer-first layouts).
                tensors_seen.add(tensor)
                self.pages.append(cache.view(num_blocks, -1).view(torch.uint8))
        if not self.pages:
            raise RuntimeError("vllm-sink: no KV cache tensors")
        self.device = self.pages[0].device

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes over every layer."""
        return sum(page.shape[1] for page in self.pages)

    def copy(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Block ``dst[i]`` becomes a copy of block ``src[i]``.

        Row by row: one memory copy each (indexing with a tensor of ids would
        gather into a temporary first, ten times slower on a CPU).
        """
        for page in self.pages:
            for s, d in zip(src, dst, strict=True):
                page[d].copy_(page[s])

    def read(self, blocks: Sequence[int]) -> list[torch.Tensor]:
        """A copy of the blocks in host memory, one ``[len(blocks), page bytes]`` per storage.

        Pinned on a GPU machine, so that restoring it is a plain DMA.
        """
        pin = self.device.type == "cuda"
        copies = []
        for page in self.pages:
            host = torch.empty((len(blocks), page.shape[1]), dtype=torch.uint8, pin_memory=pin)
            for i, block in enumerate(blocks):
                host[i].copy_(page[block])
            copies.append(host)
        return copies

    def write(self, blocks: Sequence[int], data: Sequence[torch.Tensor]) -> None:
        """Blocks ``blocks`` get the pages :meth:`read` returned (in the same order)."""
        for page, saved in zip(self.pages, data, strict=True):
            if saved.shape != (len(blocks), page.shape[1]):
                raise ValueError(f"vllm-sink: pages of shape {tuple(saved.shape)} for "
                                 f"{len(blocks)} blocks of {page.shape[1]} bytes")  # fmt: skip
            for i, block in enumerate(blocks):
                page[block].copy_(saved[i], non_blocking=True)
