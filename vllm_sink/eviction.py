"""Worker side of an eviction: refill the head block and re-rotate the window.

When a stream's window slides by ``d`` tokens (whole blocks), before the step's
forward pass:

* the tail of the newest evicted block (slots ``S .. bs-1``) is copied into the
  head block, keys rotated by ``-d``: those are the tokens right before the new
  first window block;
* every computed window block that stays is rotated by ``-d`` in place.

Sink slots never move. The newest evicted block is still owned by the request
(the scheduler frees it one eviction later), so the copy never reads a block
that another request may already have written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_sink.cpu_kv_layout import PagedKV
from vllm_sink.policy import SinkWindowPolicy
from vllm_sink.rerotation import RopeDeltas


@dataclass
class EvictionPlan:
    """All evictions of one step, batched across requests."""

    head_blocks: list[int] = field(default_factory=list)
    tail_source_blocks: list[int] = field(default_factory=list)
    tail_deltas: list[int] = field(default_factory=list)
    window_blocks: list[int] = field(default_factory=list)
    window_deltas: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.head_blocks)

    def add(
        self,
        policy: SinkWindowPolicy,
        view_row: list[int] | torch.Tensor,
        num_computed_tokens: int,
        shift_before: int,
    ) -> int:
        """Plan one stream's eviction; returns its new shift (evicted tokens).

        ``view_row`` is the stream's compact block row *before* this eviction:
        ``[head, first window block, ...]``, block ``c >= 1`` holding absolute
        block ``c + shift_before / bs``.
        """
        shift = policy.position_shift(num_computed_tokens)
        if shift <= shift_before:
            return shift_before
        dropped = (shift - shift_before) // policy.block_size
        last_computed = (num_computed_tokens - shift_before - 1) // policy.block_size
        self.head_blocks.append(int(view_row[0]))
        self.tail_source_blocks.append(int(view_row[dropped]))
        self.tail_deltas.append(shift - shift_before)
        kept = [int(b) for b in view_row[dropped + 1 : last_computed + 1]]
        self.window_blocks.extend(kept)
        self.window_deltas.extend([shift - shift_before] * len(kept))
        return shift


def apply_eviction_plan(
    plan: EvictionPlan,
    layers: list[tuple[PagedKV, PagedKV, RopeDeltas]],
    policy: SinkWindowPolicy,
) -> None:
    """Carry out ``plan`` on every layer's cache (keys, values, rotary angles)."""
    as_long = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    window, window_deltas = as_long(plan.window_blocks), as_long(plan.window_deltas)
    heads, sources = as_long(plan.head_blocks), as_long(plan.tail_source_blocks)
    tail_deltas = as_long(plan.tail_deltas)
    everything, tail = slice(None), slice(policy.sinks, None)
    for keys, values, rope in layers:
        if len(window):
            rotated = rope.rotate_back(keys.get(window).to(torch.float32), window_deltas)
            keys.set(window, everything, rotated)
        if policy.sinks < policy.block_size:
            rotated = rope.rotate_back(keys.get(sources, tail).to(torch.float32), tail_deltas)
            keys.set(heads, tail, rotated)
            values.set(heads, tail, values.get(sources, tail))
