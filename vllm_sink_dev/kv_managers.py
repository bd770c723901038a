"""The scheduler's streaming KV managers on vLLM's real BlockPool, without an engine."""

from __future__ import annotations

import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.scheduler.kv_cache import (
    StreamingSinkManager,
    StreamingSinkSpec,
    StreamingSlidingManager,
    StreamingSlidingSpec,
)


def make_manager(
    policy: SinkWindowPolicy, num_blocks: int
) -> tuple[StreamingSinkManager, BlockPool]:
    base = FullAttentionSpec(
        block_size=policy.block_size, num_kv_heads=2, head_size=64, dtype=torch.float32
    )
    spec = StreamingSinkSpec.from_attention(base, policy)
    pool = BlockPool(num_blocks, enable_caching=False, hash_block_size=policy.block_size)
    manager = StreamingSinkManager(
        spec,
        block_pool=pool,
        enable_caching=False,
        kv_cache_group_id=0,
        scheduler_block_size=policy.block_size,
    )
    return manager, pool


def make_sliding_manager(
    policy: SinkWindowPolicy, sliding_window: int, pool: BlockPool, group: int
) -> StreamingSlidingManager:
    """A sliding-window group's manager, sharing ``pool`` with another group."""
    base = SlidingWindowSpec(
        block_size=policy.block_size,
        num_kv_heads=2,
        head_size=64,
        dtype=torch.float32,
        sliding_window=sliding_window,
    )
    return StreamingSlidingManager(
        StreamingSlidingSpec.from_attention(base, policy),
        block_pool=pool,
        enable_caching=False,
        kv_cache_group_id=group,
        scheduler_block_size=policy.block_size,
    )


def step(manager: StreamingSinkManager, req: str, computed: int, new: int) -> None:
    """What KVCacheManager.allocate_slots does for a running request."""
    manager.remove_skipped_blocks(req, computed)
    need = manager.get_num_blocks_to_allocate(
        req, computed + new, [], computed, computed, computed + new
    )
    assert need <= manager.block_pool.get_num_free_blocks()
    manager.allocate_new_blocks(req, computed + new, computed + new)


def owned(manager: StreamingSinkManager, req: str) -> list[int]:
    return [b.block_id for b in manager.req_to_blocks[req] if not b.is_null]
