"""Scheduler side: the KV cache spec and manager of a streaming layer group.

Registered through vLLM's ``KVCacheSpecRegistry``; the stock scheduler and
block pool do the rest. The manager pins each request's head block, frees the
window blocks the policy has evicted (they go straight back to the block pool
for any request to reuse) and caps admission at the per-stream bound, so a
prompt of any length is admitted once that bound fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_sink.core.policy import SinkWindowPolicy, _cdiv
from vllm_sink.scheduler.snapshots import Snapshot, SnapshotStore
from vllm_sink.scheduler.vllm_scheduler import register_builtin_specs

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_utils import KVCacheBlock


@dataclass(frozen=True, kw_only=True)
class StreamingSinkSpec(FullAttentionSpec):
    """Full attention whose memory per request is bounded by sinks + window."""

    sink_tokens: int
    window_tokens: int
    max_chunk_tokens: int

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

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        return self.policy.max_resident_blocks * self.page_size_bytes

    @classmethod
    def from_attention(cls, spec: AttentionSpec, policy: SinkWindowPolicy) -> StreamingSinkSpec:
        """The streaming spec of a full-attention or sliding-window layer.

        What the page holds is kept; a layer's own sliding window is not
        (the layer applies it), so that all layers share one spec.
        """
        fields = {f: getattr(spec, f) for f in AttentionSpec.__dataclass_fields__}
        return cls(
            **fields,
            sink_tokens=policy.sinks,
            window_tokens=policy.window,
            max_chunk_tokens=policy.max_chunk_tokens,
        )

    @classmethod
    def merge(cls, specs: list[StreamingSinkSpec]) -> StreamingSinkSpec:  # type: ignore[override]
        if not all(spec == specs[0] for spec in specs[1:]):
            raise AssertionError("All streaming layers in a KV cache group must match.")
        return specs[0]


class StreamingSinkManager(SingleTypeKVCacheManager):
    """Frees evicted window blocks as a stream advances; keeps finished streams to resume.

    Streams run with vLLM's prefix caching off (start-up refuses it): blocks
    are never cached by their token prefix. A finished stream's blocks may
    instead be kept whole as a snapshot (:mod:`vllm_sink.scheduler.snapshots`),
    which the scheduler hands to the next request that continues the stream,
    as a cache hit of the stream's ``N`` tokens.
    """

    def __init__(self, kv_cache_spec: StreamingSinkSpec, **kwargs) -> None:
        self.policy = kv_cache_spec.policy
        kwargs["max_admission_blocks_per_request"] = self.policy.max_resident_blocks
        super().__init__(kv_cache_spec, **kwargs)
        self._freed_until: dict[str, int] = {}
        self._stream_tokens: dict[str, int] = {}
        """Tokens each stream had processed at the start of its latest step."""
        self.peak_resident_blocks = 0
        """Most blocks any one request has held at once (for tests and metrics)."""
        self.num_evicted_blocks = 0
        """Window blocks returned to the pool so far."""
        self.snapshots = SnapshotStore(0, self.block_size, b"")
        """Finished streams kept for the requests that continue them (none until enabled)."""

    def enable_snapshots(self, capacity: int, salt: bytes) -> None:
        self.snapshots = SnapshotStore(capacity, self.block_size, salt)

    def resident_blocks(self, request_id: str) -> int:
        """Blocks the request holds now (freed slots are null placeholders)."""
        blocks = self.req_to_blocks.get(request_id, ())
        return len(blocks) - max(0, self._freed_until.get(request_id, 1) - 1)

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        self._stream_tokens[request_id] = processed_computed_tokens
        first, last = self.policy.freeable_block_range(processed_computed_tokens)
        last = min(last, len(self.req_to_blocks.get(request_id, ())))
        already = self._freed_until.get(request_id, first)
        if last > already:
            self._remove_blocks_in_range(request_id, first, last)
            self.num_evicted_blocks += last - already
            self._freed_until[request_id] = last

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        new_blocks = super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        self.peak_resident_blocks = max(self.peak_resident_blocks, self.resident_blocks(request_id))
        return new_blocks

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self._freed_until.pop(request_id, None)
        self._stream_tokens.pop(request_id, None)

    # ---------------------------------------------------------------- snapshots
    def keep_snapshot(self, request_id: str, tokens: Sequence[int], request_salt: str) -> bool:
        """Keep a finished request's blocks as a snapshot of ``tokens`` (its computed tokens).

        Instead of :meth:`free`; ``False`` (nothing done) when snapshots are off
        or the request holds no KV.
        """
        blocks = self.req_to_blocks.get(request_id)
        if self.snapshots.capacity <= 0 or not blocks or not tokens:
            return False
        held = _cdiv(len(tokens), self.block_size)
        blocks = self.pop_blocks_for_free(request_id)
        self.block_pool.free_blocks(reversed(blocks[held:]))  # past the computed tokens
        self.snapshots.add(
            tokens,
            request_salt,
            source_request_id=request_id,
            last_step_start=self._stream_tokens.pop(request_id, len(tokens)),
            blocks=tuple(blocks[:held]),
            freed_until=self._freed_until.pop(request_id, 1),
            release=self._release,
        )
        return True

    def _release(self, snapshot: Snapshot) -> None:
        """Return a snapshot's blocks to the pool's free queue, readable until reused."""
        live = [block for block in snapshot.blocks if not block.is_null]
        self.block_pool.unpin_blocks(live, self._on_block_reuse)

    def _on_block_reuse(self, block: KVCacheBlock) -> None:
        self.snapshots.block_reused(block.block_id)

    def _has_partial_local_hit(self, new_computed_blocks, num_local_computed_tokens) -> bool:
        # A snapshot is used once: its last block is written in place, no copy.
        return False

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        """Hand the snapshot the scheduler found as this request's cache hit to the request.

        The hit may stop short of the snapshot's end (inside its last step):
        blocks past the hit stay free.
        """
        snapshot = self.snapshots.owner_of(new_computed_blocks[0])
        if snapshot is None or not (
            snapshot.last_step_start <= num_local_computed_tokens <= snapshot.num_tokens
            and tuple(new_computed_blocks)
            == self.snapshots.blocks_for(snapshot, num_local_computed_tokens)
        ):
            raise RuntimeError(f"vllm-sink: no snapshot for the cache hit of {request_id}")
        self.snapshots.take(snapshot)
        self.block_pool.touch([block for block in new_computed_blocks if not block.is_null])
        req_blocks = self.req_to_blocks[request_id]
        assert not req_blocks, "a snapshot goes to a request that holds no blocks yet"
        req_blocks.extend(new_computed_blocks)
        self.num_cached_block[request_id] = len(req_blocks)
        self._freed_until[request_id] = snapshot.freed_until
        # Free what the stream evicts before its first step as this request.
        self.remove_skipped_blocks(request_id, num_local_computed_tokens)

    @property
    def has_streams(self) -> bool:
        return bool(self._stream_tokens)

    def figures(self) -> dict[str, int]:
        """This group's figures for ``/metrics`` (:data:`vllm_sink.metrics.FIELDS`), O(streams)."""
        lengths = list(self._stream_tokens.values())
        evicted = [self.policy.evicted_blocks(n) for n in lengths]
        resident_tokens = [n - e * self.policy.block_size for n, e in zip(lengths, evicted)]
        return {
            "streams": len(lengths),
            "streams_evicting": sum(e > 0 for e in evicted),
            "evicted_blocks": self.num_evicted_blocks,
            "resident_blocks": sum(self.resident_blocks(r) for r in self._stream_tokens),
            "resident_tokens": sum(resident_tokens),
            "max_resident_tokens": max(resident_tokens, default=0),
            "longest_stream_tokens": max(lengths, default=0),
            "blocks_per_stream_limit": self.policy.max_resident_blocks,
        }

    @classmethod
    def find_longest_cache_hit(cls, *args, **kwargs):
        """Abstract in the base class; vLLM calls it only with prefix caching on."""
        raise NotImplementedError("vllm-sink streams run with prefix caching off")


def _register_streaming_spec() -> None:
    """Add the spec to vLLM's registry, after vLLM's own specs.

    Runs when this module is first imported: only processes that use streaming
    import it (the worker builds the spec, the engine core unpickles it), so an
    engine with streaming off never touches the registry.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    register_builtin_specs()
    KVCacheSpecRegistry.register(
        StreamingSinkSpec, StreamingSinkManager, uniform_type_base_spec=StreamingSinkSpec
    )


_register_streaming_spec()
