"""KV caches of vLLM's GPU attention backends, allocated on CPU (or meta) tensors.

Each layer's cache as vLLM's GPU model runner allocates it, with vLLM's own code, for a
backend (FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION, or FlashInfer's kernel block sizes
without the ``flashinfer`` package), so that a machine without a GPU can check what the
eviction code writes where; also the key and value views FlashAttention reads, and a
wrong (NHD) reading of a cache's strides that the checks must catch. Heads: ``HEADS`` of
``HEAD``, those of :mod:`vllm_sink_dev.eviction_checks`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_sink_dev.eviction_checks import HEAD, HEADS

NUM_BLOCKS = 64
"""Scheduler blocks in each allocated cache."""


def flashinfer_backend(kernel_block_sizes: list[int]):
    """FlashInfer's kernel block sizes and layouts off Blackwell (``flashinfer.py``), or
    others; its module needs the ``flashinfer`` package, which a CPU machine lacks."""
    from vllm.v1.attention.backend import AttentionBackend

    class FlashInferLike(AttentionBackend):
        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None):
            return kernel_block_sizes

        @classmethod
        def supported_kv_cache_layouts(cls):
            return None

    return FlashInferLike


def backend(name: str):
    """The backend class named ``name``; FlashInfer's sizes, or 16-token kernel blocks."""
    if name == "FLASH_ATTN":
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

        return FlashAttentionBackend
    if name == "TRITON_ATTN":
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

        return TritonAttentionBackend
    if name == "FLEX_ATTENTION":
        from vllm.v1.attention.backends.flex_attention import FlexAttentionBackend

        return FlexAttentionBackend
    return flashinfer_backend([16, 32, 64] if name == "FLASHINFER" else [16])


def allocate_layers(
    backend_class, layout, block: int, layers: int, device: str = "cpu"
) -> tuple[list, int]:
    """Each layer's KV cache as vLLM's GPU model runner allocates it, and the kernel block."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
    from vllm.v1.worker.utils import (
        AttentionGroup,
        allocate_kv_cache,
        customize_attention_spec,
        prepare_kernel_block_sizes,
    )

    spec = customize_attention_spec(
        backend_class,
        FullAttentionSpec(
            block_size=block, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float32
        ),
    )
    names = [f"layers.{i}.attn" for i in range(layers)]
    vllm_config = SimpleNamespace(  # the fields the KV cache config reads
        cache_config=SimpleNamespace(
            get_resolved_kv_cache_layout=lambda: layout,
            num_gpu_blocks_override=NUM_BLOCKS,
            prefix_cache_retention_interval=None,
        ),
        attention_config=SimpleNamespace(hisparse_config=None),
    )
    config = get_kv_cache_config_from_groups(vllm_config, [KVCacheGroupSpec(names, spec)], 1 << 40)
    [kernel_block] = prepare_kernel_block_sizes(
        config, [[AttentionGroup(backend_class, names, spec, 0)]]
    )
    try:
        caches = allocate_kv_cache(config, torch.device(device), layout, [kernel_block])
    except ValueError as refusal:  # e.g. a layer-outermost layout with split blocks
        pytest.skip(f"vLLM refuses this cache: {refusal}")
    return [caches[name] for name in names], kernel_block


def flash_attention_slots(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple:
    """The key and value views the FlashAttention backend splits a layer's cache into
    (``[kernel blocks, kernel block, heads, head]``), and where stream slots ``slots``
    (``block id * block + offset``, vLLM's slot mapping) sit in them."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(HEAD, dim=-1)
    kernel_block = key_cache.shape[1]
    return key_cache, value_cache, (slots // kernel_block, slots % kernel_block)


def assumed_nhd_keys(cache: torch.Tensor) -> torch.Tensor:
    """The keys of ``cache`` as if it were laid out NHD (``[block][token][head][content]``),
    whatever vLLM's strides say: the wrong assumption the checks must catch."""
    blocks, heads, slots, content = cache.shape
    return torch.as_strided(
        cache,
        size=(blocks, heads, slots, HEAD),
        stride=(slots * heads * content, content, heads * content, 1),
        storage_offset=cache.storage_offset(),
    )
