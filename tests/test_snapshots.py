"""A request that continues a finished stream resumes it (a snapshot) instead of streaming again.

Checked against the torch reference: a resumed stream must be the same stream
continued, every token of the new request seeing the sinks and window that one
uninterrupted stream over the same tokens, with the same steps, would see.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import FP32_TOLERANCE, random_prompt, tiny_streaming_engine
from test_preemption import ScheduleLog
from vllm import SamplingParams

from vllm_sink_dev.reference import StreamingLlamaReference, window_starts_of_steps

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK = 4, 64, 32, 128


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True, detokenize=False
    )


def run(engine, requests: dict[str, list[int]], max_tokens: int) -> dict[str, list]:
    """Serve ``requests`` together; each request's generated tokens and their logprobs."""
    for req_id, prompt in requests.items():
        engine.add_request(req_id, {"prompt_token_ids": prompt}, greedy(max_tokens))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                completion = out.outputs[0]
                logprobs = [d[t].logprob for d, t in zip(completion.logprobs, completion.token_ids)]
                done[out.request_id] = (list(completion.token_ids), logprobs)
    return done


def expected_logprobs(ref, tokens, steps, generated_from: int) -> torch.Tensor:
    """The reference's logprob of each token from ``generated_from`` on, for these steps."""
    table = ref.logprobs(tokens, SINKS, window_starts_of_steps(steps, SINKS, WINDOW, BLOCK))
    return torch.tensor(
        [table[p - 1, tokens[p]].item() for p in range(generated_from, len(tokens))]
    )


@pytest.fixture
def engine(tiny_model, engine_factory):
    llm = tiny_streaming_engine(engine_factory, tiny_model, SINKS, WINDOW, BLOCK, CHUNK)
    return llm.llm_engine


def test_next_turn_resumes_the_stream_as_one_uninterrupted_stream(engine, tiny_model):
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    pool = core.scheduler.streaming.block_pool
    free_at_start = pool.get_num_free_blocks()
    hits_before = core.scheduler.snapshot_hits

    first = random_prompt(300, seed=41)
    out1, _ = run(engine, {"t1": first}, 150)["t1"]
    second = first + out1 + random_prompt(40, seed=42)
    out2, got = run(engine, {"t2": second}, 120)["t2"]

    steps1, steps2 = log.of("t1"), log.of("t2")
    computed_by_t1 = len(first) + len(out1) - 1  # the last sampled token has no KV yet
    assert steps2[0][0] == computed_by_t1  # resumed: prefilled only the rest
    assert core.scheduler.snapshot_hits == hits_before + 1
    ref = StreamingLlamaReference(tiny_model)
    expected = expected_logprobs(ref, second + out2, steps1 + steps2, len(second))
    assert (torch.tensor(got) - expected).abs().max() < FP32_TOLERANCE
    assert computed_by_t1 > SINKS + WINDOW + 4 * BLOCK  # the first turn evicted
    assert pool.get_num_free_blocks() == free_at_start  # snapshots' blocks count as free


def test_a_snapshot_serves_one_request_and_shared_prefixes_stay_apart(engine, tiny_model):
    """Two conversations share their opening; two requests continue one of them at once."""
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    opening = random_prompt(200, seed=51)
    firsts = {
        "x1": opening + random_prompt(30, seed=52),
        "y1": opening + random_prompt(30, seed=53),
    }
    outs = run(engine, firsts, 100)
    hits_before = core.scheduler.snapshot_hits
    seconds = {
        "x2": firsts["x1"] + outs["x1"][0] + random_prompt(20, seed=54),
        "y2": firsts["y1"] + outs["y1"][0] + random_prompt(20, seed=55),
        "x2-again": firsts["x1"] + outs["x1"][0] + random_prompt(20, seed=54),
    }
    outs2 = run(engine, seconds, 60)
    assert core.scheduler.snapshot_hits == hits_before + 2  # x2 or x2-again, and y2

    ref = StreamingLlamaReference(tiny_model)
    resumed = 0
    for req_id, prompt in seconds.items():
        steps = log.of(req_id)
        if steps[0][0]:  # continued its first turn's stream
            resumed += 1
            steps = log.of(req_id[0] + "1") + steps
        generated, got = outs2[req_id]
        expected = expected_logprobs(ref, prompt + generated, steps, len(prompt))
        assert (torch.tensor(got) - expected).abs().max() < FP32_TOLERANCE, req_id
    assert resumed == 2


