"""Snapshots on the scheduler side (no engine): keys, finding one, and the KV managers' pool."""

from __future__ import annotations

import random

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.snapshot_ops import (
    CopyBlocks,
    DropSnapshot,
    KeepStream,
    RestoreSnapshot,
    SpillSnapshot,
)
from vllm_sink.core.token_prefix import PrefixKeys
from vllm_sink.scheduler.kv_cache import StreamingManagers
from vllm_sink.scheduler.snapshot_keeper import TierSizes
from vllm_sink_dev.kv_managers import make_manager, make_sliding_manager, owned, step
from vllm_sink_dev.reference import first_unchanged_step_start

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


def stream(managers, req: str, tokens: int, settle: bool = True) -> list[tuple[int, int]]:
    """A stream of ``tokens`` tokens in every group: a prompt in chunks, then decoding.

    ``settle``: the blocks its last step left behind are freed as well (as if
    one more step began). Returns its steps ``(start, tokens)``.
    """
    managers = managers if isinstance(managers, list) else [managers]
    computed, steps = 0, []
    while computed < tokens:
        new = min(96 if computed < 200 else 1, tokens - computed)
        for manager in managers:
            step(manager, req, computed, new)
        steps.append((computed, new))
        computed += new
    if settle:
        for manager in managers:
            manager.remove_skipped_blocks(req, computed)
    return steps


def sid(keeper, tokens: list[int]) -> str:
    """The id of the snapshot of ``tokens`` (no request salt)."""
    return keeper.index.keys(tokens, "").key(len(tokens)).hex()[:32]


def first_unchanged_start(steps: list[tuple[int, int]], policy: SinkWindowPolicy) -> int:
    return first_unchanged_step_start(steps, policy.sinks, policy.window, policy.block_size)


def resume(managers, req: str, rows, length: int) -> None:
    """What vLLM's ``allocate_slots`` does with a cache hit of ``length`` tokens."""
    for manager, row in zip(managers, rows):
        manager.remove_skipped_blocks(req, length)
        need = manager.get_num_blocks_to_allocate(
            req, length + 1, list(row), length, length, length + 1
        )
        assert need <= manager.block_pool.get_num_free_blocks()
        manager.add_local_computed_blocks(req, list(row), length, 0)
        manager.allocate_new_blocks(req, length + 1, length + 1)


def test_a_snapshot_stays_readable_counts_as_free_and_every_resume_gets_a_copy():
    manager, pool = make_manager(POLICY, num_blocks=60)
    groups = StreamingManagers([manager])
    groups.enable_snapshots(TierSizes(pool_snapshots=4), b"e")
    keeper = groups.snapshots
    free_at_start = pool.get_num_free_blocks()
    tokens = list(range(500))
    stream(manager, "a", 500)
    held = owned(manager, "a")
    assert groups.keep_snapshot("a", tokens, "")
    assert keeper.take_ops() == [KeepStream("a", sid(keeper, tokens))]
    assert pool.get_num_free_blocks() == free_at_start  # nothing taken from live streams
    found, length, rows, tier = keeper.resume(tokens + [7, 8], "", max_tokens=501)
    assert length == 500 and tier == "pool"
    assert keeper.index.find(tokens + [7, 8], "other salt", 501) is None
    assert keeper.index.find(tokens[:400] + [7] * 100, "", 501) is None

    # Two requests continue it (a second tab): each gets its own copy; it stays.
    for req in ("b", "c"):
        resume([manager], req, rows, length)
    copies = keeper.take_ops()
    assert [type(op) for op in copies] == [CopyBlocks, CopyBlocks]
    assert all(list(op.src) == held for op in copies)
    assert [list(op.dst) for op in copies] == [owned(manager, "b"), owned(manager, "c")]
    assert not set(owned(manager, "b")) & (set(owned(manager, "c")) | set(held))
    assert len(keeper) == 1 and keeper.index.find(tokens + [9], "", 500)[0] is found
    assert pool.get_num_free_blocks() == free_at_start - 2 * len(held)
    for req in ("b", "c"):
        manager.free(req)
    assert pool.get_num_free_blocks() == free_at_start


