"""``--streaming-uncached-prompts window``: a long prompt no snapshot resumes costs O(W).

Checked against the torch reference: the engine's tokens must be those of one
stream over the prompt's sinks and last window only (what the paper calls
sliding window with re-computation), and clearly not those of streaming the
whole prompt; the next turn, which sends the whole history again, resumes that
stream.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from vllm_sink.core.uncached_prompts import cut_tokens
from vllm_sink_dev.engines import FP32_TOLERANCE, random_prompt, tiny_streaming_engine
from vllm_sink_dev.reference import StreamingLlamaReference, window_starts_of_steps
from vllm_sink_dev.schedule_log import ScheduleLog

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK = 4, 64, 32, 128


def greedy(max_tokens: int, prompt_logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0,
        logprobs=0,
        prompt_logprobs=prompt_logprobs,
        ignore_eos=True,
        detokenize=False,
    )


def run(engine, req_id: str, prompt: list[int], params: SamplingParams):
    """The request's output tokens, their logprobs, and the prompt its output reports."""
    engine.add_request(req_id, {"prompt_token_ids": prompt}, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                logprobs = [d[t].logprob for d, t in zip(completion.logprobs, ids)]
                return ids, torch.tensor(logprobs), list(out.prompt_token_ids)
    raise AssertionError("the request did not finish")


def reference(ref, tokens, steps, generated_from: int) -> torch.Tensor:
    """The reference's logprob of each token from ``generated_from`` on, for these steps."""
    table = ref.logprobs(tokens, SINKS, window_starts_of_steps(steps, SINKS, WINDOW, BLOCK))
    return torch.tensor(
        [table[p - 1, tokens[p]].item() for p in range(generated_from, len(tokens))]
    )


@pytest.fixture
def engine(tiny_model, engine_factory):
    settings = {"streaming_uncached_prompts": "window"}
    llm = tiny_streaming_engine(
        engine_factory, tiny_model, SINKS, WINDOW, BLOCK, CHUNK, settings=settings
    )
    return llm.llm_engine


def test_a_long_prompt_computes_its_sinks_and_last_window_and_its_next_turn_resumes(
    engine, tiny_model
):
    scheduler = engine.engine_core.engine_core.scheduler
    log = ScheduleLog(scheduler)
    ref = StreamingLlamaReference(tiny_model)
    first = random_prompt(600, seed=81)
    cut = len(first) - SINKS - WINDOW

    out1, got1, reported = run(engine, "t1", first, greedy(50))
    assert reported == first  # the client's prompt, whole
    steps1 = log.of("t1")
    assert sum(k for n, k in steps1 if n < SINKS + WINDOW) == SINKS + WINDOW  # O(W) prefill
    assert (scheduler.prompts_cut, scheduler.prompt_tokens_cut) == (1, cut)
    windowed = cut_tokens(first, SINKS, cut)
    expected = reference(ref, windowed + out1, steps1, len(windowed))
    assert (got1 - expected).abs().max() < FP32_TOLERANCE
    whole_steps = [(n, min(CHUNK, len(first) - n)) for n in range(0, len(first), CHUNK)]
    whole_steps += [(len(first) + i, 1) for i in range(len(out1) - 1)]
    streamed = reference(ref, first + out1, whole_steps, len(first))
    assert (got1 - streamed).abs().max() > 50 * FP32_TOLERANCE  # not the whole prompt streamed

    # The next turn sends the whole history: it resumes the cut stream, as one stream.
    second = first + out1 + random_prompt(30, seed=82)
    hits = scheduler.snapshot_hits
    out2, got2, _ = run(engine, "t2", second, greedy(40))
    steps2 = log.of("t2")
    assert steps2[0][0] == SINKS + WINDOW + len(out1) - 1
    assert scheduler.snapshot_hits == hits + 1 and scheduler.prompts_cut == 1
    windowed2 = cut_tokens(second, SINKS, cut)
    expected2 = reference(ref, windowed2 + out2, steps1 + steps2, len(windowed2))
    assert (got2 - expected2).abs().max() < FP32_TOLERANCE

    # A turn that adds more than S + W tokens is cheaper cut again than resumed.
    third = second + out2 + random_prompt(200, seed=83)
    run(engine, "t3", third, greedy(5))
    assert log.of("t3")[0][0] == 0 and scheduler.prompts_cut == 2
    assert sum(k for n, k in log.of("t3")) == SINKS + WINDOW + 4

    # A request for its prompt's logprobs is streamed whole (one per token it sent).
    run(engine, "logprobs", first, greedy(1, prompt_logprobs=0))
    assert sum(k for n, k in log.of("logprobs")) == len(first)
    assert scheduler.prompts_cut == 2
