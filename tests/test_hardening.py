"""Ordinary requests and settings that must not break a streaming engine.

Each test here drives a real vLLM engine: seeded sampling over chunked
prefill, requests without ``max_tokens`` when streams have no length limit,
and start-up of the default multiprocess engine with a pool of thousands of
streams, or with a KV cache too small for one stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from vllm import SamplingParams

from vllm_sink_dev.engines import random_prompt, tiny_streaming_engine
from vllm_sink_dev.tiny_llama import TINY_MAX_POSITIONS

pytestmark = pytest.mark.engine


def sample(llm, prompt: list[int], params: SamplingParams) -> list[int]:
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids)


def test_seeded_sampling_does_not_depend_on_prefill_chunks(tiny_llama, engine_factory):
    """A seeded request samples the same tokens whether its prompt came in one chunk or four.

    vLLM samples (and drops) a token after every prefill chunk but the last;
    on CPU generators its rewind of that sample used to kill the engine. The
    prompt stays under sinks + window, so the chunking changes nothing else.
    """
    prompt = random_prompt(200, seed=5)
    seeded = SamplingParams(
        max_tokens=32, temperature=1.0, seed=1234, ignore_eos=True, detokenize=False
    )
    one_chunk = tiny_streaming_engine(engine_factory, tiny_llama, 4, 256, 32, 256)
    expected = sample(one_chunk, prompt, seeded)
    chunked = tiny_streaming_engine(engine_factory, tiny_llama, 4, 256, 32, 64)
    assert sample(chunked, prompt, seeded) == expected
    assert sample(chunked, prompt, seeded) == expected  # the engine lives on
    other_seed = SamplingParams(
        max_tokens=32, temperature=1.0, seed=4321, ignore_eos=True, detokenize=False
    )
    assert sample(chunked, prompt, other_seed) != expected  # the seed is what decides


def test_request_without_max_tokens_stops_at_the_models_context(tiny_llama, engine_factory):
    llm = tiny_streaming_engine(engine_factory, tiny_llama, 4, 252, 32, 256)
    prompt = random_prompt(100, seed=6)
    unset = SamplingParams(max_tokens=None, ignore_eos=True, detokenize=False)
    assert len(sample(llm, prompt, unset)) == TINY_MAX_POSITIONS
    # A request that names its length keeps it, past the context too.
    named = SamplingParams(max_tokens=TINY_MAX_POSITIONS + 100, ignore_eos=True, detokenize=False)
    assert len(sample(llm, prompt, named)) == TINY_MAX_POSITIONS + 100


START_UP = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, block_size=32,
              max_num_batched_tokens=32, max_num_seqs=32, skip_tokenizer_init=True,
              additional_config={"streaming_sinks": 4, "streaming_window": 32})
    cache = llm.llm_engine.vllm_config.cache_config
    out = llm.generate([{"prompt_token_ids": list(range(3, 300))}],
                       SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False))
    print("RESULT", json.dumps({"streams": cache.kv_cache_max_concurrency,
                      "tokens": len(out[0].outputs[0].token_ids)}))
    """
)


def in_multiprocess_engine(script: str, model, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``script`` run with ``model``'s path, in a process of its own with vLLM's default
    multiprocess engine (which tests otherwise turn off)."""
    return subprocess.run(
        [sys.executable, "-c", script, str(model)],
        env={**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_default_multiprocess_engine_starts_with_thousands_of_streams(tiny_llama):
    """vLLM sends ``max concurrency x max_model_len`` between processes as a 64-bit int."""
    done = in_multiprocess_engine(
        START_UP, tiny_llama, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["streams"] > 2_000
    assert result["tokens"] == 8


TOO_SMALL = textwrap.dedent(
    """
    import sys
    from vllm import LLM

    LLM(sys.argv[1], dtype="float32", enforce_eager=True, block_size=32,
        max_num_batched_tokens=96, skip_tokenizer_init=True, kv_cache_memory_bytes=200_000,
        additional_config={"streaming_sinks": 4, "streaming_window": 64})
    """
)


def test_a_kv_cache_too_small_for_one_stream_is_refused_saying_what_to_change(tiny_llama):
    """vLLM's own check would ask for room for ``max_model_len`` (the stream length limit)
    tokens, and say to lower it."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    done = in_multiprocess_engine(TOO_SMALL, tiny_llama, env)
    assert done.returncode != 0
    # The head block, the newest evicted block (held one eviction longer) and the window
    # blocks over at most 4 + 64 + 96 - 2 tokens (6 of 32 slots): 8 blocks of K and V,
    # 2 heads x 64 float32, in 2 layers.
    needed = 8 * 32 * 2 * 2 * 64 * 4 * 2 / 2**20
    assert f"one stream needs {needed:.1f} MiB of KV cache" in done.stderr, done.stderr[-3000:]
    assert "the KV cache has 0.2 MiB: raise VLLM_CPU_KVCACHE_SPACE" in done.stderr
    assert "decreasing `max_model_len`" not in done.stderr
