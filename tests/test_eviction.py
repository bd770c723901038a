"""Evictions in a paged cache: every resident key stays at its RoPE position.

A synthetic cache (two layers, with one rotary table each or sharing one; keys
``R(p) u_t`` for token ``t`` at position ``p``) is driven through a stream's
evictions exactly as the worker does (:class:`EvictionPlan` +
:func:`apply_eviction_plan`); after every step each resident key must equal
``R(i + offset) u_t``, computed afresh, for its cache index ``i``: sinks, the
refilled head tail and the window alike, across offset wrap-arounds (window
re-rotations).
"""

from __future__ import annotations

import pytest
import torch

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.worker.cpu_attn_layout import PagedKV, PageLayout
from vllm_sink.worker.eviction import sink_keys_at_offset_zero
from vllm_sink_dev.eviction_checks import (
    HEAD,
    HEADS,
    assert_evictions_keep_key_positions,
    at_positions,
    rope_table,
    stream_steps,
)


@pytest.mark.parametrize("sinks", [0, 2, 8])
@pytest.mark.parametrize("spare_positions", [0, 20, 150])
@pytest.mark.parametrize("chunk", [1, 5])
@pytest.mark.parametrize(
    "styles", [(True, False), (True, True), (False, False)], ids=["two-tables", "neox", "gptj"]
)
def test_resident_keys_keep_their_positions(sinks, spare_positions, chunk, styles):
    """CPU_ATTN pages (a plain strided packing), two layers."""
    block = 8
    token_dim = torch.arange(block).view(-1, 1) * HEAD + torch.arange(HEAD).view(1, -1)
    layout = PageLayout(token_dim, block * HEAD + token_dim, 2 * block * HEAD)
    caches = [torch.zeros(200, HEADS, block, 2 * HEAD) for _ in styles]
    layers = [(PagedKV.keys_of(c, layout), PagedKV.values_of(c, layout)) for c in caches]
    assert_evictions_keep_key_positions(layers, styles, block, sinks, spare_positions, chunk)


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_sink_keys_moved_back_to_offset_zero_match_keys_computed_there(neox):
    """A resumed stream without its first copy of the sink keys rebuilds it from the head block."""
    block, sinks, offset = 8, 4, 40
    rope = rope_table(200, neox)
    token_dim = torch.arange(block).view(-1, 1) * HEAD + torch.arange(HEAD).view(1, -1)
    layout = PageLayout(token_dim, block * HEAD + token_dim, 2 * block * HEAD)
    caches = [torch.zeros(6, HEADS, block, 2 * HEAD) for _ in range(2)]
    layers = [(PagedKV.keys_of(c, layout), PagedKV.values_of(c, layout), rope) for c in caches]
    u = torch.randn(2, sinks, HEADS, HEAD, generator=torch.Generator().manual_seed(1))
    head = 3
    for (keys, _, _), u_layer in zip(layers, u):  # sinks where an offset of 40 put them
        moved = at_positions(neox, u_layer, list(range(offset, offset + sinks)))
        keys.set(torch.tensor([head]), slice(0, sinks), moved.transpose(0, 1)[None])
    rebuilt = sink_keys_at_offset_zero(layers, head, sinks, offset)
    for layer, u_layer in enumerate(u):
        expected = at_positions(neox, u_layer, list(range(sinks))).transpose(0, 1)
        assert torch.allclose(rebuilt[layer], expected, atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("chunk", [1, 5])
@pytest.mark.parametrize("window", [20, 40])  # the head's tail still attended, or never
def test_a_sliding_window_group_writes_only_blocks_it_holds(sinks, chunk, window):
    """A sliding-window layer's group frees blocks its window has passed, and another
    stream may write them at once: evictions must never write them, while every key the
    layer still attends keeps its RoPE position, across window re-rotations."""
    block, sliding = 8, 20
    policy = SinkWindowPolicy(sinks, window, block, max_chunk_tokens=chunk)
    period = 3
    rope = rope_table(policy.max_cached_tokens + 2 * block, neox=True)
    token_dim = torch.arange(block).view(-1, 1) * HEAD + torch.arange(HEAD).view(1, -1)
    layout = PageLayout(token_dim, block * HEAD + token_dim, 2 * block * HEAD)
    cache = torch.zeros(200, HEADS, block, 2 * HEAD)
    layers = [(PagedKV.keys_of(cache, layout), PagedKV.values_of(cache, layout), rope)]
    keys = layers[0][0]
    tokens = torch.randn(400, HEADS, HEAD, generator=torch.Generator().manual_seed(2))
    freed: dict[int, torch.Tensor] = {}  # physical block -> what the other stream wrote
    rebases = 0
    # The compact block row keeps the (stale) ids of freed blocks.
    for plan, row, shift, n in stream_steps(layers, policy, period, 300, chunk, sliding):
        rebases += bool(plan.window_blocks)
        offset = shift // block % period * block
        for t in range(n, n + chunk):
            index = t - shift
            where = (torch.tensor([row[index // block]]), slice(index % block, index % block + 1))
            key = at_positions(True, tokens[t : t + 1], [index + offset])
            keys.set(*where, key.view(1, HEADS, 1, HEAD))
        end = n + chunk
        assert all(torch.equal(cache[b], kept) for b, kept in freed.items())  # never written
        attended = range(max(sinks, end - sliding, 0), end)  # the last query's window, sinks aside
        if attended:
            indices = [a - shift for a in attended]
            in_cache = keys.get(torch.tensor(row)).transpose(1, 2).flatten(0, 1)
            expected = at_positions(True, tokens[list(attended)], [i + offset for i in indices])
            assert (in_cache[indices] - expected).abs().max() < 1e-5, end
        # Before the next step the scheduler frees what the layer's window has passed,
        # and another stream writes it.
        for absolute in range(1, policy.sliding_first_held_block(end, sliding)):
            index = absolute - shift // block
            if index >= 1 and row[index] not in freed:
                cache[row[index]] = torch.randn(cache[row[index]].shape)
                freed[row[index]] = cache[row[index]].clone()
    assert rebases >= 3
    assert freed or window == sliding  # with W = sliding, only the refill's source is freed
