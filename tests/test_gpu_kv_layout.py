"""Evictions in the KV caches of vLLM's GPU attention backends, laid out on CPU tensors.

Each layer's cache is made by vLLM's own allocation code, as the GPU model runner
makes it (the KV cache config from the group spec, the backend's kernel block size,
then ``allocate_kv_cache``), for FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION and
FLASHINFER, in every ``KVCacheLayout`` the backend accepts, and with scheduler blocks
that span several kernel blocks (:mod:`vllm_sink_dev.kv_layouts`). The stream of
``test_eviction`` (:mod:`vllm_sink_dev.eviction_checks`) then runs through
:class:`KernelBlockKV`: every resident key must equal the key computed afresh at its
cache index. On meta-device caches, the same evictions must keep every index and
rotary table on the cache's device.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.worker.eviction import sink_keys_at_offset_zero
from vllm_sink.worker.gpu_kv_layout import KernelBlockKV
from vllm_sink_dev.eviction_checks import (
    HEAD,
    HEADS,
    assert_evictions_keep_key_positions,
    rope_table,
    stream_steps,
)
from vllm_sink_dev.kv_layouts import (
    NUM_BLOCKS,
    allocate_layers,
    assumed_nhd_keys,
    backend,
    flash_attention_slots,
)


def layout_cases() -> list:
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts

    cases = []
    for name, block in [
        ("FLASH_ATTN", 16), ("TRITON_ATTN", 32), ("FLEX_ATTENTION", 16),
        ("FLASHINFER", 128), ("16-TOKEN KERNEL BLOCKS", 64),
    ]:  # fmt: skip
        for layout in get_supported_kv_cache_layouts([backend(name)]):
            cases.append(pytest.param(name, layout, block, id=f"{name}-{layout.name}-{block}"))
    return cases


def write_and_read_back(cache, keys, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys written through ``keys`` (an adapter on ``cache``): what was written,
    and what the backend reads at those slots."""
    blocks = torch.tensor([5, 0, NUM_BLOCKS - 1])
    slots = slice(block // 4, block - 3)
    data = torch.randn(len(blocks), HEADS, block - 3 - block // 4, HEAD)
    keys.set(blocks, slots, data)
    assert torch.equal(keys.get(blocks, slots), data)
    offsets = torch.arange(block)[slots]
    where = (blocks.view(-1, 1) * block + offsets.view(1, -1)).flatten()
    key_cache, _, slot_index = flash_attention_slots(cache, where)
    return data.transpose(1, 2).flatten(0, 1), key_cache[slot_index]


@pytest.mark.parametrize(("name", "layout", "block"), layout_cases())
def test_writes_land_where_the_backend_reads(name, layout, block):
    """In every layout, the second of two layers sharing vLLM's buffer."""
    [first, cache], _ = allocate_layers(backend(name), layout, block, 2)
    written, read = write_and_read_back(cache, KernelBlockKV.keys_of(cache, HEAD, block), block)
    assert torch.equal(read, written)
    _, values = cache.transpose(1, 2).split(HEAD, dim=-1)
    assert not values.any() and not first.any()  # the values and the other layer untouched


def test_an_assumed_physical_layout_is_caught():
    """The check can fail: an adapter that assumes the default (NHD) strides instead of
    reading the view's writes elsewhere than an HND cache's backend reads."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    block = 16
    [cache], _ = allocate_layers(backend("FLASH_ATTN"), KVCacheLayout.LBHNC, block, 1)
    keys = KernelBlockKV(assumed_nhd_keys(cache), block)
    written, read = write_and_read_back(cache, keys, block)
    assert not torch.equal(read, written)


STREAM_CASES = [  # the default layout per backend, HND where a block spans kernel blocks
    ("FLASH_ATTN", "LBNHC", 16), ("TRITON_ATTN", "LBNHC", 32), ("FLEX_ATTENTION", "LBNHC", 16),
    ("FLASHINFER", "LBHNC", 128), ("16-TOKEN KERNEL BLOCKS", "LBNHC", 64),
]  # fmt: skip


@pytest.mark.parametrize(("name", "layout", "block"), STREAM_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("spare_positions", [0, 150])
def test_resident_keys_keep_their_positions(name, layout, block, sinks, spare_positions):
    from vllm.v1.kv_cache_layout import KVCacheLayout

    styles = (True, False)  # NeoX and GPT-J rotary, a layer each
    caches, kernel_block = allocate_layers(backend(name), KVCacheLayout[layout], block, len(styles))
    expected_kernel = {"FLASHINFER": 64, "16-TOKEN KERNEL BLOCKS": 16}.get(name, block)
    assert kernel_block == expected_kernel
    assert caches[0].shape == (NUM_BLOCKS * block // kernel_block, HEADS, kernel_block, 2 * HEAD)
    layers = [
        (KernelBlockKV.keys_of(c, HEAD, block), KernelBlockKV.values_of(c, HEAD, block))
        for c in caches
    ]
    assert_evictions_keep_key_positions(layers, styles, block, sinks, spare_positions, chunk=5)


class CpuTensorsBesideDevice(TorchDispatchMode):
    """Notes each op given a CPU tensor beside a tensor on another device (a 0-dim CPU
    tensor aside: CUDA takes it as a scalar). On a GPU such an op copies and waits for
    the copy, or fails."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        devices = {x.device.type for x in tensors if x.dim() or x.device.type != "cpu"}
        if "cpu" in devices and len(devices) > 1:
            self.ops.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("sinks", [0, 4])
def test_evictions_keep_every_tensor_on_the_cache_device(sinks):
    """Caches on the meta device (shapes only, and as strict as CUDA about mixing
    devices), allocated by vLLM for FLASH_ATTN, go through a stream's evictions (the
    first one's sink copy, refills, window re-rotations) and a resumed stream's sink
    rebuild: no op may take a CPU index or table beside the cache."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    block, chunk = 16, 5
    caches, _ = allocate_layers(backend("FLASH_ATTN"), KVCacheLayout.LBNHC, block, 2, "meta")
    policy = SinkWindowPolicy(sinks, 3 * block, block, max_chunk_tokens=chunk)
    rope_positions = policy.max_cached_tokens + 2 * block
    period = policy.rebase_period_blocks(rope_positions)
    rope = rope_table(rope_positions, neox=True).to("meta")
    layers = [
        (KernelBlockKV.keys_of(c, HEAD, block), KernelBlockKV.values_of(c, HEAD, block), rope)
        for c in caches
    ]
    with CpuTensorsBesideDevice() as mixing:
        plans = [plan for plan, *_ in stream_steps(layers, policy, period, 20 * block, chunk)]
        if sinks:
            sink_keys_at_offset_zero(layers, 0, sinks, offset=block)
    assert sum(bool(plan.head_blocks) for plan in plans) > 10
    assert any(plan.window_blocks for plan in plans)
    assert mixing.ops == []
