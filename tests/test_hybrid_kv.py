"""A hybrid model's sliding-window layers hold only their own window, under continuous batching.

The tiny Gemma 3 (two sliding-window layers of 64 tokens, one global layer)
streams with a window of 192: its sliding-window KV cache groups free each
block as soon as their window has passed it, while the global group keeps
sinks + window. Four streams share a pool that only just holds them, so the
blocks a sliding group frees are soon written by another stream: a worker
that wrote into a block its stream no longer holds (a head refill or a window
re-rotation) would show as a stream that parts from the torch reference.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.scheduler.kv_cache import StreamingSinkManager, StreamingSlidingManager
from vllm_sink_dev.engines import FP32_TOLERANCE, random_prompt, tiny_streaming_engine
from vllm_sink_dev.families import GEMMA3_TINY_SLIDING_WINDOW, build_tiny
from vllm_sink_dev.reference import StreamingLlamaReference
from vllm_sink_dev.schedule_log import ScheduleLog

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK = 4, 192, 32, 128


def test_sliding_groups_free_their_blocks_and_streams_match_the_reference(engine_factory, tmp_path):
    policy = SinkWindowPolicy(SINKS, WINDOW, BLOCK, CHUNK)
    sliding_bound = policy.sliding_max_resident_blocks(GEMMA3_TINY_SLIDING_WINDOW)
    per_stream = policy.max_resident_blocks + 2 * sliding_bound  # two sliding-window groups
    assert sliding_bound < policy.max_resident_blocks - 4
    model = build_tiny("gemma3", tmp_path / "gemma3", max_positions=512)
    llm = tiny_streaming_engine(
        engine_factory, model, SINKS, WINDOW, BLOCK, CHUNK,
        num_gpu_blocks_override=4 * per_stream + 1,
    )  # fmt: skip
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    log = ScheduleLog(scheduler)
    groups = scheduler.streaming.groups
    assert sorted(type(m).__name__ for m in groups) == [
        "StreamingSinkManager", "StreamingSlidingManager", "StreamingSlidingManager",
    ]  # fmt: skip
    sink = next(m for m in groups if isinstance(m, StreamingSinkManager))
    sliding = [m for m in groups if isinstance(m, StreamingSlidingManager)]
    pool = sink.block_pool
    free_at_start = pool.get_num_free_blocks()

    prompts = {
        r: random_prompt(n, seed=60 + i)
        for i, (r, n) in enumerate({"a": 400, "b": 650, "c": 250, "d": 520}.items())
    }
    max_tokens = {"a": 200, "b": 120, "c": 260, "d": 150}  # fmt: skip
    for req_id, prompt in prompts.items():
        params = SamplingParams(max_tokens=max_tokens[req_id], temperature=0, logprobs=0,
                                ignore_eos=True, detokenize=False)  # fmt: skip
        engine.add_request(req_id, {"prompt_token_ids": prompt}, params)
    outputs, held_less = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        figures = scheduler.streaming_figures()
        held = {m: {r: m.resident_blocks(r) for r in m.req_to_blocks} for m in groups}
        assert figures["resident_blocks"] == sum(sum(h.values()) for h in held.values())
        assert figures["blocks_per_stream_limit"] == per_stream
        for r, blocks in held[sink].items():
            assert blocks <= policy.max_resident_blocks
            for group in sliding:
                assert held[group][r] <= sliding_bound
                held_less += held[group][r] < blocks
    assert held_less > 100  # the sliding-window groups held fewer blocks, step after step
    assert all(group.num_evicted_blocks > sink.num_evicted_blocks for group in sliding)
    assert pool.get_num_free_blocks() == free_at_start  # nothing leaked

    ref = StreamingLlamaReference(model)
    for req_id, prompt in prompts.items():
        generated = list(outputs[req_id].outputs[0].token_ids)
        tokens = prompt + generated
        got = torch.tensor([d[t].logprob for d, t in zip(outputs[req_id].outputs[0].logprobs,
                                                         generated)])  # fmt: skip
        lives = log.lives(req_id)
        expected = ref.sampled_logprobs(tokens, len(prompt), lives, SINKS, WINDOW, BLOCK)
        errors = (got - expected).abs()
        print(f"{req_id}: max |logprob - reference| {errors.max():.2e} over {len(errors)} tokens")
        assert errors.max() < FP32_TOLERANCE, req_id
        assert max(n + k for n, k in log.of(req_id)) > SINKS + WINDOW + 2 * BLOCK  # evicted
