"""Attention metadata: hand the kernel each stream's compact block table.

The runner keeps vLLM's append-only per-request block rows and absolute
sequence lengths. Just before the backend builds its metadata, this builder
rewrites them to what the policy says the stream holds: ``[head block, window
blocks...]`` and ``seq_len - evicted * block_size`` tokens. Everything is
derived from the common metadata itself (``seq_len - query_len`` is the number
of computed tokens), so no state is shared with the runner.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    subclass_attention_backend,
)

from vllm_sink.policy import SinkWindowPolicy


def compact_attention_metadata(
    common: CommonAttentionMetadata, policy: SinkWindowPolicy
) -> CommonAttentionMetadata:
    """The same batch, seen through each stream's compact cache."""
    query_start = common.query_start_loc_cpu
    query_lens = (query_start[1:] - query_start[:-1]).to(common.seq_lens.device)
    computed = common.seq_lens - query_lens
    evicted = policy.evicted_blocks_array(computed)
    if not bool(evicted.any()):
        return common
    shift = evicted * policy.block_size
    table = common.block_table_tensor
    columns = evicted.view(-1, 1) + torch.arange(
        1, policy.max_compact_blocks, device=table.device
    ).view(1, -1)
    columns.clamp_(max=table.shape[1] - 1)
    compact_table = torch.cat(
        (table[:, :1], torch.gather(table, 1, columns.to(torch.int64))), dim=1
    )
    seq_lens = common.seq_lens - shift.to(common.seq_lens.dtype)
    upper = common.seq_lens_cpu_upper_bound
    if upper is not None:
        upper = upper - shift.to(upper.device, upper.dtype)
    return dataclasses.replace(
        common,
        seq_lens=seq_lens,
        seq_lens_cpu_upper_bound=upper,
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=compact_table,
    )


@functools.cache
def streaming_backend(backend: type[AttentionBackend]) -> type[AttentionBackend]:
    """``backend`` with a builder that compacts the metadata first (one per backend)."""
    base_builder = backend.get_builder_cls()

    class StreamingMetadataBuilder(base_builder):  # type: ignore[misc, valid-type]
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self.streaming_policy: SinkWindowPolicy = kv_cache_spec.policy

        def build(
            self,
            common_prefix_len: int,
            common_attn_metadata: CommonAttentionMetadata,
            fast_build: bool = False,
        ):
            compact = compact_attention_metadata(common_attn_metadata, self.streaming_policy)
            return super().build(common_prefix_len, compact, fast_build)

    StreamingMetadataBuilder.__name__ = f"Streaming{base_builder.__name__}"
    StreamingMetadataBuilder.__qualname__ = StreamingMetadataBuilder.__name__
    builder: type[AttentionMetadataBuilder] = StreamingMetadataBuilder
    return subclass_attention_backend("Streaming", backend, builder)
