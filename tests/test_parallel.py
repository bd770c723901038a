"""Streams on more than one device: tensor parallelism on vLLM's CPU backend.

With ``tensor_parallel_size=2`` each rank (its own worker process, its own
OpenMP core) holds half of every layer's KV heads. The scheduler's output is
the same for both ranks, and so is each stream's eviction plan: each rank
refills, moves and re-rotates its own heads' keys. The result must be the
stream the torch reference computes with all heads.
"""

from __future__ import annotations

import pytest
import torch

from vllm_sink_dev.engines import random_prompt, tiny_streaming_engine
from vllm_sink_dev.stream_checks import assert_streams_like_the_reference, reference_logprobs

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK, CHUNK = 4, 64, 32, 96


def test_tensor_parallel_streams_match_the_reference(tiny_model, engine_factory, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    llm = tiny_streaming_engine(
        engine_factory, tiny_model, SINKS, WINDOW, BLOCK, CHUNK,
        tensor_parallel_size=2, distributed_executor_backend="mp",
    )  # fmt: skip
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    specs = [group.kv_cache_spec for group in scheduler.kv_cache_config.kv_cache_groups]
    assert all(spec.num_kv_heads == 1 for spec in specs)  # the model's 2 KV heads, split
    prompt = random_prompt(700, seed=3)
    errors = assert_streams_like_the_reference(
        llm, tiny_model, prompt, 300, SINKS, WINDOW, BLOCK, CHUNK
    )
    print(f"TP=2: max |logprob - reference| {errors.max():.2e} over {len(errors)} tokens")


def test_tensor_parallel_server_streams_gemma3_like_the_reference(gemma3, tmp_path):
    """``vllm serve --tensor-parallel-size 2`` on Gemma 3 270M (its one KV head on both
    ranks, its query heads split), a prompt past a context cut to 1,024 positions."""
    import requests
    from transformers import AutoTokenizer

    from vllm_sink_dev.paths import TEXT
    from vllm_sink_dev.reference import StreamingLlamaReference
    from vllm_sink_dev.serve import vllm_serve, with_short_context

    sinks, window, block, chunk = 4, 512, 32, 256
    model = with_short_context(gemma3, 1024, tmp_path / "gemma3-1k")
    prompt = AutoTokenizer.from_pretrained(gemma3)(TEXT.read_text()[:20_000])["input_ids"][:1300]
    flags = ["--streaming-sinks", str(sinks), "--streaming-window", str(window),
             "--block-size", str(block), "--max-num-batched-tokens", str(chunk),
             "--tensor-parallel-size", "2"]  # fmt: skip
    with vllm_serve(model, flags, tmp_path / "server.log", 1,
                    {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as server:  # fmt: skip
        reply = requests.post(f"{server.url}/v1/completions", timeout=600, json={
            "model": server.model, "prompt": prompt, "max_tokens": 40, "temperature": 0,
            "logprobs": 0, "return_token_ids": True, "ignore_eos": True,
        })  # fmt: skip
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        metrics = server.metrics()
    assert metrics["vllm_sink:evicted_blocks_total"] > 0
    generated = choice["token_ids"]
    got = torch.tensor(choice["logprobs"]["token_logprobs"])
    tokens = prompt + generated
    ref = StreamingLlamaReference(model)
    expected = reference_logprobs(ref, tokens, sinks, window, block, len(prompt), chunk)
    errors = (got - expected[len(prompt) - 1 :]).abs()
    print(f"Gemma 3, TP=2 server: max |logprob - reference| {errors.max():.2e}")
    assert errors.max() < 1e-3


def test_data_parallel_server_streams_on_either_engine(tiny_llama, smollm2, tmp_path):
    """``--data-parallel-size 2``: two independent engines, streams on both, each engine's
    figures on ``/metrics``. Prompts short enough that a stream evicts only while decoding
    (one token a step), so each stream's steps are a lone stream's whatever its company.
    With a shared snapshot directory, a stream's next request sent to the other engine
    resumes it from there."""
    import concurrent.futures
    import time

    import requests

    from vllm_sink_dev.reference import StreamingLlamaReference
    from vllm_sink_dev.serve import metric_samples, vllm_serve

    # The tiny Llama with SmolLM2's tokenizer (its 512 ids are SmolLM2's first 512):
    # the server needs one to give logprobs.
    model = tmp_path / "tiny-llama-tokenizer"
    model.mkdir()
    files = [*tiny_llama.iterdir(), *smollm2.glob("tokenizer*")]
    for file in files:
        (model / file.name).symlink_to(file.resolve())
    flags = ["--streaming-sinks", str(SINKS), "--streaming-window", str(WINDOW),
             "--block-size", str(BLOCK), "--max-num-batched-tokens", str(CHUNK),
             "--data-parallel-size", "2",
             "--api-server-count", "1",
             "--streaming-snapshot-dir", str(tmp_path / "snapshots")]  # fmt: skip
    prompts = [random_prompt(60, seed=90 + i) for i in range(6)]
    with vllm_serve(model, flags, tmp_path / "server.log", 1,
                    {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as server:  # fmt: skip

        def complete(prompt: list[int], engine: int, max_tokens: int = 250) -> dict:
            reply = requests.post(f"{server.url}/v1/completions", timeout=300, json={
                "model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "logprobs": 0, "return_token_ids": True, "ignore_eos": True,
            }, headers={"X-data-parallel-rank": str(engine)})  # fmt: skip
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]

        engines = [i % 2 for i in range(len(prompts))]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            choices = list(pool.map(complete, prompts, engines))
        time.sleep(2)  # the files are written in the background
        follow_ups = [p + c["token_ids"] + [13, 14] for p, c in zip(prompts, choices)]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            list(pool.map(complete, follow_ups, [1 - e for e in engines], [8] * len(prompts)))
        samples = metric_samples(server.url)
    disk_hits = sum(
        v
        for k, v in samples.items()
        if k.startswith("vllm_sink:snapshot_tier_hits_total") and 'tier="disk"' in k
    )
    assert disk_hits == len(prompts)  # each on the engine that did not stream it
    evicted = {k: v for k, v in samples.items() if k.startswith("vllm_sink:evicted_blocks_total")}
    assert len(evicted) == 2 and all(v > 0 for v in evicted.values()), evicted  # both engines
    ref = StreamingLlamaReference(tiny_llama)
    for prompt, choice in zip(prompts, choices):
        tokens = prompt + choice["token_ids"]
        expected = reference_logprobs(ref, tokens, SINKS, WINDOW, BLOCK, len(prompt), CHUNK)
        got = torch.tensor(choice["logprobs"]["token_logprobs"])
        assert (got - expected[len(prompt) - 1 :]).abs().max() < 1e-3