def test_a_snapshot_resumes_any_length_since_its_cache_last_changed():
    """Decoding evicts a block every 32 tokens: a prompt that parts from the snapshot
    after its last eviction resumes up to there; one that parts earlier resumes nothing.
    A stream that never evicted resumes at any length."""
    manager, _ = make_manager(POLICY, num_blocks=60)
    groups = StreamingManagers([manager])
    groups.enable_snapshots(TierSizes(pool_snapshots=4), b"e")
    keeper = groups.snapshots
    tokens = list(range(1000, 1500))
    steps = stream(manager, "a", 500, settle=False)
    groups.keep_snapshot("a", tokens, "")
    unchanged_from = first_unchanged_start(steps, POLICY)
    assert 400 < unchanged_from < 499
    for parts_at in (unchanged_from, unchanged_from + 5, 499):
        prompt = tokens[:parts_at] + [7, 8]
        assert keeper.index.find(prompt, "", len(prompt) - 1)[1] == parts_at
    assert keeper.index.find(tokens, "", max_tokens=499)[1] == 499  # one token left to compute
    assert keeper.index.find(tokens[: unchanged_from - 1] + [7, 8], "", 600) is None

    stream(manager, "short", 90)  # 4 + 64 + a block of slack: never evicted
    groups.keep_snapshot("short", tokens[:90], "")
    assert keeper.index.find(tokens[:3] + [7], "", 3)[1] == 3


def test_resuming_short_of_the_end_copies_only_the_blocks_it_needs():
    manager, pool = make_manager(POLICY, num_blocks=60)
    groups = StreamingManagers([manager])
    groups.enable_snapshots(TierSizes(pool_snapshots=4), b"e")
    keeper = groups.snapshots
    tokens = list(range(449))
    steps = stream(manager, "a", 449, settle=False)  # ends one token into a block
    groups.keep_snapshot("a", tokens, "")
    keeper.take_ops()
    assert first_unchanged_start(steps, POLICY) <= 448
    found, length, (hit,), _ = keeper.resume(tokens[:448] + [7, 8], "", 449)
    assert length == 448 and found.num_tokens == 449
    assert len(hit) == 448 // 32 and found.row_length == 448 // 32 + 1
    resume([manager], "d", (hit,), length)
    (copy,) = keeper.take_ops()
    assert list(copy.src) == [b.block_id for b in hit if not b.is_null]
    assert list(copy.dst) == owned(manager, "d")[: len(copy.dst)]


def test_live_streams_take_request_freed_blocks_first_then_the_least_recently_used_snapshot():
    manager, pool = make_manager(POLICY, num_blocks=30)
    groups = StreamingManagers([manager])
    groups.enable_snapshots(TierSizes(pool_snapshots=8), b"e")
    keeper = groups.snapshots
    stream(manager, "old", 300)
    groups.keep_snapshot("old", list(range(300)), "")
    stream(manager, "new", 300)
    groups.keep_snapshot("new", list(range(1000, 1300)), "")
    # "old" is resumed (and its copy freed): now "new" is the least recently used.
    _, length, rows, _ = keeper.resume(list(range(301)), "", 300)
    resume([manager], "r", rows, length)
    keeper.take_ops()
    manager.free("r")
    free, per_snapshot = pool.get_num_free_blocks(), keeper.num_blocks // 2
    step(manager, "live", 0, (free - per_snapshot) * 32)
    assert len(keeper) == 1 and keeper.index.find(list(range(301)), "", 300) is not None
    assert DropSnapshot(sid(keeper, list(range(1000, 1300)))) in keeper.take_ops()
    step(manager, "live2", 0, per_snapshot * 32)
    assert len(keeper) == 0 and keeper.num_blocks == 0
    assert keeper.take_ops() == [DropSnapshot(sid(keeper, list(range(300))))]


