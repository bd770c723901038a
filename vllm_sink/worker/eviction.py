"""Worker side of an eviction: refill the head block, move the sinks, rebase the window.

When a stream's window slides by ``d`` tokens (whole blocks), before the step's
forward pass. Cache index ``i`` holds RoPE position ``i + offset`` (see
:mod:`vllm_sink.core.policy`); the offset takes up most slides, so:

* the tail of the newest evicted block (slots ``S .. bs-1``) is copied into the
  head block: those are the tokens right before the new first window block,
  at the same RoPE positions as before;
* the sink keys (slots ``0 .. S-1``) move to the new offset. They are rotated
  from the copy taken at the stream's first eviction, never from their last
  rotation, so rounding does not build up over a stream's life;
* only when the offset drops back (every ``R / bs`` evictions) are the window
  blocks and the copied tail rotated, once, by the drop.

The newest evicted block is still owned by the request (the scheduler frees it
one eviction later), so the copy never reads a block that another request may
already have written.

The sliding-window layers of a hybrid model (their own KV cache groups, see
:class:`~vllm_sink.scheduler.kv_cache.StreamingSlidingManager`) never attend
the sinks once a stream evicts (the streaming window holds their whole
window), and their group frees blocks as soon as their window has passed: in
such a group only the blocks the group still holds are written, the head
tail only while its source block is held (the layers still read those keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.core.stream_state import StreamState


class SlotAccess(Protocol):
    """A layer's keys or values by block and slot, as its backend lays them out
    (:class:`~vllm_sink.worker.cpu_attn_layout.PagedKV`,
    :class:`~vllm_sink.worker.gpu_kv_layout.KernelBlockKV`).

    Block ids are passed on the cache's ``device``: on a GPU an index left on
    the CPU costs a copy and a synchronisation at every use.
    """

    device: torch.device

    def get(self, blocks: torch.Tensor, slots: slice = ...) -> torch.Tensor:
        """A copy, ``[len(blocks), heads, slots, head_size]``."""
        ...

    def set(self, blocks: torch.Tensor, slots: slice, data: torch.Tensor) -> None: ...


Layers = list[tuple[SlotAccess, SlotAccess, RopeDeltas]]


@dataclass(frozen=True)
class LayerGroup:
    """The layers of one KV cache group (one block row per stream)."""

    layers: Layers
    sliding_window: int | None = None
    """The window the layers attend on their own; ``None``: sinks + the streaming window."""

    def max_resident_blocks(self, policy: SinkWindowPolicy) -> int:
        """Most blocks one stream holds in this group."""
        if self.sliding_window is None:
            return policy.max_resident_blocks
        return policy.sliding_max_resident_blocks(self.sliding_window)


@dataclass
class EvictionPlan:
    """All evictions of one step in one KV cache group, batched across requests."""

    period_blocks: int
    """Evictions between re-rotations of the window (``R / bs``)."""
    sliding_window: int | None = None
    """The group's own window (:attr:`LayerGroup.sliding_window`)."""
    streams: list[StreamState] = field(default_factory=list)
    head_blocks: list[int] = field(default_factory=list)
    tail_source_blocks: list[int] = field(default_factory=list)
    rebase_deltas: list[int] = field(default_factory=list)
    """How far (in positions) each stream's window and tail move back; mostly 0."""
    sink_offsets: list[int] = field(default_factory=list)
    window_blocks: list[int] = field(default_factory=list)
    window_deltas: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.head_blocks or self.window_blocks)

    def add(
        self,
        policy: SinkWindowPolicy,
        stream: StreamState,
        view_row: list[int] | torch.Tensor,
        num_computed_tokens: int,
    ) -> int:
        """Plan one stream's eviction; returns its new shift (evicted tokens).

        ``view_row`` is the stream's compact block row in this group *before*
        this eviction: ``[head, first window block, ...]``, block ``c >= 1``
        holding absolute block ``c + stream.shift / bs``. The caller moves
        ``stream.shift`` on.
        """
        shift_before = stream.shift
        shift = policy.position_shift(num_computed_tokens)
        if shift <= shift_before:
            return shift_before
        bs = policy.block_size
        dropped = (shift - shift_before) // bs
        offset_before = policy.rope_offset(shift_before, self.period_blocks)
        offset = policy.rope_offset(shift, self.period_blocks)
        rebase = shift - shift_before + offset_before - offset
        first_held = 0  # the row's first block after the head the group still holds
        if self.sliding_window is not None:
            first_held = policy.sliding_first_held_block(num_computed_tokens, self.sliding_window)
            first_held -= shift_before // bs
        if dropped >= first_held:
            self.streams.append(stream)
            self.head_blocks.append(int(view_row[0]))
            self.tail_source_blocks.append(int(view_row[dropped]))
            self.rebase_deltas.append(rebase)
            self.sink_offsets.append(offset)
        if rebase:
            last_computed = (num_computed_tokens - shift_before - 1) // bs
            kept = [int(b) for b in view_row[max(dropped + 1, first_held) : last_computed + 1]]
            self.window_blocks.extend(kept)
            self.window_deltas.extend([rebase] * len(kept))
        return shift


