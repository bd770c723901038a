"""Streaming under Ray: the Ray Data and Ray Serve LLM examples, run small.

Each example runs as its own process, as a user runs it, with two vLLM engines
(replicas) on this machine's two cores. The Ray Data test checks each document's
perplexity against the torch reference of the same stream; the Ray Serve test
holds two conversations past the model's context and reads each engine's
streaming figures from its board.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from vllm_sink.metrics import BOARD_PREFIX, BOARD_SUFFIX, board_directory, read_board
from vllm_sink_dev.paths import REPO, TEXT
from vllm_sink_dev.reference import StreamingLlamaReference
from vllm_sink_dev.serve import free_port, stop, with_short_context
from vllm_sink_dev.stream_checks import reference_logprobs

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]
pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'vllm-sink[ray]'")

EXAMPLES = REPO / "examples"
SINKS, WINDOW, BLOCK, CHUNK = 4, 252, 32, 256
ENGINE_LINE = re.compile(r"pid=(\d+)\).*vllm-sink: streaming on")
"""The start-up line each engine logs, behind the pid of the Ray actor that runs it."""


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, args: list[str], log: Path, timeout: float) -> str:
    # RAY_DEDUP_LOGS=0: every replica's start-up line, not one for all.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "RAY_DEDUP_LOGS": "0"}
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout,
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text[-4000:]
    return text


def test_ray_data_streams_each_document_like_the_reference(smollm2, tmp_path):
    """Four documents of 1,100 tokens (past a 252-token window) over two replicas, one
    stream per engine at a time (so that its prefill chunks are the reference's)."""
    from transformers import AutoTokenizer

    count, tokens, generate = 4, 1100, 8
    output = tmp_path / "results"
    log = run_example("ray_data_long_documents", [
        "--model", str(smollm2), "--documents", str(count), "--tokens", str(tokens),
        "--window", str(WINDOW), "--block-size", str(BLOCK), "--chunk", str(CHUNK),
        "--max-num-seqs", "1", "--generate", str(generate), "--output", str(output),
    ], tmp_path / "ray_data.log", timeout=800)  # fmt: skip
    assert len(set(ENGINE_LINE.findall(log))) == 2  # two replicas, each streaming
    rows = [json.loads(line) for f in sorted(output.glob("*.json")) for line in open(f)]
    assert sorted(row["document"] for row in rows) == list(range(count))

    documents = load_example("ray_data_long_documents").documents
    docs = documents(AutoTokenizer.from_pretrained(smollm2), TEXT.read_text(), count, tokens)
    ref = StreamingLlamaReference(smollm2)
    for row in rows:
        doc = docs[row["document"]]
        assert row["tokens"] == len(doc) and len(row["continuation_token_ids"]) == generate
        expected = -reference_logprobs(ref, doc, SINKS, WINDOW, BLOCK, len(doc), CHUNK).mean()
        window_only = -reference_logprobs(ref, doc, 0, WINDOW + SINKS, BLOCK, len(doc), CHUNK)
        nll = math.log(row["perplexity"])
        print(f"document {row['document']}: mean NLL {nll:.6f}, reference {float(expected):.6f}")
        assert abs(nll - float(expected)) < 1e-4
        assert abs(nll - float(window_only.mean())) > 1e-2


def available_memory() -> str:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return f"MemAvailable {fields['MemAvailable'].strip()} of {fields['MemTotal'].strip()}"


def serve_boards() -> dict[Path, dict[str, int]]:
    directory = board_directory()
    boards = {p: read_board(p) for p in directory.glob(f"{BOARD_PREFIX}*{BOARD_SUFFIX}")}
    return {p: figures for p, figures in boards.items() if figures is not None}


def start_ray_serve(model: Path, port: int, snapshot_dir: Path, log_path: Path):
    """The Ray Serve example with two replicas, once it says it is ready."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "RAY_DEDUP_LOGS": "0"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "ray_serve_streaming.py"), "--model", str(model),
             "--window", str(WINDOW), "--block-size", str(BLOCK), "--chunk", str(CHUNK),
             "--port", str(port), "--kv-gib", "1", "--snapshot-dir", str(snapshot_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    # Under load, Ray Serve may fail a replica's first health check (a race in its own
    # logging set-up) and start it again after a back-off: minutes.
    deadline = time.time() + 600
    while "ready: http" not in log_path.read_text():
        if server.poll() is not None or time.time() > deadline:
            stop(server, 120)
            raise AssertionError(
                f"Ray Serve did not start in 10 minutes; {available_memory()}; its log ends:\n"
                + log_path.read_text()[-6000:]
            )
        time.sleep(3)
    return server


@pytest.mark.timeout(1500)
def test_ray_serve_conversations_past_the_context_resume_their_streams(smollm2, tmp_path):
    """Two replicas behind Ray Serve's prefix-affinity router, sharing a snapshot directory;
    two conversations of four turns each, past a context cut to 1,024 positions. Each
    conversation stays on one replica, so every turn after the first resumes its stream's
    snapshot; after the deployment restarts, the next turn of each resumes from the
    directory on whichever replica the router picks."""
    from openai import OpenAI

    model = with_short_context(smollm2, 1024, tmp_path / "smollm2-1k")
    port, snapshots = free_port(), tmp_path / "snapshots"
    text = TEXT.read_text()
    conversations = [[{"role": "system", "content": "You are a helpful assistant."}]
                     for _ in range(2)]  # fmt: skip
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=300)

    def take_turns(turns: range) -> None:
        for turn in turns:
            for c, messages in enumerate(conversations):
                start = 50_000 * c + 1_500 * turn
                messages.append({"role": "user", "content": "Summarize in one sentence:\n"
                                 + text[start : start + 1_500]})  # fmt: skip
                reply = client.chat.completions.create(
                    model="smollm2", messages=messages, max_tokens=24, temperature=0
                )
                answer = reply.choices[0].message.content
                assert answer.strip(), f"empty answer, conversation {c}, turn {turn + 1}"
                messages.append({"role": "assistant", "content": answer})
        assert reply.usage.prompt_tokens > 1024  # the last history is past the context

    before = set(serve_boards())
    server = start_ray_serve(model, port, snapshots, tmp_path / "ray_serve.log")
    try:
        take_turns(range(4))
        boards = {p: f for p, f in serve_boards().items() if p not in before}
        print("engine boards:", list(boards.values()))
        assert len(boards) == 2
        assert all(f["evicted_blocks"] > 0 for f in boards.values())  # both replicas streamed
        assert sum(f["snapshot_hits"] for f in boards.values()) == 2 * 3
        response = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "smollm2", "prompt": "Hello", "max_tokens": -1,
        })  # fmt: skip
        assert response.status_code == 400, response.text
    finally:
        stop(server, 120)  # the example stops its replicas on SIGTERM

    before = set(serve_boards())
    server = start_ray_serve(model, port, snapshots, tmp_path / "ray_serve_again.log")
    try:
        take_turns(range(4, 5))
        boards = {p: f for p, f in serve_boards().items() if p not in before}
        print("engine boards after the restart:", list(boards.values()))
        assert sum(f["snapshot_hits"] for f in boards.values()) == 2
        assert sum(f["snapshot_hits_disk"] for f in boards.values()) == 2
    finally:
        stop(server, 120)
