"""Streaming on an NVIDIA GPU against the torch reference (run by ``scripts/gpu_check.sh``).

Skipped where there is no CUDA device. Each supported backend, with CUDA graphs
on and off, streams a tiny Llama through evictions and window re-rotations
(blocks of 32, and of 128 where FlashInfer splits them into kernel blocks of 64),
and SmolLM2 in float32 and bfloat16; every per-token logprob is compared with the
reference, as the CPU tests do.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import random_prompt, streaming, tiny_streaming_engine
from test_engine_streaming import (
    FP32_TOLERANCE,
    assert_streams_like_the_reference,
    reference_logprobs,
    run,
)

from vllm_sink_dev.reference import StreamingLlamaReference

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs an NVIDIA GPU: scripts/gpu_check.sh"
    ),
]

BACKENDS = ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"]
SINKS, WINDOW, CHUNK = 4, 64, 96


@pytest.fixture(autouse=True)
def experimental_cuda(monkeypatch):
    monkeypatch.setenv("VLLM_SINK_EXPERIMENTAL_CUDA", "1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("block", [32, 128])
def test_tiny_llama_matches_the_reference(tiny_llama, engine_factory, backend, eager, block):
    window = WINDOW if block == 32 else 252
    llm = tiny_streaming_engine(
        engine_factory, tiny_llama, SINKS, window, block, CHUNK,
        attention_config={"backend": backend}, enforce_eager=eager,
        gpu_memory_utilization=0.3,
    )  # fmt: skip
    errors = assert_streams_like_the_reference(
        llm, tiny_llama, random_prompt(700, seed=3), 300, SINKS, window, block, CHUNK
    )
    print(f"{backend} eager={eager} block={block}: max error {errors.max():.2e}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_smollm2_matches_the_reference(smollm2, handbook_tokens, engine_factory, dtype, eager):
    sinks, window, block, chunk, prompt_len, max_tokens = 4, 252, 32, 128, 600, 150
    llm = engine_factory(
        smollm2, dtype=dtype, block_size=block, max_num_batched_tokens=chunk,
        enforce_eager=eager, gpu_memory_utilization=0.3, **streaming(sinks, window),
    )  # fmt: skip
    prompt = handbook_tokens[:prompt_len]
    generated, logprobs = run(llm, prompt, max_tokens)
    ref = StreamingLlamaReference(smollm2)
    tokens = prompt + generated
    errors = (
        logprobs - reference_logprobs(ref, tokens, sinks, window, block, prompt_len, chunk)
    ).abs()
    print(f"SmolLM2 {dtype} eager={eager}: mean {errors.mean():.2e}, max {errors.max():.2e}")
    if dtype == "float32":
        assert errors.max() < FP32_TOLERANCE
    else:
        assert errors.mean() < 0.05 and errors.max() < 0.6
