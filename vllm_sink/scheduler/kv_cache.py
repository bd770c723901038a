"""Scheduler side: the KV cache specs and managers of streaming layer groups.

Registered through vLLM's ``KVCacheSpecRegistry``; the stock scheduler and
block pool do the rest. Two kinds of layer group, one policy:

* :class:`StreamingSinkManager` (full-attention layers): pins each request's
  head block, frees the window blocks the policy has evicted;
* :class:`StreamingSlidingManager` (the sliding-window layers of a hybrid
  model such as Gemma 3): pins the head block and frees every block the
  layer's own window has passed, as vLLM's sliding-window manager does.

Freed blocks go straight back to the block pool for any request to reuse.
Each manager caps admission at its per-stream bound, so a prompt of any
length is admitted once that bound fits. :class:`StreamingManagers` is what
the scheduler sees of them together: snapshots and figures.

vLLM's calls reach the managers through
:class:`~vllm_sink.scheduler.vllm_scheduler.KVManagerDoor`, whose hooks they
implement; what is here is the streaming policy alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, SlidingWindowSpec

from vllm_sink.core.policy import SinkWindowPolicy, _cdiv
from vllm_sink.scheduler.snapshot_keeper import SnapshotKeeper, TierSizes
from vllm_sink.scheduler.vllm_scheduler import (
    Block,
    KVManagerDoor,
    Row,
    register_builtin_specs,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from vllm_sink.scheduler.snapshot_directory import SnapshotDirectory


class _StreamingSpec:
    """The policy fields both streaming specs carry (declared by each dataclass)."""

    sink_tokens: int
    window_tokens: int
    max_chunk_tokens: int
    block_size: int

    @property
    def policy(self) -> SinkWindowPolicy:
        return SinkWindowPolicy(
            sinks=self.sink_tokens,
            window=self.window_tokens,
            block_size=self.block_size,
            max_chunk_tokens=self.max_chunk_tokens,
        )

    @property
    def prefix_cacheable(self) -> bool:
        # Evicted, re-rotated blocks are not a function of their token prefix.
        return False

    @classmethod
    def merge(cls, specs: list) -> _StreamingSpec:  # type: ignore[override]
        if not all(spec == specs[0] for spec in specs[1:]):
            raise AssertionError("All streaming layers in a KV cache group must match.")
        return specs[0]


def _policy_fields(policy: SinkWindowPolicy) -> dict[str, int]:
    return {
        "sink_tokens": policy.sinks,
        "window_tokens": policy.window,
        "max_chunk_tokens": policy.max_chunk_tokens,
    }


@dataclass(frozen=True, kw_only=True)
class StreamingSinkSpec(_StreamingSpec, FullAttentionSpec):
    """Full attention whose memory per request is bounded by sinks + window."""

    sink_tokens: int
    window_tokens: int
    max_chunk_tokens: int

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        return self.policy.max_resident_blocks * self.page_size_bytes

    @classmethod
    def from_attention(cls, spec: AttentionSpec, policy: SinkWindowPolicy) -> StreamingSinkSpec:
        """The streaming spec of a full-attention layer (or of any attention layer).

        What the page holds is kept; a layer's own sliding window is not (the
        layer applies it), so that all layers can share one spec.
        """
        fields = {f: getattr(spec, f) for f in AttentionSpec.__dataclass_fields__}
        return cls(**fields, **_policy_fields(policy))


@dataclass(frozen=True, kw_only=True)
class StreamingSlidingSpec(_StreamingSpec, SlidingWindowSpec):
    """A sliding-window layer streamed beside sink layers: it holds only its own window."""

    sink_tokens: int
    window_tokens: int
    max_chunk_tokens: int

    def max_admission_blocks_per_request(
        self, max_in_flight_tokens: int, max_model_len: int
    ) -> int:
        """The per-stream bound (vLLM sizes the pool and caps admission with this)."""
        return self.policy.sliding_max_resident_blocks(self.sliding_window)

    @classmethod
    def from_attention(
        cls, spec: SlidingWindowSpec, policy: SinkWindowPolicy
    ) -> StreamingSlidingSpec:
        fields = {f: getattr(spec, f) for f in SlidingWindowSpec.__dataclass_fields__}
        return cls(**fields, **_policy_fields(policy))


@dataclass
class StreamProgress:
    """Where one request's stream stands, as this group's manager tracks it."""

    tokens: int
    """Tokens computed when its latest step began."""
    state: Hashable
    """What the group's cache holds then (:meth:`_StreamingManager.cache_state`)."""
    since: int
    """The step start from which :attr:`state` has held: the cache over any first ``L``
    tokens, ``L`` from here on, is that of a stream cut at ``L``."""
    freed_until: int = 1
    """Blocks ``1 ..`` this one ``- 1`` are freed (null placeholders in the row)."""


