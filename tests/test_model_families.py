"""Model families other than Llama, streamed through evictions, against the torch reference.

SmolLM2's weights re-hosted as Mistral, Qwen2 and Phi-3 checkpoints
(:mod:`vllm_sink_dev.families`) run each family's own vLLM model code (Qwen2's
q/k/v biases, Phi-3's fused projections) and must give, token by token, the
logprobs of the Llama reference on the original weights. Tiny random Qwen3
(q/k norms), StableLM (partial rotary), GPT-J (interleaved rotary), Gemma 3
(sliding-window layers as wide as the streaming window, then a global layer,
each kind with its RoPE base) and RoPE-scaled Llama checkpoints run with a
RoPE table so short that the window is re-rotated every few evictions.
"""

from __future__ import annotations

import functools

import pytest
import torch

from vllm_sink_dev.engines import (
    FP32_TOLERANCE,
    kv_manager,
    random_prompt,
    streaming,
    tiny_streaming_engine,
)
from vllm_sink_dev.families import FAMILIES, build_tiny, rehost
from vllm_sink_dev.reference import StreamingLlamaReference
from vllm_sink_dev.stream_checks import (
    assert_streams_like_the_reference,
    rebase_period,
    reference_logprobs,
    run,
)
from vllm_sink_dev.tiny_llama import build_tiny_llama

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK, PROMPT, MAX_TOKENS = 4, 252, 32, 128, 600, 150


@functools.cache
def reference(smollm2) -> StreamingLlamaReference:
    return StreamingLlamaReference(smollm2)


@functools.cache
def expected(smollm2, tokens: tuple[int, ...]):
    ref = reference(smollm2)
    return reference_logprobs(ref, list(tokens), SINKS, WINDOW, BLOCK, PROMPT, CHUNK)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_the_llama_reference_through_evictions(
    family, smollm2, handbook_tokens, engine_factory, tmp_path_factory
):
    model = rehost(smollm2, family, tmp_path_factory.mktemp(family) / f"SmolLM2-as-{family}")
    llm = engine_factory(
        model,
        dtype="float32",
        block_size=BLOCK,
        max_num_batched_tokens=CHUNK,
        **streaming(SINKS, WINDOW),
    )
    architecture = llm.llm_engine.model_config.architectures[0]
    assert architecture.lower().startswith(family)  # the family's own vLLM model class
    prompt = handbook_tokens[:PROMPT]
    generated, logprobs = run(llm, prompt, MAX_TOKENS)
    errors = (logprobs - expected(smollm2, tuple(prompt + generated))).abs()
    print(f"{family}: max |logprob - reference| {errors.max():.2e} over {len(errors)} tokens")
    assert errors.max() < FP32_TOLERANCE


@pytest.mark.parametrize("family", ["qwen3", "stablelm", "gptj", "gemma3"])
def test_tiny_family_matches_the_reference_through_window_re_rotations(
    family, engine_factory, tmp_path
):
    sinks, window, block, chunk, prompt_len, max_tokens = 4, 64, 32, 96, 700, 300
    model = build_tiny(family, tmp_path / family, max_positions=256)
    llm = tiny_streaming_engine(engine_factory, model, sinks, window, block, chunk)
    architecture = llm.llm_engine.model_config.architectures[0]
    assert architecture.lower().startswith(family)
    assert rebase_period(llm) == 2
    prompt = random_prompt(prompt_len, seed=3)
    errors = assert_streams_like_the_reference(
        llm, model, prompt, max_tokens, sinks, window, block, chunk
    )
    print(f"{family}: max |logprob - reference| {errors.max():.2e} over {len(errors)} tokens")


ROPE_SCALINGS = {
    # LongRoPE's short factors: the streaming cache fits its original context.
    "longrope": {
        "short_factor": [1.0 + 0.1 * i for i in range(32)],
        "long_factor": [8.0] * 32,
        "original_max_position_embeddings": 256,
    },
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def tiny_scaled_llama(scaling: str, tmp_path):
    """The tiny Llama with ``scaling``; a RoPE table of 256 positions (LongRoPE's short one)."""
    rope = {"rope_type": scaling, "rope_theta": 10000.0, **ROPE_SCALINGS[scaling]}
    positions = 1024 if scaling == "longrope" else 256
    return build_tiny_llama(tmp_path / scaling, max_positions=positions, rope_parameters=rope)


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_the_reference_through_window_re_rotations(
    scaling, engine_factory, tmp_path
):
    """Positions within the cache get the scaled rotation of those positions: the table
    of each scaling is fixed per position (vLLM's dynamic NTK is computed once, for the
    model's context; LongRoPE's short table serves a cache within the original
    context), so a window re-rotation moves keys along the same table."""
    sinks, window, block, chunk, prompt_len, max_tokens = 4, 64, 32, 96, 600, 200
    model = tiny_scaled_llama(scaling, tmp_path)
    ref = StreamingLlamaReference(model)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    scaled = ref.rope_scale != 1.0 or not torch.allclose(ref.inv_freq, plain)
    assert scaled == (scaling != "dynamic")  # dynamic NTK is plain RoPE within the context
    llm = tiny_streaming_engine(engine_factory, model, sinks, window, block, chunk)
    prompt = random_prompt(prompt_len, seed=4)
    errors = assert_streams_like_the_reference(
        llm, model, prompt, max_tokens, sinks, window, block, chunk
    )
    # Linear scaling's table is factor times longer: its offset wraps less often.
    assert kv_manager(llm).num_evicted_blocks >= 2 * rebase_period(llm)
    print(f"{scaling}: max |logprob - reference| {errors.max():.2e} over {len(errors)} tokens")


@pytest.mark.parametrize(
    "family", ["qwen3", "stablelm", "gptj", "gemma3", "yarn", "llama3", "longrope"]
)
def test_the_reference_is_the_plain_model_while_nothing_is_evicted(family, tmp_path):
    """The oracle itself: with the whole text in its window, its logits are transformers'."""
    if family in ROPE_SCALINGS:
        model = tiny_scaled_llama(family, tmp_path)
    else:
        model = build_tiny(family, tmp_path / family, max_positions=256)
    ref = StreamingLlamaReference(model)
    tokens = random_prompt(200, seed=5)
    with torch.no_grad():
        plain = ref.model(torch.tensor([tokens])).logits[0].float()
    assert (ref.logits(tokens, 4, [4] * len(tokens)) - plain).abs().max() < 1e-4


def test_gemma3_matches_the_reference_through_evictions(gemma3, engine_factory):
    """Gemma 3 270M: sliding-window layers of 512 tokens beside global ones, each kind
    with its RoPE base; the streaming window holds a whole sliding window."""
    from transformers import AutoTokenizer

    from vllm_sink_dev.paths import TEXT

    sinks, window, block, chunk, prompt_len, max_tokens = 4, 512, 32, 128, 1100, 100
    tokenizer = AutoTokenizer.from_pretrained(gemma3)
    prompt = tokenizer(TEXT.read_text()[:20_000])["input_ids"][:prompt_len]
    assert prompt[0] == tokenizer.bos_token_id
    llm = engine_factory(
        gemma3,
        dtype="float32",
        block_size=block,
        max_num_batched_tokens=chunk,
        **streaming(sinks, window),
    )
    errors = assert_streams_like_the_reference(
        llm, gemma3, prompt, max_tokens, sinks, window, block, chunk
    )
    print(f"gemma3 270M: max |logprob - reference| {errors.max():.2e} over {len(errors)} tokens")
