"""A long chat through `vllm serve`: time per turn with snapshots (reuse) vs re-streaming.

One `openai` client talks to SmolLM2 through `/v1/chat/completions` (its chat
template), each turn a passage of the Debian handbook and a question, greedy,
streamed, the whole history re-sent every turn as chat clients do; the history
grows far past the model's 8,192-token context. For each turn: time to first
token, total time, prompt tokens, and whether the turn resumed the previous
turn's stream (vllm-sink's ``/metrics``). Then a second server with
``--streaming-snapshots 0`` (today's behaviour without reuse: every turn streams
its whole history) answers the same requests at ``--baseline-turns``.
Writes ``results/<name>.json`` and a plot ``results/<name>.png``.

    .venv/bin/python benchmarks/chat_turns.py --turns 100

Both servers compute on both cores (``vllm_sink_dev.serve``: float32, eager).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import MODEL, RESULTS, save_result

from vllm_sink_dev.serve import vllm_serve

FLAGS = ["--streaming-sinks", "4", "--streaming-window", "1020", "--max-num-batched-tokens", "1024"]
QUESTION = "In one sentence, what is this passage about?"


def passages(tokenizer, count: int, tokens_each: int) -> list[str]:
    from common import handbook_tokens

    text = handbook_tokens()
    return [tokenizer.decode(text[i * tokens_each : (i + 1) * tokens_each]) for i in range(count)]


def ask(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed turn: its reply, time to first token and total time."""
    start = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    end = time.perf_counter()
    return {
        "reply": "".join(pieces),
        "ttft_s": (first or end) - start,
        "total_s": end - start,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }


def counters(server) -> dict[str, float]:
    metrics = server.metrics()
    return {
        name: metrics[f"vllm_sink:{name}_total"]
        for name in ("snapshot_hits", "snapshot_misses", "snapshot_tokens_skipped")
    }


def converse(server, turns: int, passage_tokens: int, max_tokens: int) -> tuple[list, list]:
    """The chat with reuse: per-turn figures, and each turn's request (for the baseline)."""
    import openai
    from tqdm import tqdm
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    texts = passages(AutoTokenizer.from_pretrained(server.model), turns, passage_tokens)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    results, requests_sent = [], []
    for turn, text in enumerate(tqdm(texts, desc="turns (reuse)"), start=1):
        messages.append({"role": "user", "content": f"{text}\n\n{QUESTION}"})
        before = counters(server)
        requests_sent.append([dict(m) for m in messages])
        result = ask(client, server.model, messages, max_tokens)
        after = counters(server)
        result |= {
            "turn": turn,
            "resumed": after["snapshot_hits"] > before["snapshot_hits"],
            "tokens_not_prefilled": after["snapshot_tokens_skipped"]
            - before["snapshot_tokens_skipped"],
        }
        messages.append({"role": "assistant", "content": result.pop("reply")})
        results.append(result)
    return results, requests_sent


def baseline(server, requests_sent: list, turns: list[int], max_tokens: int) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = []
    for turn in turns:
        result = ask(client, server.model, requests_sent[turn - 1], max_tokens)
        result.pop("reply")
        out.append(result | {"turn": turn})
        print(
            f"baseline turn {turn}: {result['prompt_tokens']} tokens, ttft {result['ttft_s']:.1f} s"
        )
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reuse, base = result["turns"], result["baseline"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(
        [r["turn"] for r in reuse],
        [r["ttft_s"] for r in reuse],
        ".-",
        label="reuse: time to first token",
    )
    ax.plot(
        [r["turn"] for r in reuse],
        [r["total_s"] for r in reuse],
        ".-",
        alpha=0.5,
        label="reuse: total",
    )
    ax.plot(
        [b["turn"] for b in base],
        [b["ttft_s"] for b in base],
        "s--",
        label="re-streaming: time to first token",
    )
    ax.set_yscale("log")
    ax.set_xlabel("turn")
    ax.set_ylabel("seconds")
    ax.set_title(
        f"{result['turns_count']}-turn chat through vllm serve, SmolLM2, 4 + 1020, 2 cores"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--passage-tokens", type=int, default=450)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--baseline-turns", type=int, nargs="*", default=[10, 50, 100])
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    name = args.name or f"chat_turns_smollm2_{args.turns}"
    with tempfile.TemporaryDirectory() as tmp:
        with vllm_serve(MODEL, FLAGS, Path(tmp) / "reuse.log") as server:
            turns, requests_sent = converse(
                server, args.turns, args.passage_tokens, args.max_tokens
            )
        wanted = [t for t in args.baseline_turns if t <= args.turns]
        with vllm_serve(
            MODEL, [*FLAGS, "--streaming-snapshots", "0"], Path(tmp) / "base.log"
        ) as server:
            base = baseline(server, requests_sent, wanted, args.max_tokens)
    late = [r["total_s"] for r in turns[-10:]]
    early = [r["total_s"] for r in turns[9:20]]
    by_turn = {r["turn"]: r for r in turns}
    result = {
        "model": MODEL.name,
        "flags": FLAGS,
        "turns_count": len(turns),
        "threads": "server: VLLM_CPU_OMP_THREADS_BIND=0-1 (vllm_sink_dev.serve), float32, eager",
        "hit_rate_after_first": sum(r["resumed"] for r in turns[1:]) / max(1, len(turns) - 1),
        "history_tokens_at_end": turns[-1]["prompt_tokens"],
        "late_over_early_turn_time": statistics.median(late) / statistics.median(early)
        if early
        else None,
        "ttft_speedup_at_baseline_turns": {
            b["turn"]: b["ttft_s"] / by_turn[b["turn"]]["ttft_s"] for b in base
        },
        "turns": turns,
        "baseline": base,
    }
    save_result(name, result, print_without=("turns",))
    plot(result, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
