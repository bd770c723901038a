"""The start-up check of a layer's KV cache catches wrong layout and rotary assumptions.

On CPU_ATTN it runs in every engine start of the suite. Here it runs on a FlashAttention
cache laid out by vLLM's own allocation code, with vLLM's own rotary module; the cache
write stands in for FlashAttention's ``do_kv_cache_update`` (a CUDA op): it writes each
slot at ``block id * block size + offset`` of the backend's key and value views.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.worker.gpu_kv_layout import KernelBlockKV
from vllm_sink.worker.self_check import CacheCheckError, check_eviction_in_cache
from vllm_sink.worker.vllm_runner import rope_deltas
from vllm_sink_dev.eviction_checks import HEAD, HEADS
from vllm_sink_dev.kv_layouts import (
    allocate_layers,
    assumed_nhd_keys,
    backend,
    flash_attention_slots,
)

BLOCK = 16


@pytest.fixture(autouse=True)
def vllm_config():
    """vLLM's custom ops (the rotary module) read the current config when built and run."""
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


def flash_attention_write(layer, key, value, kv_cache, slot_mapping) -> None:
    """What ``reshape_and_cache_flash`` does, in torch."""
    key_cache, value_cache, where = flash_attention_slots(kv_cache, slot_mapping)
    key_cache[where] = key.view(-1, HEADS, HEAD)
    value_cache[where] = value.view(-1, HEADS, HEAD)


def layer_and_rotary(layout_name: str, neox: bool = True):
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.v1.kv_cache_layout import KVCacheLayout

    [cache], _ = allocate_layers(backend("FLASH_ATTN"), KVCacheLayout[layout_name], BLOCK, 1)
    layer = SimpleNamespace(
        kv_cache=cache,
        num_kv_heads=HEADS,
        head_size=HEAD,
        impl=SimpleNamespace(do_kv_cache_update=flash_attention_write),
    )
    rotary = get_rope(HEAD, 4096, is_neox_style=neox, dtype=torch.float32)
    return layer, rotary


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_a_right_view_passes_and_leaves_the_block_as_it_was(layout, neox):
    layer, rotary = layer_and_rotary(layout, neox)
    before = layer.kv_cache.clone()
    keys = KernelBlockKV.keys_of(layer.kv_cache, HEAD, BLOCK)
    values = KernelBlockKV.values_of(layer.kv_cache, HEAD, BLOCK)
    rope = rope_deltas(rotary)
    check_eviction_in_cache(layer, rotary, keys, values, rope, 3, BLOCK)
    assert torch.equal(layer.kv_cache, before)


def test_an_assumed_layout_fails():
    """Keys read as if the cache were NHD when vLLM laid it out HND."""
    layer, rotary = layer_and_rotary("LBHNC")
    keys = KernelBlockKV(assumed_nhd_keys(layer.kv_cache), BLOCK)
    values = KernelBlockKV.values_of(layer.kv_cache, HEAD, BLOCK)
    rope = rope_deltas(rotary)
    with pytest.raises(CacheCheckError, match="written keys"):
        check_eviction_in_cache(layer, rotary, keys, values, rope, 3, BLOCK)


def test_keys_and_values_swapped_fail():
    layer, rotary = layer_and_rotary("LBNHC")
    keys = KernelBlockKV.values_of(layer.kv_cache, HEAD, BLOCK)
    values = KernelBlockKV.keys_of(layer.kv_cache, HEAD, BLOCK)
    rope = rope_deltas(rotary)
    with pytest.raises(CacheCheckError, match="written keys"):
        check_eviction_in_cache(layer, rotary, keys, values, rope, 3, BLOCK)


def test_a_wrong_rotary_style_fails():
    """Re-rotating a NeoX-style model's keys as GPT-J pairs."""
    layer, rotary = layer_and_rotary("LBNHC", neox=True)
    keys = KernelBlockKV.keys_of(layer.kv_cache, HEAD, BLOCK)
    values = KernelBlockKV.values_of(layer.kv_cache, HEAD, BLOCK)
    rope = rope_deltas(rotary)
    gptj = RopeDeltas(rope.cos, rope.sin, rope.rotary_dim, is_neox_style=False)
    with pytest.raises(CacheCheckError, match="re-rotated"):
        check_eviction_in_cache(layer, rotary, keys, values, gptj, 3, BLOCK)
