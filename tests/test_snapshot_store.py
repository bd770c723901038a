"""Snapshots on the scheduler side (no engine): keys, the store, and the KV manager's pool."""

from __future__ import annotations

import random

from test_kv_cache_manager import make_manager, make_sliding_manager, owned, step

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.token_prefix import PrefixKeys
from vllm_sink.scheduler.kv_cache import StreamingManagers

POLICY = SinkWindowPolicy(sinks=4, window=64, block_size=32, max_chunk_tokens=96)


def test_two_prefixes_share_a_key_exactly_when_their_tokens_agree():
    rng = random.Random(0)
    base = [rng.randrange(500) for _ in range(300)]
    for trial in range(200):
        other = list(base)
        if trial % 2:
            other[rng.randrange(300)] = 999  # differs at one position
        a, b = PrefixKeys(base, 32, b"s"), PrefixKeys(other, 32, b"s")
        for n in (0, 1, 31, 32, 33, 64, 100, 299, 300):
            assert (a.key(n) == b.key(n)) == (base[:n] == other[:n])
    assert PrefixKeys(base, 32, b"s").key(100) != PrefixKeys(base, 32, b"t").key(100)
    assert PrefixKeys(base, 32, b"s").key(100) != PrefixKeys(base, 32, b"s").key(99)


def stream(manager, req: str, tokens: int, settle: bool = True) -> None:
    """A stream of ``tokens`` tokens: a prompt in chunks, then decoding.

    ``settle``: the blocks its last step left behind are freed as well (as if
    one more step began); otherwise the last step's start is its last count.
    """
    computed = 0
    while computed < tokens:
        new = min(96 if computed < 200 else 1, tokens - computed)
        step(manager, req, computed, new)
        computed += new
    if settle:
        manager.remove_skipped_blocks(req, computed)


def test_a_snapshot_keeps_the_blocks_readable_and_counts_them_free():
    manager, pool = make_manager(POLICY, num_blocks=40)
    groups = StreamingManagers([manager])
    groups.enable_snapshots(capacity=4, salt=b"e")
    free_at_start = pool.get_num_free_blocks()
    tokens = list(range(500))
    stream(manager, "a", 500)
    held = owned(manager, "a")
    assert groups.keep_snapshot("a", tokens, "")
    assert pool.get_num_free_blocks() == free_at_start  # nothing taken from live streams
    found, length = groups.snapshots.find(tokens + [7, 8], "", max_tokens=501)
    assert length == 500
    assert [b.block_id for b in found.blocks[0] if not b.is_null] == held
    assert groups.snapshots.find(tokens + [7, 8], "other salt", 501) is None
    assert groups.snapshots.find(tokens[:400] + [7] * 100, "", 501) is None

    # The request that continues it takes its blocks over; the store forgets it.
    manager.remove_skipped_blocks("b", 500)
    manager.add_local_computed_blocks("b", list(found.blocks[0]), 500, 0)
    assert len(groups.snapshots) == 0
    assert owned(manager, "b") == held
    assert pool.get_num_free_blocks() == free_at_start - len(held)
    manager.free("b")
    assert pool.get_num_free_blocks() == free_at_start


def test_a_prompt_that_parts_from_a_snapshot_in_its_last_step_resumes_up_to_there():
    """The stream's last step computed token 499 alone: any prompt agreeing on the
    first 499 tokens resumes 499 of them; one parting earlier resumes nothing."""
    manager, pool = make_manager(POLICY, num_blocks=40)
    groups = StreamingManagers([manager])
    groups.enable_snapshots(capacity=4, salt=b"e")
    free_at_start = pool.get_num_free_blocks()
    tokens = list(range(500))
    stream(manager, "a", 500, settle=False)
    groups.keep_snapshot("a", tokens, "")
    snapshots = groups.snapshots
    assert snapshots.find(tokens[:499] + [7, 8], "", 501)[1] == 499
    assert snapshots.find(tokens, "", max_tokens=499)[1] == 499  # one token left to compute
    assert snapshots.find(tokens[:498] + [7, 8, 9], "", 501) is None

    # A stream ending on a block boundary: the hit leaves the block the last step began.
    stream(manager, "c", 449, settle=False)
    groups.keep_snapshot("c", tokens[:449], "")
    found, length = snapshots.find(tokens[:448] + [7, 8], "", 449)
    assert length == 448 and found.num_tokens == 449
    (hit,) = snapshots.blocks_for(found, length)
    assert len(hit) == 448 // 32 and len(found.blocks[0]) == 448 // 32 + 1
    manager.remove_skipped_blocks("d", 448)
    manager.add_local_computed_blocks("d", list(hit), 448, 0)
    assert owned(manager, "d") == [b.block_id for b in hit if not b.is_null]
    manager.free("d")
    snapshots.drop(next(iter(snapshots._by_key)))
    assert pool.get_num_free_blocks() == free_at_start


