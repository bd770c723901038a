"""`vllm serve --streaming-sinks` on SmolLM2 as shipped: the README's command, over HTTP."""

from __future__ import annotations

import re

import pytest
import requests

from vllm_sink_dev.paths import REPO
from vllm_sink_dev.reference import evicted_tokens
from vllm_sink_dev.serve import vllm_serve

pytestmark = pytest.mark.engine

SINKS, WINDOW, BLOCK = 4, 1020, 128


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # The block size is CPU's default, said for GPU backends, which default to 16.
    flags = ["--streaming-sinks", str(SINKS), "--streaming-window", str(WINDOW),
             "--max-num-batched-tokens", "1024", "--block-size", str(BLOCK)]  # fmt: skip
    with vllm_serve(smollm2, flags, log) as server:
        yield server


def test_startup_logs_the_streaming_settings(server):
    log = server.log.read_text()
    assert "vllm-sink: streaming on: 4 sinks + a window of 1020 tokens" in log
    assert "block size 128, at most 18 KV blocks per stream" in log
    assert "KV memory per stream at most 101.2 MiB (18 blocks in 1 KV cache group(s))" in log
    assert "full-size streams at once" in log
    # vLLM's warning that positions past the context "lead to nan" is answered instead.
    assert "lead to nan" not in log
    assert "vllm-sink: max_model_len 1099511627776 is how long a stream may grow" in log


def test_the_readme_shows_the_startup_lines_as_logged(server):
    """The README's sample start-up lines, numbers aside (they follow the flags), are lines
    this server logged."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("checks this wording against a server's log):\n\n```\n", 1)[1]
    samples = block.split("```", 1)[0].strip().splitlines()
    assert len(samples) == 3
    log = server.log.read_text()
    for sample in samples:
        pattern = r"\d+(?:\.\d+)?".join(
            re.escape(part) for part in re.split(r"\d+(?:\.\d+)?", sample)
        )
        assert re.search(pattern, log), f"not in the log, numbers aside: {sample}"


def test_completion_longer_than_the_context(server, handbook_tokens):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.model)
    prompt = tokenizer.decode(handbook_tokens[:10_000])
    evicted_before = server.metrics()["vllm_sink:evicted_blocks_total"]
    reply = requests.post(
        f"{server.url}/v1/completions",
        json={"model": server.model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
              "ignore_eos": True},
        timeout=600,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    body = reply.json()
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert prompt_tokens > 8192  # past SmolLM2's context
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["text"].strip()

    # Every block the stream stopped attending went back to the pool, except the
    # newest (it refills the head block) and those freed with the request.
    metrics = server.metrics()
    last_step_starts = (prompt_tokens + 16 - 2, prompt_tokens + 16 - 1)
    expected = {evicted_tokens(n, SINKS, WINDOW, BLOCK) // BLOCK - 1 for n in last_step_starts}
    assert metrics["vllm_sink:evicted_blocks_total"] - evicted_before in expected
    assert metrics["vllm_sink:streams"] == 0
    assert metrics["vllm:kv_cache_usage_perc"] == 0
