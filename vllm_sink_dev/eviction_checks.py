"""A stream's evictions in a paged cache, checked key by key against RoPE.

Keys ``R(p) u_t`` for token ``t`` at position ``p`` (``HEADS`` heads of ``HEAD``), a
stream's steps driven through evictions as the worker takes them (:class:`EvictionPlan`
+ :func:`apply_eviction_plan`), and the check that after every step each resident key
equals ``R(i + offset) u_t``, computed afresh, for its cache index ``i``. Any cache
behind the :class:`SlotAccess` of ``vllm_sink.worker.eviction`` goes through it: the
CPU_ATTN pages and the GPU backends' layouts alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.core.stream_state import StreamState
from vllm_sink.worker.eviction import EvictionPlan, Layers, SlotAccess, apply_eviction_plan

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
