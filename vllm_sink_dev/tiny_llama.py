"""A small random-weight Llama checkpoint for fast engine tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_MAX_POSITIONS = 2048

TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.08,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
"""Shared by the tiny checkpoints of every family: 4 query heads of 64 dims, 2 KV heads."""


def build_tiny_llama(
    path: Path,
    seed: int = 0,
    max_positions: int = TINY_MAX_POSITIONS,
    rope_parameters: dict | None = None,
) -> Path:
    """Write a 2-layer Llama (4 query / 2 KV heads of 64 dims) to ``path``.

    Weights are larger than a trained model's init so that attention is far
    from uniform: a key at the wrong position or a missing sink changes the
    logits visibly. ``rope_parameters``: a RoPE scaling, as transformers takes it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    config = LlamaConfig(
        **TINY_SHAPE,
        head_dim=64,
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path
