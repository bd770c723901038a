"""`vllm serve --streaming-sinks` end to end: the real CLI, over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.engine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    command = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(smollm2),
        "--streaming-sinks", "4", "--streaming-window", "1020",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-num-batched-tokens", "1024", "--enforce-eager",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited: {log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(2)
    else:
        process.kill()
        pytest.fail("vllm serve did not become healthy in 600 s")
    yield url, log
    process.terminate()
    process.wait(timeout=60)


def test_serve_completes_a_prompt_longer_than_the_context(server, handbook_tokens):
    from transformers import AutoTokenizer

    url, log = server
    assert "vllm-sink: streaming on: 4 sinks + a window of 1020 tokens" in log.read_text()
    tokenizer = AutoTokenizer.from_pretrained(
        Path(__file__).parent.parent / "models" / "SmolLM2-135M-Instruct"
    )
    prompt = tokenizer.decode(handbook_tokens[:10_000])
    reply = requests.post(
        f"{url}/v1/completions",
        json={"model": str(tokenizer.name_or_path), "prompt": prompt, "max_tokens": 16,
              "temperature": 0},
        timeout=600,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["prompt_tokens"] > 8192  # past SmolLM2's context
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"].strip()