def test_the_keeper_holds_at_most_its_capacity_least_recently_used_out():
    manager, _ = make_manager(POLICY, num_blocks=64)
    groups = StreamingManagers([manager])
    groups.enable_snapshots(TierSizes(pool_snapshots=2), b"e")
    for i in range(3):
        stream(manager, f"r{i}", 150)
        groups.keep_snapshot(f"r{i}", [i] * 150, "")
    assert len(groups.snapshots) == 2
    assert groups.snapshots.index.find([0] * 151, "", 150) is None
    found = groups.snapshots.index.find([2] * 151, "", 150)[0]
    assert found.snapshot_id == sid(groups.snapshots, [2] * 150)
    assert DropSnapshot(sid(groups.snapshots, [0] * 150)) in groups.snapshots.take_ops()


def test_snapshots_off_frees_as_before():
    manager, pool = make_manager(POLICY, num_blocks=40)
    groups = StreamingManagers([manager])
    stream(manager, "a", 300)
    assert not groups.keep_snapshot("a", list(range(300)), "")
    manager.free("a")
    assert len(groups.snapshots) == 0


def test_a_hybrid_snapshot_copies_every_groups_blocks():
    """A hybrid model's sink group and sliding-window group share one pool: the snapshot
    keeps both groups' blocks (the sliding group's already freed ones stay free), and a
    request that resumes it gets a copy of each group's."""
    sink, pool = make_manager(POLICY, num_blocks=80)
    sliding = make_sliding_manager(POLICY, sliding_window=40, pool=pool, group=1)
    groups = StreamingManagers([sink, sliding])
    groups.enable_snapshots(TierSizes(pool_snapshots=4), b"e")
    keeper = groups.snapshots
    free_at_start = pool.get_num_free_blocks()
    tokens = list(range(500))
    stream([sink, sliding], "a", 500, settle=False)
    held = {m: owned(m, "a") for m in (sink, sliding)}
    assert len(held[sliding]) < len(held[sink])  # the sliding group freed more
    assert groups.keep_snapshot("a", tokens, "")
    keeper.take_ops()
    _, length, rows, _ = keeper.resume(tokens + [7], "", max_tokens=500)
    resume([sink, sliding], "b", rows, length)
    copies = keeper.take_ops()
    assert [list(op.src) for op in copies] == [held[sink], held[sliding]]
    for manager, op in zip((sink, sliding), copies):
        assert list(op.dst) == owned(manager, "b")[: len(op.dst)]
    assert len(keeper) == 1
    for manager in (sink, sliding):
        manager.free("b")
    assert pool.get_num_free_blocks() == free_at_start


def host_keeper(num_blocks: int, capacity: int, host_snapshots: float):
    """A keeper whose host memory holds ``host_snapshots`` snapshots of 4 blocks (300 tokens)."""
    manager, pool = make_manager(POLICY, num_blocks=num_blocks)
    groups = StreamingManagers([manager])
    bytes_per_block = 1000
    sizes = TierSizes(
        capacity, host_bytes=int(host_snapshots * 4 * bytes_per_block),
        bytes_per_block=bytes_per_block,
    )  # fmt: skip
    groups.enable_snapshots(sizes, b"e")
    return manager, pool, groups, groups.snapshots


def test_what_the_pool_gives_up_is_spilled_to_host_memory_and_restored_on_a_hit():
    manager, pool, groups, keeper = host_keeper(num_blocks=60, capacity=8, host_snapshots=2.5)
    conversations = {f"c{i}": [i] * 300 for i in range(3)}
    held = {}
    for name, tokens in conversations.items():
        stream(manager, name, 300)
        held[name] = owned(manager, name)
        groups.keep_snapshot(name, tokens, "")
    assert len(held["c0"]) == 4
    keeper.take_ops()
    # A live stream takes the whole pool: the snapshots leave it, least recently used
    # first; host memory holds two of them, so the oldest host copy goes.
    step(manager, "live", 0, pool.get_num_free_blocks() * 32)
    ops = keeper.take_ops()
    ids = {name: sid(keeper, tokens) for name, tokens in conversations.items()}
    spill = {name: SpillSnapshot(ids[name], tuple(blocks)) for name, blocks in held.items()}
    assert ops == [spill["c0"], spill["c1"], DropSnapshot(ids["c0"]), spill["c2"]]
    assert keeper.tier_figures() == {"pool": (0, 0), "host": (2, 8_000), "disk": (0, 0)}
    assert keeper.spills == 3
    manager.free("live")

    # The next turn of c1: restored from host into fresh blocks, then copied for it.
    found, length, rows, tier = keeper.resume([1] * 301, "", 300)
    assert (found.snapshot_id, length, tier) == (ids["c1"], 300, "host")
    resume([manager], "c1-next", rows, length)
    restore, copy = keeper.take_ops()
    assert restore == RestoreSnapshot(
        ids["c1"], tuple(b.block_id for b in rows[0] if not b.is_null)
    )
    assert copy == CopyBlocks(restore.blocks, tuple(owned(manager, "c1-next")[: len(held["c1"])]))
    assert keeper.tier_figures()["pool"] == (1, 4_000)  # in both tiers now
    assert keeper.index.find([0] * 301, "", 300) is None  # c0 is gone