def test_preempted_or_aborted_resumed_requests_lose_nothing(engine, tiny_model):
    """A resumed stream preempted mid-flight recomputes its whole history; one aborted
    leaves its stream for the next request; no block leaks."""
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    pool = core.scheduler.streaming.block_pool
    free_at_start = pool.get_num_free_blocks()
    ref = StreamingLlamaReference(tiny_model)

    first = random_prompt(300, seed=71)
    out1, _ = run(engine, {"t1": first}, 150)["t1"]

    # t2 continues t1 and is preempted (with a plain request beside it) while decoding.
    second = first + out1 + random_prompt(40, seed=72)
    engine.add_request("t2", {"prompt_token_ids": second}, greedy(120))
    engine.add_request("u", {"prompt_token_ids": random_prompt(200, seed=73)}, greedy(100))
    finished, step = {}, 0
    while engine.has_unfinished_requests():
        if step == 30:
            assert engine.reset_prefix_cache(reset_running_requests=True)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
        step += 1
    out2 = list(finished["t2"].token_ids)
    got2 = [d[t].logprob for d, t in zip(finished["t2"].logprobs, out2)]
    steps2 = log.of("t2")
    restart = next(i for i, (n, _) in enumerate(steps2) if n == 0)
    lives = [log.of("t1") + steps2[:restart], steps2[restart:]]
    assert steps2[0][0] > 0 and lives[0][-1][0] > len(second)  # resumed, preempted decoding
    expected = ref.sampled_logprobs(second + out2, len(second), lives, SINKS, WINDOW, BLOCK)
    assert (torch.tensor(got2) - expected).abs().max() < FP32_TOLERANCE

    # t3 continues t2 and is aborted after 20 tokens; t4 continues what t3 had sent.
    third = second + out2 + random_prompt(30, seed=74)
    engine.add_request("t3", {"prompt_token_ids": third}, greedy(1000))
    sent: list[int] = []
    while len(sent) < 20:
        for out in engine.step():
            sent = list(out.outputs[0].token_ids)
    engine.abort_request([log.internal_id("t3")], internal=True)
    assert not engine.has_unfinished_requests()
    hits_before = core.scheduler.snapshot_hits
    fourth = third + sent + random_prompt(20, seed=75)
    out4, got4 = run(engine, {"t4": fourth}, 60)["t4"]
    assert core.scheduler.snapshot_hits == hits_before + 1
    steps = steps2[restart:] + log.of("t3") + log.of("t4")
    expected = expected_logprobs(ref, fourth + out4, steps, len(fourth))
    assert (torch.tensor(got4) - expected).abs().max() < FP32_TOLERANCE
    assert pool.get_num_free_blocks() == free_at_start  # nothing leaked


def test_a_prompt_that_rewrites_the_last_computed_token_resumes_before_it(engine, tiny_model):
    """A client's re-tokenized text may change the previous request's last token: the
    stream resumes where its last step began and computes that token again."""
    core = engine.engine_core.engine_core
    log = ScheduleLog(core.scheduler)
    first = random_prompt(300, seed=81)
    out1, _ = run(engine, {"t1": first}, 100)["t1"]
    rewritten = 3 if out1[-2] != 3 else 4  # out1[-2] is the last token t1 computed
    second = first + out1[:-2] + [rewritten] + random_prompt(30, seed=82)
    out2, got = run(engine, {"t2": second}, 60)["t2"]
    steps1, steps2 = log.of("t1"), log.of("t2")
    assert steps2[0][0] == len(first) + len(out1) - 2 == steps1[-1][0]
    ref = StreamingLlamaReference(tiny_model)
    expected = expected_logprobs(ref, second + out2, steps1 + steps2, len(second))
    assert (torch.tensor(got) - expected).abs().max() < FP32_TOLERANCE
