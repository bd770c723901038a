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
        block_row: list[int] | torch.Tensor,
        num_computed_tokens: int,
        evicted_before: int,
    ) -> int:
        """Plan one request's eviction; returns its new evicted-block count."""
        evicted = policy.evicted_blocks(num_computed_tokens)
        if evicted <= evicted_before:
            return evicted_before
        delta = (evicted - evicted_before) * policy.block_size
        last_computed_block = (num_computed_tokens - 1) // policy.block_size
        self.head_blocks.append(int(block_row[0]))
        self.tail_source_blocks.append(int(block_row[evicted]))
        self.tail_deltas.append(delta)
        kept = [int(b) for b in block_row[evicted + 1 : last_computed_block + 1]]
        self.window_blocks.extend(kept)
        self.window_deltas.extend([delta] * len(kept))
        return evicted


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
