"""``vllm serve --streaming-uncached-prompts window`` over HTTP: a chat whose history no
snapshot holds is answered from its sinks and last window, and its next turn resumes.

SmolLM2 with its declared context cut to 1024 positions, as in ``test_serve_chat``.
"""

from __future__ import annotations

import time

import openai
import pytest

from vllm_sink_dev.serve import vllm_serve, with_short_context

pytestmark = pytest.mark.engine

SINKS, WINDOW = 4, 252
FLAGS = ["--streaming-sinks", str(SINKS), "--streaming-window", str(WINDOW), "--block-size", "32",
         "--max-num-batched-tokens", "256", "--streaming-uncached-prompts", "window"]  # fmt: skip


def figures(server) -> dict[str, float]:
    """The server's figures once no request runs."""
    deadline = time.time() + 30
    while (metrics := server.metrics())["vllm:num_requests_running"] and time.time() < deadline:
        time.sleep(0.5)
    return metrics


def test_a_history_no_snapshot_holds_costs_its_window_and_its_next_turn_resumes(
    smollm2, handbook_tokens, tmp_path
):
    from transformers import AutoTokenizer

    model = with_short_context(smollm2, 1024, tmp_path / "SmolLM2-1k")
    book = AutoTokenizer.from_pretrained(model).decode(handbook_tokens[:1500])
    with vllm_serve(model, FLAGS, tmp_path / "server.log", 1) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        messages = [
            {"role": "user", "content": book},
            {"role": "assistant", "content": "A long handbook excerpt."},
            {"role": "user", "content": "Summarize it in one sentence."},
        ]
        reply = client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=24, temperature=0
        )
        prompt_tokens = reply.usage.prompt_tokens
        assert prompt_tokens > 3 * (SINKS + WINDOW)  # usage counts the prompt the client sent
        assert reply.choices[0].message.content.strip()
        after_first = figures(server)
        assert after_first["vllm_sink:prompts_cut_total"] == 1
        cut = prompt_tokens - SINKS - WINDOW
        assert after_first["vllm_sink:prompt_tokens_cut_total"] == cut
        # vLLM's own counts: the prompt as the client sent it, the tokens computed of it.
        assert after_first["vllm:request_prompt_tokens_sum"] == prompt_tokens
        assert after_first["vllm:prompt_tokens_total"] == SINKS + WINDOW

        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": "And in three words?"},
        ]
        reply = client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content.strip()
        after_second = figures(server)
        assert after_second["vllm_sink:snapshot_hits_total"] == 1
        assert after_second["vllm_sink:prompts_cut_total"] == 1
