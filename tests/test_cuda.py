"""Streaming on an NVIDIA GPU against the torch reference (run by ``scripts/gpu_check.sh``).

Skipped where there is no CUDA device. Each supported backend, in each dtype it
takes (FLASH_ATTN and FLASHINFER take 16-bit only), with CUDA graphs on and off,
streams a tiny Llama through evictions and window re-rotations (blocks of 32, and
of 128 where FlashInfer splits them into kernel blocks of 64), and SmolLM2 in
float32 and bfloat16; every per-token logprob is compared with the reference, as
the CPU tests do (16-bit engines within their own rounding noise:
``assert_within_precision``).
"""

from __future__ import annotations

import pytest
import torch

from vllm_sink_dev.engines import random_prompt, streaming, tiny_streaming_engine
from vllm_sink_dev.stream_checks import (
    SMOLLM2_STREAM,
    assert_smollm2_streams_like_the_reference,
    assert_streams_like_the_reference,
)

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs an NVIDIA GPU: scripts/gpu_check.sh"
    ),
]

BACKEND_DTYPES = [("FLASH_ATTN", "bfloat16"), ("FLASHINFER", "bfloat16"),
                  ("TRITON_ATTN", "float32"), ("TRITON_ATTN", "bfloat16")]  # fmt: skip
SINKS, WINDOW, CHUNK = 4, 64, 96


@pytest.fixture(autouse=True)
def experimental_cuda(monkeypatch):
    monkeypatch.setenv("VLLM_SINK_EXPERIMENTAL_CUDA", "1")


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("block", [32, 128])
def test_tiny_llama_matches_the_reference(tiny_llama, engine_factory, backend, dtype, eager, block):
    window = WINDOW if block == 32 else 252
    llm = tiny_streaming_engine(
        engine_factory, tiny_llama, SINKS, window, block, CHUNK, dtype=dtype,
        attention_config={"backend": backend}, enforce_eager=eager,
        gpu_memory_utilization=0.3,
    )  # fmt: skip
    errors = assert_streams_like_the_reference(
        llm, tiny_llama, random_prompt(700, seed=3), 300, SINKS, window, block, CHUNK, dtype
    )
    print(
        f"{backend} {dtype} eager={eager} block={block}: "
        f"mean {errors.mean():.2e}, max error {errors.max():.2e}"
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_smollm2_matches_the_reference(smollm2, handbook_tokens, engine_factory, dtype, eager):
    block = 32
    llm = engine_factory(
        smollm2, dtype=dtype, block_size=block, max_num_batched_tokens=SMOLLM2_STREAM["chunk"],
        enforce_eager=eager, gpu_memory_utilization=0.3,
        **streaming(SMOLLM2_STREAM["sinks"], SMOLLM2_STREAM["window"]),
    )  # fmt: skip
    errors = assert_smollm2_streams_like_the_reference(llm, smollm2, handbook_tokens, block, dtype)
    print(f"SmolLM2 {dtype} eager={eager}: mean {errors.mean():.2e}, max {errors.max():.2e}")