class _StreamingManager(KVManagerDoor):
    """Frees a stream's blocks below :meth:`first_held_block`; resumes snapshots by copy.

    Streams run with vLLM's prefix caching off (start-up refuses it): blocks
    are never cached by their token prefix. A finished stream's blocks may
    instead be kept whole as a snapshot (:mod:`vllm_sink.scheduler.snapshot_keeper`),
    which the scheduler offers to a request that continues the stream as a
    cache hit; the request gets a copy of them (:meth:`SnapshotKeeper.hand_over`).
    """

    def __init__(self, kv_cache_spec: _StreamingSpec, *args, **kwargs) -> None:
        self.policy = kv_cache_spec.policy
        super().__init__(kv_cache_spec, *args, **kwargs)
        self._progress: dict[str, StreamProgress] = {}
        self.peak_resident_blocks = 0
        """Most blocks any one request has held at once (for tests and metrics)."""
        self.num_evicted_blocks = 0
        """Blocks returned to the pool so far."""
        self.snapshots: SnapshotKeeper | None = None
        """Finished streams kept for the requests that continue them, shared by all groups.
        vLLM builds the managers before the scheduler makes it: :class:`StreamingManagers`
        sets it."""

    def first_held_block(self, num_computed_tokens: int) -> int:
        """The request's first block after the head that a step starting at ``n`` needs."""
        raise NotImplementedError

    def cache_state(self, num_computed_tokens: int) -> Hashable:
        """What decides the group's cache for a step starting at ``n`` (changes only there)."""
        raise NotImplementedError

    def progress(self, request_id: str) -> StreamProgress | None:
        return self._progress.get(request_id)

    def stream_lengths(self) -> dict[str, int]:
        """Tokens each stream had computed when its latest step began."""
        return {req: p.tokens for req, p in self._progress.items()}

    def resident_blocks(self, request_id: str) -> int:
        """Blocks the request holds now (freed slots are null placeholders)."""
        blocks = self.blocks_of(request_id)
        progress = self._progress.get(request_id)
        return len(blocks) - (progress.freed_until - 1 if progress else 0)

    def step_starts(self, request_id: str, num_computed_tokens: int) -> None:
        n = num_computed_tokens
        state = self.cache_state(n)
        progress = self._progress.get(request_id)
        if progress is None:
            progress = self._progress[request_id] = StreamProgress(n, state, n)
        elif state != progress.state:
            progress.state, progress.since = state, n
        progress.tokens = n
        first_held = min(self.first_held_block(n), len(self.blocks_of(request_id)))
        if first_held > progress.freed_until:
            self.free_row_range(request_id, 1, first_held)
            self.num_evicted_blocks += first_held - progress.freed_until
            progress.freed_until = first_held

    def blocks_allocated(self, request_id: str) -> None:
        self.peak_resident_blocks = max(self.peak_resident_blocks, self.resident_blocks(request_id))

    def stream_freed(self, request_id: str) -> None:
        self._progress.pop(request_id, None)

    # ---------------------------------------------------------------- snapshots
    def pop_snapshot_blocks(self, request_id: str, held: int) -> tuple[Row, StreamProgress]:
        """Take a finished request's first ``held`` blocks for a snapshot; free the rest."""
        blocks = self.pop_row(request_id)
        self.free_to_pool(reversed(blocks[held:]))  # past the computed tokens
        return tuple(blocks[:held]), self._progress.pop(request_id)

    def hit_copies(self, hit: Sequence[Block]) -> int:
        """A copy of each block of the snapshot the request resumes (null ones aside)."""
        return sum(not block.is_null for block in hit)

    def take_hit(self, request_id: str, hit: Sequence[Block], num_tokens: int) -> None:
        """The request resumes the snapshot whose blocks ``hit`` are, at ``num_tokens``: it
        gets a copy of them and the stream's progress there."""
        length = num_tokens
        group = self.kv_cache_group_id
        if self.snapshots is None:
            raise RuntimeError(f"vllm-sink: no snapshot for the cache hit of {request_id}")
        snapshot, blocks = self.snapshots.hand_over(request_id, hit, group, length)
        self.hold_computed(request_id, blocks)
        state = self.cache_state(length)
        unchanged_since = snapshot.stream_length(snapshot.resumable_from)
        since = unchanged_since if state == self.cache_state(unchanged_since) else length
        self._progress[request_id] = StreamProgress(
            length, state, since, snapshot.freed_until[group]
        )
        # Free what the stream evicts before its first step as this request.
        self.step_starts(request_id, length)


