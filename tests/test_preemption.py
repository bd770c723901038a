"""Streams preempted mid-flight and recomputed, checked against the torch reference.

vLLM preempts a running request when the block pool runs out, or when asked
to (``reset_prefix_cache(reset_running_requests=True)``, used here because it
is exact about when): the request's blocks are freed and its whole history is
recomputed as a prompt when it runs again. A resumed stream is a stream over
that history: every query, in each of a stream's lives, must see the sinks and
window the rule gives for the step that computed it.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from engine_helpers import FP32_TOLERANCE, kv_manager, random_prompt, tiny_streaming_engine
from vllm import SamplingParams

from vllm_sink_dev.reference import StreamingLlamaReference

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK = 4, 64, 32, 128


class ScheduleLog:
    """Every step's ``(tokens computed before, tokens computed)`` per request, in order."""

    def __init__(self, scheduler) -> None:
        self.steps: dict[str, list[tuple[int, int]]] = defaultdict(list)
        schedule = scheduler.schedule

        def logged_schedule(*args, **kwargs):
            output = schedule(*args, **kwargs)
            computed = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
            cached = output.scheduled_cached_reqs
            computed.update(zip(cached.req_ids, cached.num_computed_tokens))
            for req_id, count in output.num_scheduled_tokens.items():
                self.steps[req_id].append((computed[req_id], count))
            return output

        scheduler.schedule = logged_schedule  # observes; vLLM's method still does the work

    def internal_id(self, req_id: str) -> str:
        """vLLM's id of the request the caller named ``req_id`` (vLLM adds a suffix)."""
        (internal,) = (r for r in self.steps if r.rpartition("-")[0] == req_id)
        return internal

    def of(self, req_id: str) -> list[tuple[int, int]]:
        """The steps of the request the caller named ``req_id``."""
        return self.steps[self.internal_id(req_id)]

    def lives(self, req_id: str) -> list[list[tuple[int, int]]]:
        """The request's steps, split where it started again from token 0."""
        lives: list[list[tuple[int, int]]] = []
        for n, k in self.of(req_id):
            if n == 0:
                lives.append([])
            lives[-1].append((n, k))
        return lives


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
    ref = StreamingLlamaReference(tiny_llama)
    resumed = 0
    for req_id, prompt in prompts.items():
        generated = list(outputs[req_id].outputs[0].token_ids)
        assert len(generated) == max_tokens[req_id]
        tokens = prompt + generated
        got = torch.tensor([d[t].logprob for d, t in zip(outputs[req_id].outputs[0].logprobs,
                                                         generated)])  # fmt: skip
        lives = log.lives(req_id)
        resumed += len(lives) - 1
        expected = ref.sampled_logprobs(tokens, len(prompt), lives, SINKS, WINDOW, BLOCK)
        assert (got - expected).abs().max() < FP32_TOLERANCE, req_id
        assert max(n + k for n, k in log.of(req_id)) > SINKS + WINDOW + 2 * BLOCK  # evicted
    assert resumed >= 5  # a, b and c at the second reset; whichever ran at the first
