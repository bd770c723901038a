"""Streaming on a real vLLM engine, checked against the torch reference.

Every engine here is vLLM's own (offline ``LLM``, in-process, eager); only the
comparison side is ours (``vllm_sink_dev/reference.py``).
"""

from __future__ import annotations

import math

import pytest
from vllm import SamplingParams

from vllm_sink_dev.engines import kv_manager, random_prompt, streaming, tiny_streaming_engine
from vllm_sink_dev.stream_checks import (
    SMOLLM2_STREAM,
    assert_smollm2_streams_like_the_reference,
    assert_streams_like_the_reference,
    greedy,
    rebase_period,
    run,
    tokens_and_logprobs,
)
from vllm_sink_dev.tiny_llama import build_tiny_llama

pytestmark = pytest.mark.engine


def test_before_first_eviction_streaming_changes_nothing(tiny_llama, engine_factory):
    common = dict(
        dtype="float32", block_size=32, max_num_batched_tokens=64, skip_tokenizer_init=True
    )
    prompt = random_prompt(150, seed=1)  # 150 prompt + 100 generated < 4 sinks + 256 window
    dense_tokens, dense_lp = run(engine_factory(tiny_llama, **common), prompt, 100)
    stream = engine_factory(tiny_llama, **common, **streaming(4, 256))
    stream_tokens, stream_lp = run(stream, prompt, 100)
    assert stream_tokens == dense_tokens
    assert (stream_lp - dense_lp).abs().max() < 1e-5
    assert kv_manager(stream).num_evicted_blocks == 0


@pytest.mark.parametrize(
    "block,window,chunk,eager,rope_positions",
    [
        (32, 64, 96, True, None),
        (128, 128, 256, True, None),
        (32, 64, 96, False, None),
        (32, 64, 96, True, 256),
    ],
)
def test_tiny_llama_matches_reference_through_evictions(
    tiny_llama, tmp_path, engine_factory, block, window, chunk, eager, rope_positions
):
    """Prompt streaming (evictions between prefill chunks), then decode streaming.

    Also once with torch.compile (vLLM's default outside tests), and once with
    a RoPE table so short that the streams' RoPE offset wraps around every two
    evictions (the window re-rotated each time).
    """
    sinks, prompt_len, max_tokens = 4, 700, 300
    model = tiny_llama
    if rope_positions is not None:
        model = build_tiny_llama(tmp_path / "short_rope", max_positions=rope_positions)
    llm = tiny_streaming_engine(
        engine_factory, model, sinks, window, block, chunk, enforce_eager=eager
    )
    if rope_positions is not None:
        assert rebase_period(llm) == 2
    prompt = random_prompt(prompt_len, seed=2)
    assert_streams_like_the_reference(llm, model, prompt, max_tokens, sinks, window, block, chunk)


def test_tiny_llama_in_bfloat16_streams_within_its_rounding_noise(tiny_llama, engine_factory):
    """The 16-bit check the GPU backends without float32 (FLASH_ATTN, FLASHINFER) get."""
    sinks, window, block, chunk = 4, 64, 32, 96
    llm = tiny_streaming_engine(
        engine_factory, tiny_llama, sinks, window, block, chunk, dtype="bfloat16"
    )
    prompt = random_prompt(700, seed=3)
    assert_streams_like_the_reference(
        llm, tiny_llama, prompt, 300, sinks, window, block, chunk, "bfloat16"
    )


@pytest.mark.parametrize("block,dtype", [(32, "float32"), (128, "float32"), (128, "bfloat16")])
def test_smollm2_matches_reference_through_evictions(
    smollm2, handbook_tokens, engine_factory, block, dtype
):
    llm = engine_factory(
        smollm2,
        dtype=dtype,
        block_size=block,
        max_num_batched_tokens=SMOLLM2_STREAM["chunk"],
        **streaming(SMOLLM2_STREAM["sinks"], SMOLLM2_STREAM["window"]),
    )
    assert_smollm2_streams_like_the_reference(llm, smollm2, handbook_tokens, block, dtype)


def test_block_accounting_over_a_20k_token_stream(tiny_llama, engine_factory):
    sinks, window, block, chunk = 4, 64, 32, 256
    llm = tiny_streaming_engine(engine_factory, tiny_llama, sinks, window, block, chunk)
    manager = kv_manager(llm)
    pool = manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    # The bound stated in the README: head + held + window blocks.
    bound = 2 + math.ceil((sinks + window + chunk - 2) / block)
    run(llm, random_prompt(20_480, seed=3), max_tokens=200)
    assert manager.num_evicted_blocks >= 20_000 // block
    assert manager.peak_resident_blocks <= bound
    assert pool.get_num_free_blocks() == free_at_start

    # An aborted stream gives its blocks back too.
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=10_000, ignore_eos=True, detokenize=False)
    engine.add_request("aborted", {"prompt_token_ids": random_prompt(3000, seed=4)}, params)
    for _ in range(30):
        engine.step()
    assert pool.get_num_free_blocks() < free_at_start
    engine.abort_request(["aborted"])
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.get_num_free_blocks() == free_at_start


def test_concurrent_streams_are_isolated(tiny_llama, engine_factory):
    """8 streams joining and leaving at different times, each as if alone.

    Prefill chunks decide how much slack a prompt's queries get, so the token
    budget is set to fit each prompt in one chunk whether it runs alone or next
    to others: any difference left would be one stream seeing another's KV.
    """
    sinks, window, block = 4, 64, 32
    llm = tiny_streaming_engine(engine_factory, tiny_llama, sinks, window, block, 1024)
    lengths = [37, 150, 290, 512, 700, 64, 999, 5]
    max_tokens = [300, 50, 200, 120, 80, 260, 30, 150]
    prompts = [random_prompt(n, seed=10 + i) for i, n in enumerate(lengths)]
    alone = [run(llm, p, m) for p, m in zip(prompts, max_tokens)]

    engine = llm.llm_engine
    outputs, step = {}, 0
    pending = list(range(len(prompts)))
    while pending or engine.has_unfinished_requests():
        if pending and step % 7 == 0:  # a new stream joins every 7 steps
            i = pending.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, greedy(max_tokens[i]))
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = out
        step += 1
    assert kv_manager(llm).num_evicted_blocks > 0
    for i, (tokens_alone, logprobs_alone) in enumerate(alone):
        tokens, logprobs = tokens_and_logprobs(outputs[i], prompts[i])
        assert tokens == tokens_alone, f"stream {i}"
        assert (logprobs - logprobs_alone).abs().max() < 1e-4, f"stream {i}"
