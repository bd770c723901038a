"""vLLM's streaming-input sessions: one stream across all the inputs a session sends.

``AsyncLLM.generate`` with an async generator of ``StreamingInput`` keeps a
session's request, and its KV, between inputs; each new input is prefilled
after what the session computed so far (vLLM drops the last token sampled for
the previous input). With streaming on, the session is one endless stream:
checked against the torch reference over the whole session, on the default
multiprocess engine users run.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from vllm_sink_dev.engines import FP32_TOLERANCE, random_prompt, streaming
from vllm_sink_dev.reference import StreamingLlamaReference, window_starts_of_steps

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK = 4, 64, 32, 128


def solo_steps(start: int, prompt_end: int, outputs: int) -> list[tuple[int, int]]:
    """The steps of a request alone in the engine: prefill chunks, then one token per step.

    From ``start`` computed tokens to ``prompt_end`` in chunks of at most
    ``CHUNK``; the last chunk samples the first output, and each later output
    is sampled after its predecessor is computed. The last output is sampled
    but never computed.
    """
    steps = [(n, min(CHUNK, prompt_end - n)) for n in range(start, prompt_end, CHUNK)]
    steps += [(prompt_end + i, 1) for i in range(outputs - 1)]
    return steps


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0,
        logprobs=0,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


async def run_session(engine, inputs: list[tuple[list[int], int]]) -> tuple[list, list]:
    """Send ``(prompt tokens, max_tokens)`` inputs as one session; its tokens and logprobs."""
    from vllm.engine.protocol import StreamingInput
    from vllm.inputs import TokensPrompt

    async def session_inputs():
        for prompt, max_tokens in inputs:
            # A copy: vLLM's front end extends the first input's list with the later ones.
            tokens = TokensPrompt(prompt_token_ids=list(prompt))
            yield StreamingInput(tokens, greedy(max_tokens))

    tokens, logprobs = [], []
    async for out in engine.generate(session_inputs(), greedy(1), request_id="session"):
        completion = out.outputs[0]
        tokens += completion.token_ids
        logprobs += [d[t].logprob for d, t in zip(completion.logprobs, completion.token_ids)]
    return tokens, logprobs


def test_a_session_is_one_stream_over_all_its_inputs(tiny_model):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(tiny_model), dtype="float32", block_size=BLOCK, max_num_batched_tokens=CHUNK,
        skip_tokenizer_init=True, enforce_eager=True, **streaming(SINKS, WINDOW),
    )  # fmt: skip
    engine = AsyncLLM.from_engine_args(args)
    # The second input fits in one prefill chunk, the third takes three; every
    # input starts with the window already moving.
    inputs = [
        (random_prompt(150, seed=61), 60),
        (random_prompt(90, seed=62), 50),
        (random_prompt(300, seed=63), 40),
    ]

    async def session_then_plain():
        session = await run_session(engine, inputs)
        plain = TokensPrompt(prompt_token_ids=random_prompt(40, seed=64))
        outputs = [out async for out in engine.generate(plain, greedy(4), request_id="plain")]
        return session, outputs[-1].finished

    try:
        (tokens, got), plain_finished = asyncio.run(session_then_plain())
    finally:
        engine.shutdown()
    assert plain_finished  # the engine serves on after the session

    # The session's history: each input after the previous one's tokens but the last sampled.
    history: list[int] = []
    steps: list[tuple[int, int]] = []
    positions: list[int] = []  # where each sampled token stands in the history
    outputs = iter(tokens)
    for prompt, max_tokens in inputs:
        start = len(history)
        history += prompt
        steps += solo_steps(start, len(history), max_tokens)
        produced = [next(outputs) for _ in range(max_tokens)]
        positions += range(len(history), len(history) + max_tokens)
        history += produced[:-1]
    assert len(tokens) == sum(m for _, m in inputs)
    assert len(history) > SINKS + WINDOW + 8 * BLOCK  # evictions in every input

    ref = StreamingLlamaReference(tiny_model)
    table = ref.logprobs(history, SINKS, window_starts_of_steps(steps, SINKS, WINDOW, BLOCK))
    # A token sampled at ``p`` is a sample of the distribution after ``p - 1``,
    # also the last of an input, which the next input's first token replaces.
    expected = torch.tensor([table[p - 1, t].item() for p, t in zip(positions, tokens)])
    assert (torch.tensor(got) - expected).abs().max() < FP32_TOLERANCE
