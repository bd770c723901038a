"""Checkpoints of model families beyond Llama, built here (no model hub).

* :func:`rehost`: SmolLM2's weights in other families' classes, an exact
  oracle for each. A Llama checkpoint is also a Mistral (no sliding window), a
  Qwen2 (with zero q/k/v biases) and a Phi-3 (q/k/v and gate/up fused into one
  projection each): the same weights give the same logits under each family's
  vLLM model code, so the reference on the Llama weights checks every one.
* :func:`build_tiny`: small random-weight checkpoints of families no real
  checkpoint here covers (Qwen3's q/k norms, StableLM's partial rotary dims,
  GPT-J's rotary on interleaved pairs, Gemma 3's sliding-window and global
  layers with a RoPE base each).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_sink_dev.tiny_llama import TINY_SHAPE

Weights = dict[str, torch.Tensor]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _as_mistral(config: dict, weights: Weights) -> tuple[dict, Weights]:
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    return config, weights


def _as_qwen2(config: dict, weights: Weights) -> tuple[dict, Weights]:
    config.update(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=config["num_hidden_layers"],
    )
    out = dict(weights)
    for name, tensor in weights.items():
        for proj in ("q_proj", "k_proj", "v_proj"):
            if name.endswith(f"self_attn.{proj}.weight"):
                out[name.removesuffix("weight") + "bias"] = torch.zeros(
                    tensor.shape[0], dtype=tensor.dtype
                )
    return config, out


def _as_phi3(config: dict, weights: Weights) -> tuple[dict, Weights]:
    config.update(
        architectures=["Phi3ForCausalLM"],
        model_type="phi3",
        original_max_position_embeddings=config["max_position_embeddings"],
        partial_rotary_factor=1.0,
        rope_scaling=None,
        sliding_window=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    out: Weights = {}
    for name, tensor in weights.items():
        if ".self_attn.q_proj." in name:
            prefix = name.removesuffix("q_proj.weight")
            out[prefix + "qkv_proj.weight"] = torch.cat(
                [weights[prefix + f"{p}_proj.weight"] for p in "qkv"]
            )
        elif ".mlp.gate_proj." in name:
            prefix = name.removesuffix("gate_proj.weight")
            out[prefix + "gate_up_proj.weight"] = torch.cat(
                [weights[prefix + "gate_proj.weight"], weights[prefix + "up_proj.weight"]]
            )
        elif not any(f".{p}." in name for p in ("k_proj", "v_proj", "up_proj")):
            out[name] = tensor
    return config, out


FAMILIES: dict[str, Callable[[dict, Weights], tuple[dict, Weights]]] = {
    "mistral": _as_mistral,
    "qwen2": _as_qwen2,
    "phi3": _as_phi3,
}


def rehost(llama: Path, family: str, path: Path) -> Path:
    """Write the Llama checkpoint ``llama`` to ``path`` as a ``family`` checkpoint."""
    from safetensors.torch import load_file, save_file

    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((llama / "config.json").read_text())
    config, weights = FAMILIES[family](config, load_file(llama / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "model.safetensors")
    for name in TOKENIZER_FILES:
        if (llama / name).exists():
            shutil.copy(llama / name, path / name)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


GEMMA3_TINY_SLIDING_WINDOW = 64


def build_tiny(family: str, path: Path, max_positions: int = 2048, seed: int = 0) -> Path:
    """A small random-weight ``family`` checkpoint (qwen3, stablelm, gptj, gemma3) at ``path``."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPTJConfig,
        GPTJForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        StableLmConfig,
        StableLmForCausalLM,
    )

    if (path / "config.json").exists():
        return path
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if family == "qwen3":
        config = Qwen3Config(
            **TINY_SHAPE, head_dim=64, max_position_embeddings=max_positions, rope_parameters=rope
        )
        model_class = Qwen3ForCausalLM
    elif family == "stablelm":  # rotary on a quarter of each head (16 of 64 dims)
        config = StableLmConfig(
            **TINY_SHAPE,
            max_position_embeddings=max_positions,
            rope_parameters={**rope, "partial_rotary_factor": 0.25},
        )
        model_class = StableLmForCausalLM
    elif family == "gptj":  # rotary on interleaved pairs of the first 32 of 64 dims
        shape = TINY_SHAPE
        config = GPTJConfig(
            vocab_size=shape["vocab_size"],
            n_embd=shape["hidden_size"],
            n_inner=shape["intermediate_size"],
            n_layer=shape["num_hidden_layers"],
            n_head=shape["num_attention_heads"],
            rotary_dim=32,
            n_positions=max_positions,
            initializer_range=shape["initializer_range"],
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        model_class = GPTJForCausalLM
    elif family == "gemma3":  # two sliding-window layers (64 tokens), then a global one
        config = Gemma3TextConfig(
            **{**TINY_SHAPE, "num_hidden_layers": 3, "tie_word_embeddings": True},
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=GEMMA3_TINY_SLIDING_WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            max_position_embeddings=max_positions,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
            pad_token_id=0,
        )
        model_class = Gemma3ForCausalLM
    else:
        raise ValueError(f"no tiny {family} checkpoint")
    torch.manual_seed(seed)
    model_class(config).to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path
