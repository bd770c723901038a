"""The OpenAI server past the model's context: chat, SSE, disconnects, bad requests, seeds.

The server runs SmolLM2 with its declared context cut to 1024 positions (same
weights, same RoPE), so that histories outgrow the context in a few hundred
tokens and the whole module runs in minutes on two cores.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest
import requests

from vllm_sink.config import UNLIMITED_STREAM_LEN
from vllm_sink_dev.serve import metric_samples, vllm_serve, with_short_context

pytestmark = pytest.mark.engine

CONTEXT = 1024
FLAGS = ["--streaming-sinks", "4", "--streaming-window", "252", "--block-size", "32",
         "--max-num-batched-tokens", "256"]  # fmt: skip


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_chat")
    model = with_short_context(smollm2, CONTEXT, root / "SmolLM2-1k")
    # The Responses API keeps a conversation only with its store on.
    responses_store = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    with vllm_serve(model, FLAGS, root / "server.log", 1, responses_store) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def book(handbook_tokens, server) -> str:
    """About 1,500 tokens of the Debian handbook: a prompt past the context."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server.model).decode(handbook_tokens[:1500])


def wait_until_idle(server, timeout_s: float = 30) -> dict[str, float]:
    deadline = time.time() + timeout_s
    while True:
        metrics = server.metrics()
        if metrics["vllm:num_requests_running"] == 0 or time.time() > deadline:
            return metrics
        time.sleep(0.5)


def test_thirty_turn_chat_outgrows_the_context(server, client):
    """Every turn after the first resumes the previous turn's stream (a snapshot)."""
    before = wait_until_idle(server)
    facts = ["The sky is blue.", "Cats like milk.", "Paris is in France.",
             "Water boils at 100 degrees.", "Bees make honey."]  # fmt: skip
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for turn in range(29):
        messages.append(
            {
                "role": "user",
                "content": f"Turn {turn + 1}. {facts[turn % 5]} "
                "Please reply with one short sentence.",
            }
        )
        reply = client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=16, temperature=0
        )
        answer = reply.choices[0].message.content
        assert answer.strip(), f"empty answer at turn {turn + 1}"
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": "What is the capital of France?"})
    reply = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=16, temperature=0
    )
    assert reply.usage.prompt_tokens > CONTEXT  # no length 400: the history streams
    assert "Paris" in reply.choices[0].message.content
    after = wait_until_idle(server)
    hits = after["vllm_sink:snapshot_hits_total"] - before["vllm_sink:snapshot_hits_total"]
    skipped = (
        after["vllm_sink:snapshot_tokens_skipped_total"]
        - before["vllm_sink:snapshot_tokens_skipped_total"]
    )
    print(f"30 turns: {hits:.0f} resumed a snapshot, {skipped:.0f} prompt tokens not prefilled")
    assert hits == 29
    assert skipped > 0.8 * 29 * reply.usage.prompt_tokens / 2  # most of each history


def snapshot_figures(server) -> tuple[float, float]:
    """Snapshot hits and misses so far, once the server is idle."""
    metrics = wait_until_idle(server)
    return metrics["vllm_sink:snapshot_hits_total"], metrics["vllm_sink:snapshot_misses_total"]


def test_regenerate_edit_and_a_second_tab_resume_a_snapshot(server, client, book):
    """What chat users do besides the next turn: regenerate the last answer (sampled), edit
    the last message, send the next turn from two tabs at once. Each resumes the snapshot
    of the turn it continues instead of streaming the whole history again."""
    messages = [{"role": "user", "content": f"{book}\nWhat is this text about?"}]
    for question in ("Who is it written for?", "Name one command it mentions."):
        reply = client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=24, temperature=0
        )
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": question},
        ]
    hits, misses = snapshot_figures(server)
    before = metric_samples(server.url)

    def chat(history, **sampling):
        return client.chat.completions.create(
            model=server.model, messages=history, max_tokens=24, **sampling
        )

    last = chat(messages, temperature=0)
    assert last.usage.prompt_tokens > CONTEXT
    chat(messages, temperature=0.8, seed=1)  # regenerate
    chat(messages[:-1] + [{"role": "user", "content": "Name one package it mentions."}],
         temperature=0)  # edit the last message  # fmt: skip
    next_turn = messages + [
        {"role": "assistant", "content": last.choices[0].message.content},
        {"role": "user", "content": "Thank you. Summarize it in one sentence."},
    ]
    tabs = [threading.Thread(target=chat, args=(next_turn,), kwargs={"temperature": 0})
            for _ in range(2)]  # fmt: skip
    for tab in tabs:
        tab.start()
    for tab in tabs:
        tab.join()
    after_hits, after_misses = snapshot_figures(server)
    assert (after_hits - hits, after_misses - misses) == (5, 0)
    after = metric_samples(server.url)
    pool_hits = next(k for k in after if k.startswith("vllm_sink:snapshot_tier_hits_total{")
                     and 'tier="pool"' in k)  # fmt: skip
    assert after[pool_hits] - before.get(pool_hits, 0) == 5


def test_completions_that_extend_the_last_completion_resume_it(server, client, book):
    """Text and token-id prompts that go on from the previous prompt and its completion."""
    hits, misses = snapshot_figures(server)
    prompt = book
    for _ in range(3):
        reply = client.completions.create(
            model=server.model, prompt=prompt, max_tokens=24, temperature=0
        )
        prompt += reply.choices[0].text + "\n\nThe next section explains"
    assert reply.usage.prompt_tokens > CONTEXT
    ids = None
    for turn in range(3):
        reply = client.completions.create(
            model=server.model, prompt=ids or prompt, max_tokens=24, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )  # fmt: skip
        choice = reply.choices[0]
        ids = choice.prompt_token_ids + choice.token_ids + [13] * (turn + 1)
    after_hits, after_misses = snapshot_figures(server)
    assert (after_hits - hits, after_misses - misses) == (5, 1)


