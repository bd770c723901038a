"""The paper's phenomenon on a real model: sinks keep perplexity level.

SmolLM2-135M-Instruct over 12k tokens of real English (past its 8192-token
context), teacher-forced through vLLM's prompt log-probabilities, streamed
through a 1024-token cache with and without 4 attention sinks, against dense
attention within the context and against the paper's oracle, sliding window
with re-computation over the same 1024-token cache.
"""

from __future__ import annotations

import math

import pytest
from vllm import SamplingParams

from vllm_sink_dev.reference import recompute_nll

pytestmark = pytest.mark.engine

STREAM = 12_288
COMPARE = slice(1024, 4095)  # after the first eviction, within the context
ORACLE_STRIDE = 128  # re-computation costs a 1024-token forward per evaluated token


def prompt_nll(llm, tokens: list[int]) -> list[float]:
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)[0]
    return [-d[t].logprob for d, t in zip(out.prompt_logprobs[1:], tokens[1:])]


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def test_sinks_keep_perplexity_close_to_dense(smollm2, handbook_tokens, engine_factory):
    tokens = handbook_tokens[:STREAM]
    assert len(tokens) == STREAM
    common = dict(dtype="float32", max_num_batched_tokens=1024)
    dense = prompt_nll(engine_factory(smollm2, max_model_len=4096, **common), tokens[:4095])
    sinks4 = prompt_nll(
        engine_factory(
            smollm2, **common, additional_config={"streaming_sinks": 4, "streaming_window": 1020}
        ),
        tokens,
    )
    window_only = prompt_nll(
        engine_factory(
            smollm2, **common, additional_config={"streaming_sinks": 0, "streaming_window": 1024}
        ),
        tokens,
    )

    # Before any eviction all three are the same computation.
    assert perplexity(sinks4[:1000]) == pytest.approx(perplexity(dense[:1000]), rel=1e-3)
    assert perplexity(window_only[:1000]) == pytest.approx(perplexity(dense[:1000]), rel=1e-3)
    ppl = {
        name: perplexity(nll[COMPARE])
        for name, nll in [("dense", dense), ("sinks4", sinks4), ("window_only", window_only)]
    }
    print("perplexity over tokens 1024-4095:", ppl)
    print(
        "streaming over all",
        STREAM,
        "tokens: sinks4",
        perplexity(sinks4),
        "window_only",
        perplexity(window_only),
    )
    assert ppl["sinks4"] < 1.05 * ppl["dense"]
    assert ppl["window_only"] > 1.3 * ppl["sinks4"]
    assert perplexity(window_only) > 1.3 * perplexity(sinks4)

    # The oracle on every 128th token past the first eviction, through the end.
    targets = list(range(1024, STREAM, ORACLE_STRIDE))
    recomputed = perplexity(recompute_nll(smollm2, tokens, 1024, targets))
    sampled = {
        "sinks4": perplexity([sinks4[t - 1] for t in targets]),
        "window_only": perplexity([window_only[t - 1] for t in targets]),
    }
    print(f"on {len(targets)} sampled tokens: recompute {recomputed:.3f}", sampled)
    assert sampled["sinks4"] < 1.05 * recomputed
    assert sampled["window_only"] > 1.15 * recomputed
