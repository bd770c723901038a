"""Streams preempted mid-flight and recomputed, checked against the torch reference.

vLLM preempts a running request when the block pool runs out (under the priority
policy, the lowest-priority one), or when asked to
(``reset_prefix_cache(reset_running_requests=True)``, exact about when): the
request's blocks are freed and its whole history is recomputed as a prompt when
it runs again. A resumed stream is a stream over that history: every query, in
each of a stream's lives, must see the sinks and window the rule gives for the
step that computed it.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from vllm_sink_dev.engines import FP32_TOLERANCE, kv_manager, random_prompt, tiny_streaming_engine
from vllm_sink_dev.reference import StreamingLlamaReference
from vllm_sink_dev.schedule_log import ScheduleLog

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK = 4, 64, 32, 128


def test_preempted_streams_resume_as_the_reference_says(tiny_llama, engine_factory):
    llm = tiny_streaming_engine(engine_factory, tiny_llama, SINKS, WINDOW, BLOCK, CHUNK)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    pool = kv_manager(llm).block_pool
    free_at_start = pool.get_num_free_blocks()

    prompts = {"a": random_prompt(300, seed=31), "b": random_prompt(520, seed=32),
               "c": random_prompt(90, seed=33)}  # fmt: skip
    max_tokens = {"a": 260, "b": 200, "c": 240}
    params = {
        r: SamplingParams(max_tokens=m, temperature=0, logprobs=0, ignore_eos=True,
                          detokenize=False)
        for r, m in max_tokens.items()
    }  # fmt: skip
    outputs, step = {}, 0
    for req_id in prompts:
        engine.add_request(req_id, {"prompt_token_ids": prompts[req_id]}, params[req_id])
    while engine.has_unfinished_requests():
        if step in (6, 90):  # mid-prefill of b, then all three decoding past eviction
            assert engine.reset_prefix_cache(reset_running_requests=True)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        step += 1

    assert pool.get_num_free_blocks() == free_at_start  # nothing leaked
    for req_id in prompts:
        assert len(outputs[req_id].outputs[0].token_ids) == max_tokens[req_id]
        assert max(n + k for n, k in log.of(req_id)) > SINKS + WINDOW + 2 * BLOCK  # evicted
    lives = assert_every_life_streams_like_the_reference(tiny_llama, prompts, outputs, log)
    assert sum(lives.values()) - len(lives) >= 5  # a, b, c at the second reset; some at the first


def assert_every_life_streams_like_the_reference(model, prompts, outputs, log) -> dict[str, int]:
    """Each output logprob is the reference's for the step that computed it, in each of
    the stream's lives. The number of lives per request."""
    ref = StreamingLlamaReference(model)
    lives_per_request = {}
    for req_id, prompt in prompts.items():
        generated = list(outputs[req_id].outputs[0].token_ids)
        got = torch.tensor([d[t].logprob for d, t in zip(outputs[req_id].outputs[0].logprobs,
                                                         generated)])  # fmt: skip
        lives = log.lives(req_id)
        lives_per_request[req_id] = len(lives)
        tokens = prompt + generated
        expected = ref.sampled_logprobs(tokens, len(prompt), lives, SINKS, WINDOW, BLOCK)
        assert (got - expected).abs().max() < FP32_TOLERANCE, req_id
    return lives_per_request


def test_priority_scheduling_preempts_the_last_stream_in_priority(tiny_llama, engine_factory):
    """Under ``--scheduling-policy priority`` on a pool too small for four streams, vLLM
    preempts the lowest-priority one (the largest value) past its first eviction; it
    resumes as the reference says."""
    llm = tiny_streaming_engine(
        engine_factory, tiny_llama, SINKS, WINDOW, BLOCK, CHUNK,
        scheduling_policy="priority", num_gpu_blocks_override=20,  # 9 blocks per stream
    )  # fmt: skip
    engine = llm.llm_engine
    log = ScheduleLog(engine.engine_core.engine_core.scheduler)
    pool = kv_manager(llm).block_pool
    free_at_start = pool.get_num_free_blocks()
    prompts = {f"r{k}": random_prompt(200 + 61 * k, seed=40 + k) for k in range(4)}
    params = SamplingParams(max_tokens=250, temperature=0, logprobs=0, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    for k, req_id in enumerate(prompts):  # r0 is the last in priority
        engine.add_request(req_id, {"prompt_token_ids": prompts[req_id]}, params, priority=3 - k)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((out.request_id, out) for out in engine.step() if out.finished)
    assert pool.get_num_free_blocks() == free_at_start
    lives = assert_every_life_streams_like_the_reference(tiny_llama, prompts, outputs, log)
    assert lives["r0"] >= 2 and lives["r3"] == 1, lives
    first_life = log.lives("r0")[0]
    assert max(n + k for n, k in first_life) > SINKS + WINDOW + BLOCK  # preempted past eviction
