"""What a streaming worker checks and builds once, before its first step.

* the KV cache specs: every full-attention layer streams under the policy, and
  each sliding-window layer of a hybrid model too, in a group of its own
  (:func:`streaming_specs`);
* room for one whole stream in the KV cache (:func:`check_room_for_a_stream`);
* the model: an attention backend we can evict in, no ALiBi, a rotary module
  beside each attention layer (:func:`check_model`);
* each KV cache group's layers as the eviction reads and writes them, each
  checked once on the real cache (:func:`layer_groups`), and the line that
  tells the user what a stream costs (:func:`log_kv_memory`).

Each raises :class:`~vllm_sink.config.StreamingConfigError` naming what to change.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec

from vllm_sink.config import StreamingConfigError
from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.frontend.platforms import check_attention_backend
from vllm_sink.scheduler.kv_cache import StreamingSinkSpec, StreamingSlidingSpec
from vllm_sink.worker import vllm_runner as runner_api
from vllm_sink.worker.cpu_attn_layout import PagedKV, PageLayout
from vllm_sink.worker.eviction import LayerGroup
from vllm_sink.worker.gpu_kv_layout import KernelBlockKV
from vllm_sink.worker.self_check import CacheCheckError, check_eviction_in_cache

logger = init_logger("vllm.vllm_sink")

cpu_attn_layout = functools.cache(PageLayout.probe_cpu_attn)
"""The CPU_ATTN page layout of one (block size, head size, dtype, ISA): probed once."""


def streaming_specs(
    specs: Mapping[str, KVCacheSpec], policy: SinkWindowPolicy, hybrid_manager: bool
) -> dict[str, KVCacheSpec]:
    """Every layer streams under one policy.

    A sliding-window layer (Gemma 3's local layers) attends only its own
    window: its attention masks by distance within the stream's view, where
    the window's tokens are contiguous. The streaming window must hold that
    whole window (checked at start-up), so the sinks stay out of it. Beside
    full-attention layers, sliding-window layers get their own KV cache
    groups, which hold only that window (vLLM's hybrid KV cache manager,
    ``hybrid_manager``); where that manager is off, or full-attention layers
    outnumber them (vLLM would split the full-attention layers over several
    groups), they are kept like full-attention layers.
    """
    windows = {name: getattr(spec, "sliding_window", None) for name, spec in specs.items()}
    num_sliding = sum(window is not None for window in windows.values())
    hybrid = hybrid_manager and 0 < len(specs) - num_sliding <= num_sliding
    converted: dict[str, KVCacheSpec] = {}
    for name, spec in specs.items():
        window = windows[name]
        supported = (
            type(spec) in (FullAttentionSpec, SlidingWindowSpec)
            and not getattr(spec, "attention_chunk_size", None)
            and (window is None or window <= policy.window)
        )
        if not supported:
            raise StreamingConfigError(
                f"vllm-sink streams full-attention layers and sliding-window layers whose "
                f"window fits the streaming window ({policy.window}); layer {name} has "
                f"{type(spec).__name__}"
                + (f" with sliding_window={window}" if window is not None else "")
            )
        if hybrid and isinstance(spec, SlidingWindowSpec):
            converted[name] = StreamingSlidingSpec.from_attention(spec, policy)
        else:
            converted[name] = StreamingSinkSpec.from_attention(spec, policy)
    return converted


def check_room_for_a_stream(
    needed_bytes: int, available_bytes: int, policy: SinkWindowPolicy, layers: int, device: str
) -> None:
    """Refuse a KV cache that cannot hold one whole stream, saying what to change.

    vLLM's own check asks for room for ``max_model_len`` tokens and, short of
    it, says to lower ``max_model_len``: for streams that is the length limit,
    not what the cache holds.
    """
    if needed_bytes <= available_bytes:
        return
    more_memory = "VLLM_CPU_KVCACHE_SPACE" if device == "cpu" else "--gpu-memory-utilization"
    raise StreamingConfigError(
        f"vllm-sink: one stream needs {needed_bytes / 2**20:.1f} MiB of KV cache ({policy.sinks} "
        f"sinks + a {policy.window}-token window, a block to decode into and a "
        f"{policy.max_chunk_tokens}-token prefill chunk, in {layers} layers), and the "
        f"KV cache has {available_bytes / 2**20:.1f} MiB: raise {more_memory} or "
        "--kv-cache-memory-bytes, or lower --streaming-window or --max-num-batched-tokens"
    )


def check_model(
    layers: Mapping[str, Attention], model: torch.nn.Module, device: str
) -> dict[str, torch.nn.Module]:
    """Each attention layer's rotary module, once the layers are found streamable."""
    for name, layer in layers.items():
        check_attention_backend(device, layer.get_attn_backend().get_name(), name)
        if runner_api.alibi_slopes(layer) is not None:
            raise StreamingConfigError("vllm-sink does not support ALiBi models yet")
    return find_rotary_modules(model, set(layers))


def find_rotary_modules(
    model: torch.nn.Module, layer_names: set[str]
) -> dict[str, torch.nn.Module]:
    """Map each attention layer to the rotary module its parent applies to K.

    vLLM's decoder layers keep ``rotary_emb`` next to ``attn`` on the same
    attention module (Llama, Mistral, Qwen2, ...); that is what we look for.
    """
    found: dict[str, torch.nn.Module] = {}
    for module in model.modules():
        attn, rotary = getattr(module, "attn", None), getattr(module, "rotary_emb", None)
        if isinstance(attn, Attention) and rotary is not None:
            found[attn.layer_name] = rotary
    missing = sorted(layer_names - found.keys())
    if missing:
        raise StreamingConfigError(
            f"vllm-sink needs a RoPE model whose attention modules keep `rotary_emb` "
            f"next to `attn`; found no rotary embedding for {missing[:3]}"
        )
    return found


def rope_tables(
    rotary: Mapping[str, torch.nn.Module], device: torch.device
) -> dict[str, RopeDeltas]:
    """Each layer's re-rotation table, one per rotary module (layers share them)."""
    deltas = {id(m): runner_api.rope_deltas(m).to(device) for m in rotary.values()}
    return {name: deltas[id(m)] for name, m in rotary.items()}


def layer_kv(layer: Attention, block_size: int) -> tuple[PagedKV | KernelBlockKV, ...]:
    """A layer's keys and values, read and written as its attention backend lays them out."""
    cache = layer.kv_cache
    if layer.get_attn_backend().get_name() == "CPU_ATTN":
        layout = cpu_attn_layout(block_size, layer.head_size, cache.dtype, runner_api.isa(layer))
        return PagedKV.keys_of(cache, layout), PagedKV.values_of(cache, layout)
    return (
        KernelBlockKV.keys_of(cache, layer.head_size, block_size),
        KernelBlockKV.values_of(cache, layer.head_size, block_size),
    )


def layer_groups(
    kv_cache_config,
    layers: Mapping[str, Attention],
    ropes: Mapping[str, RopeDeltas],
    rotary: Mapping[str, torch.nn.Module],
) -> list[LayerGroup]:
    """Each KV cache group's layers, as evictions read and write them.

    The first layer of each group is checked once on the real cache: an
    eviction there must move keys as recomputing them at the new positions
    would (:func:`~vllm_sink.worker.self_check.check_eviction_in_cache`).
    """
    groups = []
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        kv = [(*layer_kv(layers[name], spec.block_size), ropes[name]) for name in group.layer_names]
        sliding = spec.sliding_window if isinstance(spec, StreamingSlidingSpec) else None
        groups.append(LayerGroup(kv, sliding))
        name = group.layer_names[0]
        try:  # any block: none holds a stream yet
            check_eviction_in_cache(layers[name], rotary[name], *kv[0], 1, spec.block_size)
        except CacheCheckError as error:
            raise StreamingConfigError(
                f"vllm-sink's start-up check of layer {name}'s KV cache "
                f"({layers[name].get_attn_backend().get_name()}) failed: {error}; "
                "streaming would give wrong text with this backend or model"
            ) from error
    return groups


def log_kv_memory(
    kv_cache_config, groups: list[LayerGroup], policy: SinkWindowPolicy, rebase_period: int
) -> None:
    blocks = [group.max_resident_blocks(policy) for group in groups]
    page_bytes = kv_cache_config.kv_cache_groups[0].kv_cache_spec.page_size_bytes
    per_stream = sum(n * page_bytes * len(group.layers) for n, group in zip(blocks, groups))
    logger.info(
        "vllm-sink: KV memory per stream at most %.1f MiB (%d blocks in %d KV cache "
        "group(s)); the pool of %d blocks holds %d full-size streams at once; a stream's "
        "window keys are re-rotated once every %d evictions",
        per_stream / 2**20,
        sum(blocks),
        len(blocks),
        kv_cache_config.num_blocks,
        (kv_cache_config.num_blocks - 1) // sum(blocks),
        rebase_period,
    )
