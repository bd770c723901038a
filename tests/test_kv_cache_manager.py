"""The scheduler-side manager, driven with vLLM's real BlockPool."""

from __future__ import annotations

import math
import random

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink_dev.kv_managers import make_manager, owned, step


def test_long_stream_stays_bounded_and_recycles_blocks():
    policy = SinkWindowPolicy(sinks=4, window=64, block_size=32, max_chunk_tokens=96)
    manager, pool = make_manager(policy, num_blocks=64)
    free_at_start = pool.get_num_free_blocks()
    computed, steps = 0, [96] * 100 + [1] * 12000  # a 21.6k-token stream
    head = None
    for new in steps:
        step(manager, "r", computed, new)
        computed += new
        blocks = owned(manager, "r")
        head = head or blocks[0]
        assert blocks[0] == head, "the sink block is pinned for the whole stream"
        assert len(blocks) <= policy.max_resident_blocks
        # Exactly the blocks from the newest evicted one onwards are still held:
        # the README's rule, before a step that starts with n tokens computed.
        evicted = max(0, (computed - new + 1 - 4 - 64) // 32)
        assert len(blocks) == 1 + math.ceil(computed / 32) - max(evicted, 1)
    assert manager.peak_resident_blocks <= policy.max_resident_blocks
    assert manager.num_evicted_blocks > 600  # the pool of 64 was recycled many times
    manager.free("r")
    assert pool.get_num_free_blocks() == free_at_start


def test_concurrent_streams_never_share_a_block():
    policy = SinkWindowPolicy(sinks=4, window=64, block_size=32, max_chunk_tokens=64)
    manager, pool = make_manager(policy, num_blocks=8 * policy.max_resident_blocks + 1)
    free_at_start = pool.get_num_free_blocks()
    rng = random.Random(0)
    computed = {f"r{i}": 0 for i in range(8)}
    for _ in range(3000):
        req = rng.choice(sorted(computed))
        new = rng.choice([1, 1, 1, 17, 64])
        step(manager, req, computed[req], new)
        computed[req] += new
        if rng.random() < 0.003:  # a stream leaves (finish or abort), another joins
            manager.free(req)
            del computed[req]
            computed[f"r{len(computed) + rng.random()}"] = 0
        held = [b for r in computed for b in owned(manager, r) if r in manager.req_to_blocks]
        assert len(held) == len(set(held))
    for req in list(computed):
        manager.free(req)
    assert pool.get_num_free_blocks() == free_at_start


def test_admission_needs_only_the_bound():
    """A prompt far longer than the pool is admitted once one stream's bound fits."""
    policy = SinkWindowPolicy(sinks=4, window=64, block_size=32, max_chunk_tokens=64)
    manager, _ = make_manager(policy, num_blocks=policy.max_resident_blocks + 1)
    need = manager.get_num_blocks_to_allocate(
        "r", 50_000, [], 0, 0, 50_000, apply_admission_cap=True
    )
    assert need == policy.max_resident_blocks