def test_over_the_count_limit_snapshots_go_to_host_memory_and_restores_need_room():
    manager, pool, groups, keeper = host_keeper(num_blocks=40, capacity=1, host_snapshots=1)
    for i in range(2):
        stream(manager, f"c{i}", 300)
        groups.keep_snapshot(f"c{i}", [i] * 300, "")
    ops = keeper.take_ops()
    assert [type(op) for op in ops] == [KeepStream, KeepStream, SpillSnapshot]
    assert ops[2].snapshot_id == sid(keeper, [0] * 300)
    assert keeper.tier_figures() == {"pool": (1, 4_000), "host": (1, 4_000), "disk": (0, 0)}
    # No room in the pool for c0's restore and the request's copy of it: not resumed.
    step(manager, "live", 0, (pool.get_num_free_blocks() - 7) * 32)
    assert keeper.resume([0] * 301, "", 300) is None
    manager.free("live")
    assert keeper.resume([0] * 301, "", 300)[3] == "host"


def test_of_snapshots_resuming_as_much_the_one_in_the_pool_is_taken():
    """A regenerated or edited turn is resumed as well by the prompt's snapshot as by the
    reply's: of equals, the one the pool holds is copied, not another restored from host
    memory, however recently that one was used."""
    manager, pool, groups, keeper = host_keeper(num_blocks=60, capacity=1, host_snapshots=2)
    shared = [7] * 60
    a, b = shared + [900] * 30, shared + [901] * 30  # 90 tokens each: never evicted
    for name, tokens in (("a", a), ("b", b)):
        stream(manager, name, 90)
        groups.keep_snapshot(name, tokens, "")
    assert keeper.tier_figures()["host"][0] == 1  # a, spilled when b came
    keeper.take_ops()
    prompt = shared + [902, 903]
    for a_used_last in (False, True):
        if a_used_last:
            keeper.index.used(keeper.index.find(a, "", 89)[0])
        found, length, _, tier = keeper.resume(prompt, "", len(prompt) - 1)
        assert (found.snapshot_id, length, tier) == (sid(keeper, b), 60, "pool")
        assert not any(isinstance(op, RestoreSnapshot) for op in keeper.take_ops())


def test_a_snapshot_that_cannot_be_restored_gives_way_to_the_next_best():
    """No room in the pool to restore the host snapshot that resumes the most: a pool
    snapshot that resumes fewer tokens is taken rather than none."""
    manager, pool, groups, keeper = host_keeper(num_blocks=40, capacity=1, host_snapshots=1)
    shared = [7] * 40
    a, b = shared + [900] * 50, shared + [901] * 50
    for name, tokens in (("a", a), ("b", b)):
        stream(manager, name, 90)
        groups.keep_snapshot(name, tokens, "")
    keeper.take_ops()
    step(manager, "live", 0, (pool.get_num_free_blocks() - 5) * 32)  # a's restore needs 6
    found, length, _, tier = keeper.resume(a + [5], "", 90)
    assert (found.snapshot_id, length, tier) == (sid(keeper, b), 40, "pool")
    manager.free("live")
    found, length, _, tier = keeper.resume(a + [5], "", 90)
    assert (found.snapshot_id, length, tier) == (sid(keeper, a), 90, "host")
