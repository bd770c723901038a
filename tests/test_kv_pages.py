"""Whole-block copies, reads and writes over vLLM's KV cache layouts (no engine)."""

from __future__ import annotations

import pytest
import torch

from vllm_sink.worker.kv_pages import KVPages

NUM_BLOCKS = 12


def layer_first(layers: int) -> list[torch.Tensor]:
    """CPU_ATTN's layout: one allocation, each layer's blocks a contiguous region."""
    raw = torch.randn(layers, NUM_BLOCKS, 2, 8, 16)
    return list(raw.unbind(0))


def blocks_first(layers: int) -> list[torch.Tensor]:
    """One allocation whose rows are blocks, every layer's page inside each (shared)."""
    raw = torch.randn(NUM_BLOCKS, layers, 2, 8, 16)
    return [raw[:, i] for i in range(layers)]


@pytest.mark.parametrize("make", [layer_first, blocks_first])
def test_blocks_are_copied_read_and_written_whole_in_every_layer(make):
    caches = make(3)
    before = [c.clone() for c in caches]
    pages = KVPages(caches, NUM_BLOCKS)
    pages.copy([1, 4], [7, 2])
    for cache, old in zip(caches, before):
        assert torch.equal(cache[7], old[1]) and torch.equal(cache[2], old[4])
        untouched = [b for b in range(NUM_BLOCKS) if b not in (7, 2)]
        assert torch.equal(cache[untouched], old[untouched])
    saved = pages.read([7, 2])
    assert sum(t.nbytes for t in saved) == 2 * pages.bytes_per_block == 2 * 3 * before[0][0].nbytes
    for cache in caches:
        cache[[5, 6]] = 0
    pages.write([5, 6], saved)
    for cache, old in zip(caches, before):
        assert torch.equal(cache[5], old[1]) and torch.equal(cache[6], old[4])


def test_a_cache_whose_blocks_are_not_outermost_is_refused():
    keys_then_values = torch.zeros(2, NUM_BLOCKS, 8, 16)
    with pytest.raises(RuntimeError, match="streaming-snapshots 0"):
        KVPages([keys_then_values], NUM_BLOCKS)
