"""Sampling features that look at a request's history, in a stream past its first eviction.

What each does (README, "What sampling sees"):

* presence / frequency / repetition penalties count the tokens the stream
  still attends (sinks + window), not the whole history: checked against the
  torch reference;
* ``min_tokens`` counts every output of the stream, evicted ones included;
* stop strings and streamed (delta) output work on the text as it is
  generated, however long the stream.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from vllm_sink_dev.engines import random_prompt, streaming, tiny_streaming_engine
from vllm_sink_dev.reference import StreamingLlamaReference, window_starts

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK = 4, 64, 32, 256


def penalised(kind: str, penalty: float, logits, prompt_tokens, output_tokens):
    """vLLM's penalty of ``kind`` on one row of raw logits, written from its definition.

    Presence and frequency count output tokens; repetition counts prompt and
    output tokens, dividing positive logits and multiplying negative ones.
    """
    scores = logits.clone()
    if kind == "presence":
        scores[sorted(set(output_tokens))] -= penalty
    elif kind == "frequency":
        for token in output_tokens:
            scores[token] -= penalty
    else:
        seen = sorted(set(prompt_tokens) | set(output_tokens))
        scores[seen] = torch.where(scores[seen] > 0, scores[seen] / penalty, scores[seen] * penalty)
    return scores


@pytest.mark.parametrize("kind,penalty", [("presence", 1.5), ("frequency", 0.7),
                                          ("repetition", 1.6)])  # fmt: skip
def test_penalties_count_what_the_stream_attends(tiny_llama, engine_factory, kind, penalty):
    llm = tiny_streaming_engine(engine_factory, tiny_llama, SINKS, WINDOW, BLOCK, CHUNK)
    prompt = random_prompt(100, seed=21)
    params = SamplingParams(
        max_tokens=400, temperature=0, ignore_eos=True, detokenize=False,
        **{f"{kind}_penalty": penalty},
    )  # fmt: skip
    generated = list(llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids)

    # Teacher-forced on vLLM's tokens: at each step, the reference's greedy
    # choice after the penalty over the tokens the query attends.
    tokens = prompt + generated
    starts = window_starts(len(tokens), SINKS, WINDOW, BLOCK, prompt_len=len(prompt), chunk=CHUNK)
    table = StreamingLlamaReference(tiny_llama).logits(tokens, SINKS, starts)

    def choice(query: int, positions) -> tuple[int, float]:
        outputs = [tokens[a] for a in positions if a >= len(prompt)]
        prompt_part = [tokens[a] for a in positions if a < len(prompt)]
        scores = penalised(kind, penalty, table[query], prompt_part, outputs)
        top2 = scores.topk(2).values
        return int(scores.argmax()), float(top2[0] - top2[1])

    compared = differs = 0
    for j, token in enumerate(generated):
        query = len(prompt) - 1 + j
        everything = range(query + 1)
        attended = [a for a in everything if a < SINKS or a >= starts[query]]
        expected, margin = choice(query, attended)
        if margin > 1e-2:  # clear of float32 noise between the two implementations
            assert token == expected, f"output {j}"
            compared += 1
        differs += expected != choice(query, everything)[0]
    assert compared > 0.9 * len(generated)
    assert differs > 0, "whole-history penalties would have picked the same tokens"


def test_min_tokens_longer_than_the_window(tiny_llama, engine_factory):
    stop, min_tokens = 7, 3 * WINDOW
    llm = tiny_streaming_engine(engine_factory, tiny_llama, SINKS, WINDOW, BLOCK, CHUNK)
    params = SamplingParams(
        max_tokens=4 * WINDOW,
        min_tokens=min_tokens,
        stop_token_ids=[stop],
        logit_bias={stop: 100.0},  # the stop token wins whenever it is not masked
        temperature=0,
        detokenize=False,
    )
    out = llm.generate([{"prompt_token_ids": random_prompt(40, seed=5)}], params)[0].outputs[0]
    generated = list(out.token_ids)
    # Masked for exactly min_tokens outputs, then it stops the stream at once.
    assert stop not in generated[:-1]
    assert len(generated) == min_tokens + 1 and generated[-1] == stop
    assert out.finish_reason == "stop"


@pytest.fixture(scope="module")
def tiny_llama_with_tokenizer(tiny_llama, smollm2, tmp_path_factory):
    """The tiny Llama with SmolLM2's tokenizer (its 512 ids are the tokenizer's first)."""
    path = tmp_path_factory.mktemp("tiny_llama_tokenizer")
    for item in tiny_llama.iterdir():
        (path / item.name).symlink_to(item)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, path / name)
    return path


def test_stop_string_and_delta_output_far_into_a_stream(tiny_llama_with_tokenizer, engine_factory):
    llm = engine_factory(
        tiny_llama_with_tokenizer,
        dtype="float32",
        block_size=BLOCK,
        max_num_batched_tokens=CHUNK,
        **streaming(SINKS, WINDOW),
    )
    prompt = {"prompt_token_ids": random_prompt(50, seed=8, vocab=512)}
    free_run = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)
    full = llm.generate([prompt], free_run)[0].outputs[0]
    text, tokenizer = full.text, llm.get_tokenizer()
    # A stop string whose first occurrence is past ~6 windows of output.
    start = len(tokenizer.decode(full.token_ids[:400]))
    stop = next(
        text[k : k + 6] for k in range(start, len(text) - 6) if text.find(text[k : k + 6]) == k
    )

    engine = llm.llm_engine
    params = free_run.clone()
    params.stop = [stop]
    params.output_kind = RequestOutputKind.DELTA
    engine.add_request("stopped", prompt, params)
    deltas, finish = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].text)
            finish = out.outputs[0].finish_reason
    assert len(deltas) > 300  # streamed as it went, not at the end
    assert "".join(deltas) == text[: text.find(stop)]
    assert finish == "stop"
