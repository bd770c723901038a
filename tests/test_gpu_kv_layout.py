"""Evictions in the KV caches of vLLM's GPU attention backends, laid out on CPU tensors.

Each layer's cache is made by vLLM's own allocation code, as the GPU model runner
makes it (the KV cache config from the group spec, the backend's kernel block size,
then ``allocate_kv_cache``), for FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION and
FLASHINFER, in every ``KVCacheLayout`` the backend accepts, and with scheduler blocks
that span several kernel blocks. The stream of ``test_eviction`` then runs through
:class:`KernelBlockKV`: every resident key must equal the key computed afresh at its
cache index. On meta-device caches, the same evictions must keep every index and
rotary table on the cache's device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_eviction import (
    HEAD,
    HEADS,
    assert_evictions_keep_key_positions,
    rope_table,
    stream_steps,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.worker.eviction import sink_keys_at_offset_zero
from vllm_sink.worker.gpu_kv_layout import KernelBlockKV

NUM_BLOCKS = 64


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
