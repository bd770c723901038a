"""A start-up check that evictions move keys where attention reads them, as RoPE would.

Before serving, one block of the first layer of each KV cache group gets keys and
values written by the layer's own attention backend (the path a forward pass takes:
:func:`~vllm_sink.worker.vllm_runner.write_kv_as_forward`), the keys rotated to
positions ``d .. d + B - 1`` by the model's own rotary module. The worker's view of
that layer must read them back, and a re-rotation by ``-d`` through that view must
give the keys the rotary module computes at ``0 .. B - 1``. A wrong assumption about
a backend's layout or a model's rotary style then stops start-up with the reason
instead of giving wrong text. It costs one block per group and milliseconds; the
block is restored afterwards.
"""

from __future__ import annotations

import torch

from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.worker.eviction import SlotAccess
from vllm_sink.worker.vllm_runner import write_kv_as_forward


class CacheCheckError(RuntimeError):
    """The KV cache does not behave as the eviction code assumes."""


def check_eviction_in_cache(
    layer: torch.nn.Module,
    rotary: torch.nn.Module,
    keys: SlotAccess,
    values: SlotAccess,
    rope: RopeDeltas,
    block_id: int,
    block_size: int,
) -> None:
    """Raise :class:`CacheCheckError` unless a re-rotation in ``layer``'s cache is right.

    ``layer``: vLLM's ``Attention`` module (its ``impl``, ``kv_cache``, heads);
    ``rotary``: the rotary module that rotates its keys.
    """
    cache = layer.kv_cache
    heads, head_size = layer.num_kv_heads, layer.head_size
    device, dtype = cache.device, cache.dtype
    shift = min(block_size, len(rope.cos) - block_size)
    block = torch.tensor([block_id], device=device)
    saved = keys.get(block), values.get(block)
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(block_size, heads * head_size, generator=generator).to(device, dtype)
    value = torch.randn(block_size, heads, head_size, generator=generator).to(device, dtype)
    slots = torch.arange(block_size, device=device)
    at_shift, at_zero = (_rotated(rotary, raw, slots + start) for start in (shift, 0))
    try:
        write_kv_as_forward(layer, at_shift, value, block_id * block_size + slots)
        _expect("written keys", _slot_major(keys.get(block)), at_shift)
        _expect("written values", _slot_major(values.get(block)), value)
        moves = torch.tensor([shift], device=device)
        keys.set(block, slice(None), rope.rotate_back(keys.get(block).float(), moves))
        _expect(f"keys re-rotated by -{shift}", _slot_major(keys.get(block)), at_zero)
    finally:
        keys.set(block, slice(None), saved[0])
        values.set(block, slice(None), saved[1])


def _rotated(rotary: torch.nn.Module, raw: torch.Tensor, positions: torch.Tensor):
    """``raw`` keys ``[tokens, heads * head_size]`` at ``positions``, by ``rotary`` itself."""
    _, key = rotary(positions, raw.clone(), raw.clone())
    return key.view(len(positions), -1, rotary.head_size)


def _slot_major(blocks: torch.Tensor) -> torch.Tensor:
    """``[1, heads, slots, head_size]`` -> ``[slots, heads, head_size]``."""
    return blocks[0].transpose(0, 1)


def _expect(what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.float().abs().max().clamp(min=1e-6)
    error = float((got.float() - expected.float()).abs().max() / scale)
    if error > max(1e-3, 8 * torch.finfo(expected.dtype).eps):  # a misplaced key is off by ~1
        raise CacheCheckError(f"{what} differ from the expected ones by {error:.2e} of their scale")
