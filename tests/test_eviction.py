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

from collections.abc import Iterator

import pytest
import torch

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.core.stream_state import StreamState
from vllm_sink.worker.cpu_attn_layout import PagedKV, PageLayout
from vllm_sink.worker.eviction import (
    EvictionPlan,
    Layers,
    SlotAccess,
    apply_eviction_plan,
    sink_keys_at_offset_zero,
)

HEAD = 8
HEADS = 2


INV_FREQ = 1.0 / (100.0 ** (torch.arange(0, HEAD, 2, dtype=torch.float64) / HEAD))


def rope_table(positions: int, neox: bool) -> RopeDeltas:
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * INV_FREQ[None]
    return RopeDeltas(angles.cos().float(), angles.sin().float(), HEAD, neox)


def at_positions(neox: bool, u: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """``u[i]`` ([HEADS, HEAD]) with RoPE at ``positions[i]``, written out in float64."""
    angles = torch.tensor(positions, dtype=torch.float64)[:, None, None] * INV_FREQ
    cos, sin = angles.cos(), angles.sin()
    u = u.to(torch.float64)
    if neox:
        x1, x2 = u[..., : HEAD // 2], u[..., HEAD // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).float()
    x1, x2 = u[..., 0::2], u[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).float()


def stream_steps(
    layers: Layers,
    policy: SinkWindowPolicy,
    period: int,
    prompt: int,
    chunk: int,
    sliding_window: int | None = None,
) -> Iterator[tuple[EvictionPlan, list[int], int, int]]:
    """One stream's steps of ``chunk`` tokens as the worker takes them: the step's
    eviction planned and carried out in ``layers`` (a group of ``sliding_window``
    layers, if given), the evicted blocks dropped from the compact block row, blocks
    added for the step's tokens. Yields the plan, the row, the shift and the step's
    first token; its tokens go to cache index ``t - shift``."""
    block = policy.block_size
    stream = StreamState(prompt_len=prompt)
    row: list[int] = []
    for n in range(0, prompt, chunk):
        plan = EvictionPlan(period, sliding_window)
        shift = plan.add(policy, stream, row, n)
        if plan:
            apply_eviction_plan(plan, layers, policy)
        del row[1 : 1 + (shift - stream.shift) // block]
        stream.shift = shift
        while len(row) * block < n + chunk - shift:
            row.append(len(row) + 1 + shift // block)  # any free physical block
        yield plan, row, shift, n


def assert_evictions_keep_key_positions(
    layers: list[tuple[SlotAccess, SlotAccess]],
    styles: tuple[bool, ...],
    block: int,
    sinks: int,
    spare_positions: int,
    chunk: int,
    window_blocks: int = 3,
) -> None:
    """Stream through evictions in ``layers`` (layer ``i`` rotary style ``styles[i]``):
    after every step each resident key is the key computed afresh at its cache index."""
    window = window_blocks * block
    prompt = window + 30 * block - 4  # physical blocks up to about window_blocks + 40
    policy = SinkWindowPolicy(sinks, window, block, max_chunk_tokens=chunk)
    rope_positions = policy.max_cached_tokens + spare_positions
    period = policy.rebase_period_blocks(rope_positions)
    assert policy.max_position + (period - 1) * block < rope_positions
    tables = {neox: rope_table(rope_positions, neox) for neox in set(styles)}
    layers = [(keys, values, tables[neox]) for (keys, values), neox in zip(layers, styles)]
    tokens = torch.randn(prompt + chunk, HEADS, HEAD, generator=torch.Generator().manual_seed(0))
    rebases = 0
    for plan, row, shift, n in stream_steps(layers, policy, period, prompt, chunk):
        rebases += bool(plan.window_blocks)
        offset = shift // block % period * block  # positions restart every period blocks
        for t in range(n, n + chunk):  # this step's tokens, written as vLLM would
            index = t - shift
            slot = index % block
            for keys, values, rope in layers:
                where = (torch.tensor([row[index // block]]), slice(slot, slot + 1))
                key = at_positions(rope.is_neox_style, tokens[t : t + 1], [index + offset])
                keys.set(*where, key.view(1, HEADS, 1, HEAD))
                values.set(*where, tokens[t].view(1, HEADS, 1, HEAD))
        resident = n + chunk - shift
        held = [t if t < sinks else t + shift for t in range(resident)]
        blocks = torch.tensor(row)
        for keys, values, rope in layers:
            cached_keys, cached_values = (
                kv.get(blocks).transpose(1, 2).flatten(0, 1)[:resident] for kv in (keys, values)
            )
            positions = [i + offset for i in range(resident)]
            expected = at_positions(rope.is_neox_style, tokens[held], positions)
            error = (cached_keys - expected).abs().max()
            assert error < 1e-5, (n, error)
            assert torch.equal(cached_values, tokens[held])
    assert shift > 10 * block
    # With room in the RoPE table, the window is re-rotated only when the offset wraps
    # around: once every ``period`` evicted blocks.
    if period > 1:
        assert rebases == shift // block // period


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
