"""Re-rotating cached keys, and finding them in CPU_ATTN's packed pages."""

from __future__ import annotations

import pytest
import torch
from vllm import _custom_ops as ops
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllm_sink.worker.cpu_attn_layout import PagedKV, PageLayout
from vllm_sink.worker.vllm_runner import rope_deltas


@pytest.mark.parametrize(
    "rope_parameters,neox",
    [
        ({"rope_type": "default", "rope_theta": 100000.0}, True),
        ({"rope_type": "default", "rope_theta": 10000.0}, False),
        (
            {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
            True,
        ),
    ],
)
def test_rotating_back_equals_rope_at_the_earlier_position(rope_parameters, neox):
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(
            64,
            max_position=8192,
            rope_parameters=rope_parameters,
            is_neox_style=neox,
            dtype=torch.float32,
        )
    deltas = rope_deltas(rope)
    torch.manual_seed(0)
    keys = torch.randn(6, 3 * 64)
    positions = torch.tensor([5000, 4100, 300, 7000, 128, 2048])
    shift = torch.tensor([4096, 4096, 256, 1, -128, -2000])  # < 0: to a later position
    _, at_p = rope.forward_native(positions, keys.clone(), keys.clone())
    _, at_p_minus = rope.forward_native(positions - shift, keys.clone(), keys.clone())
    moved = deltas.rotate_back(at_p.view(6, 3, 64), shift).view(6, -1)
    assert torch.allclose(moved, at_p_minus, atol=1e-3), (moved - at_p_minus).abs().max()
    # And the rotation is not a no-op.
    assert (at_p - at_p_minus).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [32, 128])
def test_probed_layout_finds_every_written_key_and_value(dtype, block_size):
    heads, head_size, num_blocks = 3, 64, 5
    isa = _get_attn_isa(dtype, block_size, head_size, "auto")
    layout = PageLayout.probe_cpu_attn(block_size, head_size, dtype, isa)
    kv = torch.zeros(num_blocks, heads, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = kv.view(num_blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)
    slots = torch.tensor([block_size + 3, 2 * block_size, 4 * block_size + block_size - 1])
    key = torch.randn(3, heads, head_size).to(dtype)
    value = torch.randn(3, heads, head_size).to(dtype)
    ops.cpu_attn_reshape_and_cache(
        key,
        value,
        key_cache,
        value_cache,
        slots,
        isa,
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype="auto",
    )
    keys, values = PagedKV.keys_of(kv, layout), PagedKV.values_of(kv, layout)
    for i, slot in enumerate(slots.tolist()):
        block, offset = slot // block_size, slot % block_size
        where = (torch.tensor([block]), slice(offset, offset + 1))
        assert torch.equal(keys.get(*where)[0, :, 0], key[i])
        assert torch.equal(values.get(*where)[0, :, 0], value[i])
        # A write through the accessor changes exactly that slot's key.
        before = kv.clone()
        keys.set(*where, (2 * key[i]).view(1, heads, 1, head_size))
        assert torch.equal(keys.get(*where)[0, :, 0], 2 * key[i])
        assert int((kv != before).sum()) == int((key[i] != 0).sum())
        assert torch.equal(values.get(*where)[0, :, 0], value[i])


def test_accessors_follow_an_arbitrary_packing():
    """The gather fallback, for packings that are not one strided view."""
    block_size, head_size, heads = 32, 64, 2
    page = 2 * block_size * head_size
    offsets = torch.randperm(page, generator=torch.Generator().manual_seed(0))[
        : block_size * head_size
    ]
    offsets = offsets.view(block_size, head_size)
    kv = torch.zeros(4, heads, block_size, 2 * head_size)
    keys = PagedKV(kv, offsets, page)
    assert keys.view is None
    data = torch.randn(2, heads, 3, head_size)
    blocks = torch.tensor([3, 1])
    keys.set(blocks, slice(5, 8), data)
    assert torch.equal(keys.get(blocks, slice(5, 8)), data)
    assert int((kv != 0).sum()) == data.numel()
    flat = kv.view(4, heads, page)
    assert torch.equal(flat[3, 1, offsets[6]], data[0, 1, 1])