class StreamingSinkManager(_StreamingManager):
    """Full-attention layers: the head block (sinks) + the window; evicted blocks freed.

    The newest evicted block is kept one eviction longer (see
    :meth:`SinkWindowPolicy.freeable_block_range`).
    """

    def max_blocks_per_stream(self, spec: _StreamingSpec) -> int:
        return self.policy.max_resident_blocks

    def first_held_block(self, num_computed_tokens: int) -> int:
        return max(1, self.policy.freeable_block_range(num_computed_tokens)[1])

    def cache_state(self, num_computed_tokens: int) -> Hashable:
        return self.policy.evicted_blocks(num_computed_tokens)


class StreamingSlidingManager(_StreamingManager):
    """Sliding-window layers: the head block + the blocks the layer's window still reads."""

    def max_blocks_per_stream(self, spec: _StreamingSpec) -> int:
        assert isinstance(spec, StreamingSlidingSpec)
        return self.policy.sliding_max_resident_blocks(spec.sliding_window)

    def first_held_block(self, num_computed_tokens: int) -> int:
        sliding_window = self.kv_cache_spec.sliding_window  # type: ignore[attr-defined]
        return self.policy.sliding_first_held_block(num_computed_tokens, sliding_window)

    def cache_state(self, num_computed_tokens: int) -> Hashable:
        # The head block's tail is refilled at evictions while its source is held.
        n = num_computed_tokens
        return self.policy.evicted_blocks(n), self.first_held_block(n)


