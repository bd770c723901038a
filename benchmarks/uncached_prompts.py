"""What ``--streaming-uncached-prompts window`` costs in quality, and what it saves in time.

A conversation whose snapshot is gone sends its whole history again. Streamed,
it costs O(history); cut to its sinks and last window, O(W). Quality: for
``--docs`` places in the Debian handbook, a history of ``--history`` tokens,
then the perplexity of the ``--next`` tokens that follow (teacher-forced,
vLLM's prompt log-probabilities, float32), when the history was

* ``stream``: streamed whole (4 sinks + W, what vllm-sink does by default);
* ``window``: cut to its first 4 tokens and last W (what the flag computes: the
  engine tests check, against the torch reference, that a cut prompt's stream
  is exactly the stream of these tokens).

Both on one engine; the flag itself is not used for them because a request
asking for prompt log-probabilities is never cut. Time: first token of a
history of each ``--ttft-histories`` length sent to two engines side by side,
the flag off and on (no snapshots kept, so every request misses).

Writes ``results/<name>.json`` and ``results/<name>.png``.

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/uncached_prompts.py
    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/uncached_prompts.py \
        --model gemma3 --ttft-histories 2048 8192
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from common import RESULTS, TEXT, handbook_tokens, save_result, shutdown, thread_setting
from ppl import MODELS, bos_prefix

from vllm_sink.core.uncached_prompts import cut_tokens

SINKS = 4


def engine(model: Path, window: int, mode: str):
    from vllm import LLM

    config = {
        "streaming_sinks": SINKS,
        "streaming_window": window,
        "streaming_snapshots": 0,
        "streaming_uncached_prompts": mode,
    }
    return LLM(
        str(model),
        dtype="float32",
        enforce_eager=True,
        max_num_batched_tokens=1024,
        max_num_seqs=8,
        additional_config=config,
    )


def next_token_nll(llm, prompts: list[list[int]], count: int) -> list[list[float]]:
    """Per prompt, the loss of each of its last ``count`` tokens."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        [-d[t].logprob for d, t in zip(out.prompt_logprobs[-count:], prompt[-count:])]
        for out, prompt in zip(outs, prompts)
    ]


def first_token_seconds(llm, prompt: list[int]) -> float:
    from vllm import SamplingParams

    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    return time.perf_counter() - start


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def measure(args: argparse.Namespace) -> dict:
    model, _ = MODELS[args.model]
    tokens = handbook_tokens(model)
    bos = bos_prefix(model, tokens)
    body = tokens[len(bos) :]
    span = args.history + args.next
    stride = (len(body) - span) // max(1, args.docs - 1)
    docs = [bos + body[i * stride : i * stride + span] for i in range(args.docs)]
    cut = args.history - SINKS - args.window
    windowed = [cut_tokens(doc, SINKS, cut) for doc in docs]

    llm = engine(model, args.window, "stream")
    start = time.time()
    nll = {
        "stream": next_token_nll(llm, docs, args.next),
        "window": next_token_nll(llm, windowed, args.next),
    }
    print(f"perplexity measured in {time.time() - start:.0f} s", flush=True)
    first = min(args.next, 1024)
    quality = {
        mode: {
            f"next_{first}": perplexity([x for doc in runs for x in doc[:first]]),
            f"next_{args.next}": perplexity([x for doc in runs for x in doc]),
            "per_doc": [perplexity(doc) for doc in runs],
        }
        for mode, runs in nll.items()
    }
    for key in (f"next_{first}", f"next_{args.next}"):
        quality[f"ratio_window_to_stream_{key}"] = quality["window"][key] / quality["stream"][key]
        print(f"{key}: stream {quality['stream'][key]:.3f}, window {quality['window'][key]:.3f}")

    prompts = {h: body[:h] for h in args.ttft_histories}
    ttft: dict[str, dict[str, float]] = {"stream": {}}
    for history, prompt in prompts.items():
        ttft["stream"][str(history)] = first_token_seconds(llm, bos + prompt)
        print(f"stream, history {history}: {ttft['stream'][str(history)]:.2f} s", flush=True)
    shutdown(llm)
    llm = engine(model, args.window, "window")
    first_token_seconds(llm, bos + body[: args.window])  # warm-up, as the other engine had
    ttft["window"] = {}
    for history, prompt in prompts.items():
        ttft["window"][str(history)] = first_token_seconds(llm, bos + prompt)
        print(f"window, history {history}: {ttft['window'][str(history)]:.2f} s", flush=True)
    shutdown(llm)
    return {
        "text": TEXT.name,
        "model": model.name,
        "dtype": "float32",
        "sinks": SINKS,
        "window": args.window,
        "block_size": 128,
        "prefill_chunk": 1024,
        "docs": args.docs,
        "doc_stride_tokens": stride,
        "history_tokens": args.history,
        "next_tokens": args.next,
        "quality": quality,
        "first_token_seconds": ttft,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    quality = result["quality"]
    docs = range(len(quality["stream"]["per_doc"]))
    for offset, mode in ((-0.2, "stream"), (0.2, "window")):
        left.bar([d + offset for d in docs], quality[mode]["per_doc"], width=0.4, label=mode)
    left.set_xlabel(f"document (history {result['history_tokens']} tokens)")
    left.set_ylabel(f"perplexity of the next {result['next_tokens']} tokens")
    left.set_title("quality: history streamed vs cut to sinks + window")
    left.legend()
    for mode, times in result["first_token_seconds"].items():
        histories = [int(h) for h in times]
        right.plot(histories, list(times.values()), marker="o", label=mode)
    right.set_xscale("log", base=2)
    right.set_xlabel("history tokens (no snapshot)")
    right.set_ylabel("first token, s")
    right.set_title("a miss: time to first token")
    right.legend()
    figure.suptitle(
        f"{result['model']}, {SINKS} sinks + {result['window']}, {result['threads']}", fontsize=9
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--history", type=int, default=8192)
    parser.add_argument("--next", type=int, default=2048)
    parser.add_argument("--ttft-histories", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    result = measure(args)
    result["threads"] = thread_setting()
    name = args.name or f"uncached_prompts_{args.model}"
    save_result(name, result)
    plot(result, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
