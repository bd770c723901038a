"""Which models can stream, decided from the model's config before any engine process starts.

StreamingLLM gives every cached token a position *within the cache*, and moves
a stream's keys when its window moves. With RoPE a cached key moves by a
rotation (:mod:`vllm_sink.core.rerotation`). Other position schemes cannot be
streamed this way, or not yet; each refusal says why.
"""

from __future__ import annotations

from typing import Any

ALIBI_MODEL_TYPES = frozenset({"bloom", "mpt"})
LEARNED_POSITION_MODEL_TYPES = frozenset(
    {"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt", "xglm"}
)

ALIBI = (
    "ALiBi attention biases, which vllm-sink does not stream yet (each bias would have to "
    "come from the distance within the cache, not within the text)"
)
LEARNED_POSITIONS = (
    "learned absolute position embeddings, added to its inputs: every cached key carries its "
    "position in the text, and no rotation can move it within the cache"
)


def uses_alibi(text_config: Any) -> bool:
    attn_config = getattr(text_config, "attn_config", None)
    mpt_alibi = (
        attn_config.get("alibi") if isinstance(attn_config, dict)
        else getattr(attn_config, "alibi", False)
    )  # fmt: skip
    return (
        text_config.model_type in ALIBI_MODEL_TYPES
        or bool(getattr(text_config, "alibi", False))
        or bool(mpt_alibi)
    )


def uses_rope(text_config: Any) -> bool:
    return bool(
        getattr(text_config, "rope_parameters", None)
        or getattr(text_config, "rope_theta", None)
        or getattr(text_config, "rotary_dim", None)  # GPT-J, CodeGen
    )


def model_refusal(model_config: Any) -> str | None:
    """What keeps the model (a vLLM ``ModelConfig``) from streaming; ``None`` if nothing."""
    text_config = model_config.hf_text_config
    problems = {
        ALIBI: uses_alibi(text_config),
        LEARNED_POSITIONS: text_config.model_type in LEARNED_POSITION_MODEL_TYPES,
        "no rotary position embedding": not uses_rope(text_config),
        "MLA attention": model_config.use_mla,
        "hybrid (attention + state-space) layers": model_config.is_hybrid,
        "multimodal M-RoPE": model_config.uses_mrope,
        "dual-chunk attention": bool(getattr(text_config, "dual_chunk_attention_config", None)),
    }
    return next((problem for problem, present in problems.items() if present), None)


def sliding_window(text_config: Any) -> int | None:
    """The window of the model's sliding-window layers; ``None`` if it has none."""
    if getattr(text_config, "use_sliding_window", True) is False:  # Qwen2 & co.
        return None
    window = getattr(text_config, "sliding_window", None)
    return int(window) if window else None


def window_refusal(model_config: Any, streaming_window: int) -> str | None:
    """Why the streaming window cannot serve the model's sliding-window layers, if it cannot.

    A sliding-window layer attends, within the stream, the last tokens of its
    window; the streaming window must hold all of them, which also keeps the
    sinks out of reach of those layers, as they were in training.
    """
    window = sliding_window(model_config.hf_text_config)
    if window is None or window <= streaming_window:
        return None
    return (
        f"the model's sliding-window layers attend the last {window} tokens; set "
        f"--streaming-window to at least {window} so that each keeps its whole window"
    )
