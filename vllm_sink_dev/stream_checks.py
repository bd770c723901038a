"""Streams through a real vLLM engine, checked against the torch reference.

What the engine tests on every device and model family share: greedy runs that
report every token's logprob, the reference's logprobs for the same stream, and
the check that the two agree within the engine dtype's precision while plain
window attention does not.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams

from vllm_sink_dev.engines import FP32_TOLERANCE, kv_manager
from vllm_sink_dev.reference import StreamingLlamaReference, window_starts


def greedy(max_tokens: int) -> SamplingParams:
    """Greedy decoding that reports the logprob of every prompt and output token."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0,
        logprobs=0,
        prompt_logprobs=0,
        ignore_eos=True,
        detokenize=False,
    )


def tokens_and_logprobs(out, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Generated tokens, and the logprobs of all tokens after the first."""
    generated = list(out.outputs[0].token_ids)
    logprobs = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt[1:])]
    logprobs += [d[t].logprob for d, t in zip(out.outputs[0].logprobs, generated)]
    return generated, torch.tensor(logprobs)


def run(llm, prompt: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    out = llm.generate([{"prompt_token_ids": prompt}], greedy(max_tokens), use_tqdm=False)[0]
    return tokens_and_logprobs(out, prompt)


def reference_logprobs(ref, tokens, sinks, window, block, prompt_len, chunk) -> torch.Tensor:
    starts = window_starts(len(tokens), sinks, window, block, prompt_len=prompt_len, chunk=chunk)
    table = ref.logprobs(tokens, sinks, starts)
    return table[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]


def rebase_period(llm) -> int:
    """Evictions between two re-rotations of a stream's window in ``llm``'s worker."""
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    return worker.model_runner._rebase_period_blocks


def assert_within_precision(
    logprobs: torch.Tensor,
    expected: torch.Tensor,
    window_only: torch.Tensor,
    unevicted: int,
    dtype: str,
) -> torch.Tensor:
    """The engine's per-token logprobs are the reference's, and plain window attention's
    are far off. The per-token errors.

    A float32 engine is held to :data:`FP32_TOLERANCE`. A 16-bit engine is compared with
    the float32 reference through its own rounding noise, measured on the ``unevicted``
    tokens before its first eviction: past it, the errors must stay that size. On CPU in
    bfloat16 the noise is a mean of 0.015 (tiny Llama) to 0.03 (SmolLM2); sinks left at
    their first positions give errors of mean 0.30 (tiny Llama) and at most 1.1 (SmolLM2,
    noise at most 0.2).
    """
    errors = (logprobs - expected).abs()
    away_from_window_only = (logprobs - window_only).abs()
    if dtype == "float32":
        assert errors.max() < FP32_TOLERANCE, errors.max()
        assert away_from_window_only.max() > 50 * FP32_TOLERANCE
        return errors
    noise, evicted = errors[:unevicted], errors[unevicted:]
    assert evicted.mean() < 2 * noise.mean() + 0.01, (evicted.mean(), noise.mean())
    assert evicted.max() < 3 * noise.max() + 0.05, (evicted.max(), noise.max())
    assert away_from_window_only[unevicted:].mean() > 5 * noise.mean()
    return errors


def assert_streams_like_the_reference(
    llm, model, prompt, max_tokens, sinks, window, block, chunk, dtype: str = "float32"
) -> torch.Tensor:
    """Stream ``prompt`` and ``max_tokens`` more through evictions in ``llm`` (of ``dtype``):
    :func:`assert_within_precision`. The per-token errors."""
    generated, logprobs = run(llm, prompt, max_tokens)
    ref = StreamingLlamaReference(model)
    tokens = prompt + generated
    expected = reference_logprobs(ref, tokens, sinks, window, block, len(prompt), chunk)
    assert kv_manager(llm).num_evicted_blocks >= (len(tokens) - sinks - window) // block - 1
    window_only = reference_logprobs(ref, tokens, 0, window + sinks, block, len(prompt), chunk)
    return assert_within_precision(logprobs, expected, window_only, sinks + window - 1, dtype)


SMOLLM2_STREAM = dict(sinks=4, window=252, chunk=128, prompt_len=600, max_tokens=150)
"""The SmolLM2 parity stream: the engine is built with these (and the test's block, dtype)."""


def assert_smollm2_streams_like_the_reference(
    llm, smollm2, handbook_tokens, block: int, dtype: str
) -> torch.Tensor:
    """:data:`SMOLLM2_STREAM` through ``llm``: every logprob the reference's. The errors."""
    sinks, window, chunk, prompt_len, max_tokens = SMOLLM2_STREAM.values()
    prompt = handbook_tokens[:prompt_len]
    generated, logprobs = run(llm, prompt, max_tokens)
    tokens = prompt + generated
    ref = StreamingLlamaReference(smollm2)
    expected = reference_logprobs(ref, tokens, sinks, window, block, prompt_len, chunk)
    window_only = reference_logprobs(ref, tokens, 0, window + sinks, block, prompt_len, chunk)
    return assert_within_precision(logprobs, expected, window_only, sinks + window - 1, dtype)
