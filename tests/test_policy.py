"""The sink + window rule, checked by simulating streams step by step."""

from __future__ import annotations

import math

import pytest

from vllm_sink.core.policy import ROPE_SPANS, SinkWindowPolicy


def simulate(policy: SinkWindowPolicy, steps: list[int]):
    """Walk a stream through steps of ``q`` tokens; yield what each query sees.

    What it sees is the README's rule, written out here: ``ev(n) = max(0,
    (n + 1 - S - W) // bs)`` blocks evicted before a step starting at ``n``;
    the policy's own answers are checked against it on the way.
    """
    sinks, window, block = policy.sinks, policy.window, policy.block_size
    n = 0
    for q in steps:
        evicted = max(0, (n + 1 - sinks - window) // block)
        assert policy.evicted_blocks(n) == evicted
        shift = evicted * block
        assert policy.position_shift(n) == shift
        assert policy.attended_window_start(n) == sinks + shift
        for i in range(q):
            p = n + i
            attended = list(range(min(sinks, p + 1))) + list(range(sinks + shift, p + 1))
            yield n, p, shift, attended
        n += q


@pytest.mark.parametrize(
    "sinks,window,block,chunk",
    [(4, 64, 32, 1), (4, 64, 32, 100), (0, 128, 128, 37), (4, 1020, 128, 512), (32, 32, 32, 7)],
)
def test_every_query_sees_sinks_plus_contiguous_window(sinks, window, block, chunk):
    policy = SinkWindowPolicy(sinks, window, block, max_chunk_tokens=chunk)
    steps = [chunk] * 40 + [1] * 300
    for _, p, shift, attended in simulate(policy, steps):
        sink_part = [a for a in attended if a < sinks]
        recent = [a for a in attended if a >= sinks]
        assert sink_part == list(range(min(sinks, p + 1)))
        assert recent == list(range(recent[0], p + 1)) if recent else True
        if p + 1 >= sinks + window:
            assert window <= len(recent) <= window + policy.max_window_slack
        if chunk == 1:
            assert len(recent) <= window + policy.max_decode_window_slack
        # Positions inside the cache: the query sits right after what it attends.
        assert p - shift == len(attended) - 1
        assert p - shift <= policy.max_position


@pytest.mark.parametrize(
    "sinks,window,block,chunk", [(4, 64, 32, 64), (4, 1020, 128, 2048), (0, 256, 32, 1)]
)
def test_resident_blocks_bound(sinks, window, block, chunk):
    """Blocks a stream holds (head + held + window) never exceed the stated bound."""
    policy = SinkWindowPolicy(sinks, window, block, max_chunk_tokens=chunk)
    n, freed_until, peak = 0, 1, 0
    for q in [chunk] * 30 + [1] * 2000:
        first, last = policy.freeable_block_range(n)
        freed_until = max(freed_until, last)
        allocated = math.ceil((n + q) / block)
        peak = max(peak, allocated - (freed_until - first))
        n += q
    assert peak <= policy.max_resident_blocks
    assert policy.max_resident_blocks - peak <= 2  # the bound is not loose


@pytest.mark.parametrize(
    "sinks,window,block,chunk,sliding",
    [
        (4, 64, 32, 64, 64),
        (4, 1020, 128, 2048, 512),
        (4, 1020, 128, 128, 512),
        (0, 256, 32, 1, 100),
    ],
)
def test_sliding_window_groups_hold_their_window_and_at_most_their_bound(
    sinks, window, block, chunk, sliding
):
    """A sliding-window group keeps the head block and every block holding a key that a
    query of the step (or a later one) attends; never more than its bound, which is tight."""
    policy = SinkWindowPolicy(sinks, window, block, max_chunk_tokens=chunk)
    n, peak = 0, 0
    for q in [chunk] * 30 + [1] * 3000:
        first_held = policy.sliding_first_held_block(n, sliding)
        oldest_attended = max(0, n - sliding + 1)  # by the step's first query
        assert first_held == 1 or first_held * block <= oldest_attended  # freed: not attended
        assert (first_held + 1) * block > oldest_attended  # the first held block is attended
        allocated = math.ceil((n + q) / block)
        peak = max(peak, allocated - (first_held - 1))
        n += q
    assert peak <= policy.sliding_max_resident_blocks(sliding) <= policy.max_resident_blocks
    assert policy.sliding_max_resident_blocks(sliding) - peak <= 2


def test_refuses_impossible_settings():
    with pytest.raises(ValueError, match="sinks"):
        SinkWindowPolicy(sinks=33, window=64, block_size=32, max_chunk_tokens=8)
    with pytest.raises(ValueError, match="window"):
        SinkWindowPolicy(sinks=4, window=16, block_size=32, max_chunk_tokens=8)


@pytest.mark.parametrize("rope_positions", [100, 1310, 1311, 2048, 5240, 8192, 131072])
def test_rope_offsets_use_the_table_and_stay_in_it(rope_positions):
    """Positions (cache index + offset) fit the RoPE table and a few cache spans.

    A longer period would not: within those limits the window is re-rotated as
    rarely as it can be.
    """
    policy = SinkWindowPolicy(4, 252, 32, max_chunk_tokens=1024)  # spans 1,310 positions
    limit = min(rope_positions, 4 * 1310)
    assert ROPE_SPANS == 4
    period = policy.rebase_period_blocks(rope_positions)
    offsets = {policy.rope_offset(shift, period) for shift in range(0, 1000 * 32, 32)}
    assert offsets == {k * 32 for k in range(period)}
    assert policy.max_position + max(offsets) < max(limit, policy.max_cached_tokens)
    if rope_positions > policy.max_cached_tokens:
        assert policy.max_position + period * 32 >= limit  # as long as it can be
    else:
        assert period == 1  # no room: the window moves at every eviction