def test_live_streams_take_request_freed_blocks_first_then_the_oldest_snapshot():
    manager, pool = make_manager(POLICY, num_blocks=24)
    groups = StreamingManagers([manager])
    groups.enable_snapshots(capacity=8, salt=b"e")
    stream(manager, "old", 300)
    groups.keep_snapshot("old", list(range(300)), "")
    stream(manager, "new", 300)
    groups.keep_snapshot("new", list(range(1000, 1300)), "")
    assert len(groups.snapshots) == 2
    # A live stream needing the whole pool: the oldest snapshot gives way first.
    free = pool.get_num_free_blocks()
    per_snapshot = groups.snapshots.num_blocks // 2
    step(manager, "live", 0, (free - per_snapshot) * 32)
    assert len(groups.snapshots) == 1
    assert groups.snapshots.find(list(range(1000, 1301)), "", 301) is not None
    step(manager, "live2", 0, per_snapshot * 32)
    assert len(groups.snapshots) == 0 and groups.snapshots.num_blocks == 0


def test_the_store_holds_at_most_its_capacity_oldest_out():
    manager, _ = make_manager(POLICY, num_blocks=64)
    groups = StreamingManagers([manager])
    groups.enable_snapshots(capacity=2, salt=b"e")
    for i in range(3):
        stream(manager, f"r{i}", 150)
        groups.keep_snapshot(f"r{i}", [i] * 150, "")
    assert len(groups.snapshots) == 2
    assert groups.snapshots.find([0] * 151, "", 150) is None
    assert groups.snapshots.find([2] * 151, "", 150)[0].source_request_id == "r2"


def test_snapshots_off_frees_as_before():
    manager, pool = make_manager(POLICY, num_blocks=40)
    groups = StreamingManagers([manager])
    stream(manager, "a", 300)
    assert not groups.keep_snapshot("a", list(range(300)), "")
    manager.free("a")
    assert len(groups.snapshots) == 0


def test_a_snapshot_hands_over_every_groups_blocks_once():
    """A hybrid model's sink group and sliding-window group share one pool: the snapshot
    keeps both groups' blocks (the sliding group's already freed ones stay free) and the
    request that resumes it takes each group's own."""
    sink, pool = make_manager(POLICY, num_blocks=60)
    sliding = make_sliding_manager(POLICY, sliding_window=40, pool=pool, group=1)
    groups = StreamingManagers([sink, sliding])
    groups.enable_snapshots(capacity=4, salt=b"e")
    free_at_start = pool.get_num_free_blocks()
    tokens = list(range(500))
    computed = 0
    while computed < 500:
        new = min(96 if computed < 200 else 1, 500 - computed)
        for manager in (sink, sliding):
            step(manager, "a", computed, new)
        computed += new
    held = {m: owned(m, "a") for m in (sink, sliding)}
    assert len(held[sliding]) < len(held[sink])  # the sliding group freed more
    assert groups.keep_snapshot("a", tokens, "")
    found, length = groups.snapshots.find(tokens + [7], "", max_tokens=500)
    hit = groups.snapshots.blocks_for(found, length)
    for manager in (sink, sliding):
        manager.remove_skipped_blocks("b", length)
        manager.add_local_computed_blocks("b", list(hit[manager.kv_cache_group_id]), length, 0)
        assert owned(manager, "b") == held[manager]
    assert len(groups.snapshots) == 0  # left the store once both groups had their blocks
    for manager in (sink, sliding):
        manager.free("b")
    assert pool.get_num_free_blocks() == free_at_start