class StreamingManagers:
    """The scheduler's view of an engine's streaming groups: one sink group, any sliding ones."""

    def __init__(self, managers: Sequence[KVManagerDoor]) -> None:
        if not all(isinstance(m, _StreamingManager) for m in managers):
            kinds = sorted({type(m).__name__ for m in managers})
            raise RuntimeError(f"vllm-sink: KV cache groups of other kinds: {kinds}")
        self.groups: list[_StreamingManager] = list(managers)  # type: ignore[arg-type]
        (self.sinks,) = (m for m in self.groups if isinstance(m, StreamingSinkManager))
        self.block_pool = self.sinks.block_pool
        self.enable_snapshots(TierSizes(pool_snapshots=0), b"")

    def enable_snapshots(
        self, sizes: TierSizes, salt: bytes, disk: SnapshotDirectory | None = None
    ) -> None:
        self.snapshots = SnapshotKeeper(self.block_pool, self.sinks.block_size, sizes, salt, disk)
        for manager in self.groups:
            manager.snapshots = self.snapshots

    def keep_snapshot(
        self,
        request_id: str,
        tokens: Sequence[int],
        request_salt: str,
        running: bool = False,
        cut: int = 0,
    ) -> bool:
        """Keep a request's blocks as a snapshot of ``tokens`` (its computed tokens).

        A finished request's blocks are kept instead of freed; a running
        request's (``running``: its prompt just computed) are copied. A cut
        prompt's ``tokens`` are its whole tokens, ``cut`` of which after the
        sinks its stream left out. ``False`` (nothing done) when snapshots are
        off, the request holds no KV, or the copy was not made.
        """
        if (
            self.snapshots.capacity <= 0
            or not tokens
            or not all(m.blocks_of(request_id) for m in self.groups)
            or not all(m.progress(request_id) for m in self.groups)
        ):
            return False
        held = _cdiv(len(tokens) - cut, self.sinks.block_size)
        if running:
            taken = [(tuple(m.blocks_of(request_id)[:held]), m.progress(request_id))
                     for m in self.groups]  # fmt: skip
        else:
            taken = [m.pop_snapshot_blocks(request_id, held) for m in self.groups]
        resumable_from = max(progress.since for _, progress in taken)
        if cut:  # a cut stream's lengths below its sinks' end + the cut are no stream's
            resumable_from = max(resumable_from, self.sinks.policy.sinks)
        return self.snapshots.keep(
            request_id,
            tokens,
            request_salt,
            rows=tuple(blocks for blocks, _ in taken),
            freed_until=tuple(progress.freed_until for _, progress in taken),
            resumable_from=resumable_from + cut,
            shift=self.sinks.policy.position_shift(resumable_from),
            copy=running,
            skipped=cut,
        )

    @property
    def has_streams(self) -> bool:
        return bool(self.sinks.stream_lengths())

    def figures(self) -> dict[str, int]:
        """The figures for ``/metrics`` (:data:`vllm_sink.metrics.FIELDS`), O(streams).

        Blocks are counted in every group (a block of any group is one page of
        the pool); tokens are the sink group's, which holds the most of them.
        """
        sinks = self.sinks
        streams = sinks.stream_lengths()
        lengths = list(streams.values())
        evicted = [sinks.policy.evicted_blocks(n) for n in lengths]
        resident_tokens = [n - e * sinks.policy.block_size for n, e in zip(lengths, evicted)]
        return {
            "streams": len(lengths),
            "streams_evicting": sum(e > 0 for e in evicted),
            "evicted_blocks": sum(m.num_evicted_blocks for m in self.groups),
            "resident_blocks": sum(m.resident_blocks(r) for m in self.groups for r in streams),
            "resident_tokens": sum(resident_tokens),
            "max_resident_tokens": max(resident_tokens, default=0),
            "longest_stream_tokens": max(lengths, default=0),
            "blocks_per_stream_limit": sum(m.max_admission_blocks_per_request for m in self.groups),
        }

    @property
    def peak_resident_blocks(self) -> int:
        return sum(m.peak_resident_blocks for m in self.groups)


def _register_streaming_spec() -> None:
    """Add the spec to vLLM's registry, after vLLM's own specs.

    Runs when this module is first imported: only processes that use streaming
    import it (the worker builds the spec, the engine core unpickles it), so an
    engine with streaming off never touches the registry.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    register_builtin_specs()
    for spec, manager in (
        (StreamingSinkSpec, StreamingSinkManager),
        (StreamingSlidingSpec, StreamingSlidingManager),
    ):
        KVCacheSpecRegistry.register(spec, manager, uniform_type_base_spec=spec)


_register_streaming_spec()