def test_responses_previous_response_id_resumes_the_conversation(server, client, book):
    """vLLM's stateful Responses API: the server re-renders the history each turn."""
    hits, misses = snapshot_figures(server)
    reply = client.responses.create(
        model=server.model, input=f"Read this.\n{book}\nWhat is this text about?",
        max_output_tokens=24, temperature=0,
    )  # fmt: skip
    for question in ["Who is it written for?", "Say that in one sentence.", "Thank you."]:
        reply = client.responses.create(
            model=server.model, input=question, previous_response_id=reply.id,
            max_output_tokens=24, temperature=0,
        )  # fmt: skip
        assert reply.output_text.strip()
    assert reply.usage.input_tokens > CONTEXT
    after_hits, after_misses = snapshot_figures(server)
    # The first request may resume the system prompt from another test's conversation.
    assert after_hits - hits >= 3 and (after_hits - hits) + (after_misses - misses) == 4


def test_sse_streams_past_the_context(server, client, book):
    """Chat and completions, streamed: prompt plus output both past the context."""
    chunks = client.completions.create(
        model=server.model, prompt=book, max_tokens=CONTEXT + 100, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    pieces, usage = [], None
    for chunk in chunks:
        pieces.extend(choice.text for choice in chunk.choices)
        usage = chunk.usage or usage
    assert usage.prompt_tokens > CONTEXT and usage.completion_tokens == CONTEXT + 100
    assert len(pieces) >= CONTEXT  # one event per token or so, not one at the end

    stream = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": book + "\nSummarize this."}],
        max_tokens=32, temperature=0, stream=True,
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip()


def test_concurrent_clients(server, client, book):
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def converse(index: int) -> None:
        try:
            stream = client.chat.completions.create(
                model=server.model, max_tokens=48, temperature=0, stream=True,
                messages=[{"role": "user", "content": f"Text {index}:\n{book[index * 300:]}"
                                                      "\nWhat is this text about?"}],
            )  # fmt: skip
            results[index] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=converse, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    most_streams = 0
    while any(thread.is_alive() for thread in threads):
        most_streams = max(most_streams, server.metrics()["vllm_sink:streams"])
        time.sleep(0.2)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3] and all(text.strip() for text in results.values())
    assert most_streams >= 2  # the streams were batched, not served one by one


def test_client_disconnect_frees_its_blocks(server, client, book):
    stream = client.completions.create(
        model=server.model, prompt=book, max_tokens=100_000, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for received, _ in enumerate(stream):
        if received == 50:
            break
    running = server.metrics()
    assert running["vllm_sink:streams_past_first_eviction"] == 1
    assert (
        0
        < running["vllm_sink:resident_kv_blocks"]
        <= running["vllm_sink:kv_blocks_per_stream_limit"]
    )
    stream.response.close()

    idle = wait_until_idle(server)
    assert idle["vllm:num_requests_running"] == 0
    assert idle["vllm_sink:streams"] == 0 and idle["vllm_sink:resident_kv_blocks"] == 0
    assert idle["vllm:kv_cache_usage_perc"] == 0
    reply = client.completions.create(model=server.model, prompt="Hello", max_tokens=4)
    assert reply.choices[0].text is not None


@pytest.mark.parametrize(
    "change, says",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 0}, "n must be at least 1"),
        ({"logprobs": 100}, "logprobs"),
        ({"prompt": ""}, "prompt"),
        ({"stop": 5}, "stop"),
    ],
)
def test_bad_request_gets_400_and_the_server_keeps_serving(server, change, says):
    body = {"model": server.model, "prompt": "Hello", "max_tokens": 4, **change}
    reply = requests.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]["message"]
    good = {"model": server.model, "prompt": "Hello", "max_tokens": 4}
    reply = requests.post(f"{server.url}/v1/completions", json=good, timeout=60)
    assert reply.status_code == 200, reply.text


def test_seeded_sampling_past_a_prefill_chunk_is_reproducible(server, client, book):
    """OpenAI clients send ``seed``; the book's prompt takes six prefill chunks."""

    def seeded(seed: int) -> str:
        reply = client.completions.create(
            model=server.model, prompt=book, max_tokens=16, temperature=1.0, seed=seed
        )
        assert reply.usage.prompt_tokens > 256
        return reply.choices[0].text

    first = seeded(7)
    assert seeded(7) == first
    assert seeded(8) != first


def test_chat_without_max_tokens_stops_at_the_models_context(server):
    """Chat clients mostly omit ``max_tokens`` (``/v1/completions`` defaults to 16)."""
    body = {"model": server.model, "messages": [{"role": "user", "content": "Tell a story."}],
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    reply = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=600)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    assert reply.json()["usage"]["completion_tokens"] == CONTEXT


def test_models_endpoint_reports_no_length_limit(server):
    """Clients that size requests by ``max_model_len`` never truncate a history."""
    model = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
    assert model["max_model_len"] == UNLIMITED_STREAM_LEN


def test_prompt_embeds_get_400_and_the_server_keeps_serving(server):
    import base64
    import io

    import torch

    embeds = io.BytesIO()
    torch.save(torch.zeros(8, 576), embeds)
    body = {"model": server.model, "max_tokens": 4,
            "prompt_embeds": base64.b64encode(embeds.getvalue()).decode()}  # fmt: skip
    reply = requests.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert "enable-prompt-embeds" in reply.json()["error"]["message"]
    good = {"model": server.model, "prompt": "Hello", "max_tokens": 4}
    assert requests.post(f"{server.url}/v1/completions", json=good, timeout=60).status_code == 200