def take_first_sink_keys(plan: EvictionPlan, layers: Layers, sinks: int) -> None:
    """Copy the sink keys of streams evicting for the first time (offset still 0)."""
    new = [(i, s) for i, s in enumerate(plan.streams) if s.first_sink_keys is None]
    if not new or not sinks:
        return
    heads = torch.tensor([plan.head_blocks[i] for i, _ in new], device=layers[0][0].device)
    per_layer = [keys.get(heads, slice(0, sinks)) for keys, _, _ in layers]
    stacked = torch.stack(per_layer, dim=1)  # [streams, layers, heads, S, head_size]
    for row, (_, stream) in enumerate(new):
        stream.first_sink_keys = stacked[row].clone()


def sink_keys_at_offset_zero(
    layers: Layers, head_block: int, sinks: int, offset: int
) -> torch.Tensor:
    """A stream's sink keys moved back to positions ``0 .. S-1`` from where they sit now.

    For a stream resumed without the copy taken at its first eviction: one
    rotation more than the copy would cost, then the stream goes on from it.
    """
    device = layers[0][0].device
    head, moves = torch.tensor([head_block], device=device), torch.tensor([offset], device=device)
    per_layer = [
        rope.rotate_back(keys.get(head, slice(0, sinks)).to(torch.float32), moves)[0].to(keys.dtype)
        for keys, _, rope in layers
    ]
    return torch.stack(per_layer)  # [layers, heads, S, head_size]


def apply_eviction_plan(plan: EvictionPlan, layers: Layers, policy: SinkWindowPolicy) -> None:
    """Carry out ``plan`` on every layer's cache (keys, values, rotary angles)."""
    device = layers[0][0].device
    as_long = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    window, window_deltas = as_long(plan.window_blocks), as_long(plan.window_deltas)
    heads, sources = as_long(plan.head_blocks), as_long(plan.tail_source_blocks)
    rebase = as_long(plan.rebase_deltas)
    sink_moves = -as_long(plan.sink_offsets)  # from position s to s + offset
    sinks, tail, everything = slice(0, policy.sinks), slice(policy.sinks, None), slice(None)
    sinks_at_offset = None
    if policy.sinks and plan.sliding_window is None and plan.streams:
        take_first_sink_keys(plan, layers, policy.sinks)
        first_sinks = torch.stack([stream.first_sink_keys for stream in plan.streams])
        sinks_at_offset = sinks_rotated(first_sinks, layers, sink_moves)
    for layer, (keys, values, rope) in enumerate(layers):
        if len(window):
            rotated = rope.rotate_back(keys.get(window).to(torch.float32), window_deltas)
            keys.set(window, everything, rotated)
        if policy.sinks < policy.block_size and len(heads):
            moved = keys.get(sources, tail)
            if any(plan.rebase_deltas):
                moved = rope.rotate_back(moved.to(torch.float32), rebase)
            keys.set(heads, tail, moved)
            values.set(heads, tail, values.get(sources, tail))
        if sinks_at_offset is not None:
            keys.set(heads, sinks, sinks_at_offset[layer])


def sinks_rotated(
    first_sinks: torch.Tensor, layers: Layers, moves: torch.Tensor
) -> list[torch.Tensor]:
    """Each layer's sink keys ``[streams, heads, S, head_size]``, moved by ``-moves``.

    Layers that share one rotary table (every layer of Llama-like models) are
    rotated in one call: an eviction's fixed cost is mostly per-call overhead.
    """
    first_sinks = first_sinks.to(torch.float32)  # [streams, layers, heads, S, head_size]
    ropes = [rope for _, _, rope in layers]
    if all(rope is ropes[0] for rope in ropes):
        return list(ropes[0].rotate_back(first_sinks, moves).unbind(1))
    return [rope.rotate_back(first_sinks[:, i], moves) for i, rope in enumerate(ropes)]
