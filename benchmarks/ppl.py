"""Perplexity over a long real text: dense, window, StreamingLLM and re-computation.

Teacher-forced through vLLM's prompt log-probabilities (fp32) over the Debian
handbook, far past the model's context (the paper's Figure 3 and Tables 1-2),
on SmolLM2-135M-Instruct (8192 positions) or, with ``--model gemma3``, Gemma 3
270M (32768 positions; sliding-window layers of 512 tokens):

* ``dense``: vLLM without streaming, within the context (its first tokens);
* ``dense_extrapolated``: the same past the context, its RoPE table stretched
  through ``hf_overrides`` (positions the model never saw);
* ``window``: S=0, a window of S+W tokens (block-granular eviction);
* ``sinks4_w<W>``: StreamingLLM, 4 sinks + W, for each ``--windows``;
* ``recompute_w<W>``: the oracle, sliding window with re-computation: each
  evaluated token is predicted from the previous S+W tokens encoded afresh at
  positions 0.. (HF transformers, float32; behind ``<bos>`` for a model whose
  prompts begin with it). It costs S+W tokens of compute per
  token, so it evaluates ``--oracle-tokens`` tokens spread evenly past the
  first eviction, for the windows in ``--oracle-windows``; StreamingLLM is
  compared with it on those same tokens.

``--fidelity`` instead measures how the prefill chunk size changes perplexity
against token-by-token streaming (the independent torch reference of
``vllm_sink_dev/reference.py`` with one token per step).

Writes ``results/<name>.json`` and a plot ``results/<name>.png``.

    .venv/bin/python benchmarks/ppl.py                  # about 25 minutes here
    .venv/bin/python benchmarks/ppl.py --fidelity       # about 10 minutes
    .venv/bin/python benchmarks/ppl.py --model gemma3 --tokens 36864 --windows 1020 \
        --skip-extrapolated --oracle-tokens 64
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    MODEL,
    RESULTS,
    TEXT,
    handbook_tokens,
    save_result,
    shutdown,
    thread_setting,
)

from vllm_sink_dev.paths import GEMMA3
from vllm_sink_dev.reference import StreamingLlamaReference, recompute_nll, window_starts

CONTEXT = 8192
SINKS = 4
SEGMENT = 1024
MODELS = {
    "smollm2": (MODEL, 8192),
    "gemma3": (GEMMA3, 32768),
}
"""``--model``: checkpoint and context."""


def text_tokens(count: int, model: Path = MODEL) -> list[int]:
    tokens = handbook_tokens(model)
    if len(tokens) < count:
        raise SystemExit(f"{TEXT} has {len(tokens)} tokens; asked for {count}")
    return tokens[:count]


def bos_prefix(model: Path, tokens: list[int]) -> list[int]:
    """``[<bos>]`` if the model's prompts begin with it (Gemma 3), else nothing (SmolLM2).

    The re-computation oracle then keeps it at the front of every window, as a
    served prompt would: without it Gemma 3's perplexity is far worse.
    """
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(model).bos_token_id
    return tokens[:1] if bos is not None and tokens[0] == bos else []


def vllm_nll(tokens: list[int], model: Path = MODEL, **engine_kwargs) -> list[float]:
    """Negative log-likelihood of ``tokens[1:]`` from one vLLM engine, one prompt."""
    from vllm import LLM, SamplingParams

    engine_kwargs.setdefault("max_num_batched_tokens", 1024)
    llm = LLM(str(model), dtype="float32", enforce_eager=True, **engine_kwargs)
    try:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        out = llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)[0]
        return [-d[t].logprob for d, t in zip(out.prompt_logprobs[1:], tokens[1:])]
    finally:
        shutdown(llm)


def streaming(sinks: int, window: int, chunk: int) -> dict:
    return {
        "additional_config": {"streaming_sinks": sinks, "streaming_window": window},
        "max_num_batched_tokens": chunk,
        "max_num_seqs": min(chunk, 16),
    }


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def segments(nll: list[float]) -> list[float]:
    """Perplexity per 1024-token segment (``nll[i]`` is the loss of token ``i + 1``)."""
    return [perplexity(nll[s : s + SEGMENT]) for s in range(0, len(nll), SEGMENT)]


def timed(label: str, run: Callable[..., list[float]], *args, **kwargs) -> list[float]:
    start = time.time()
    nll = run(*args, **kwargs)
    print(f"{label}: perplexity {perplexity(nll):.3f} over {len(nll)} tokens, "
          f"{time.time() - start:.0f} s", flush=True)  # fmt: skip
    return nll


def compare_policies(args: argparse.Namespace) -> dict:
    model, context = MODELS[args.model]
    tokens = text_tokens(args.tokens, model)
    runs: dict[str, list[float]] = {}
    runs["dense"] = timed("dense", vllm_nll, tokens[: context - 1], model, max_model_len=context)
    if not args.skip_extrapolated:
        stretched = {"max_position_embeddings": len(tokens) + 1}
        runs["dense_extrapolated"] = timed(
            "dense_extrapolated", vllm_nll, tokens, model,
            max_model_len=len(tokens) + 1, hf_overrides=stretched,
        )  # fmt: skip
    main_window = args.windows[len(args.windows) // 2]
    runs["window"] = timed(
        "window", vllm_nll, tokens, model, **streaming(0, main_window + SINKS, args.chunk)
    )
    oracle: dict[str, dict] = {}
    for window in args.windows:
        name = f"sinks4_w{window}"
        runs[name] = timed(name, vllm_nll, tokens, model, **streaming(SINKS, window, args.chunk))
        if window not in args.oracle_windows:
            continue
        cache = SINKS + window
        stride = max(1, (len(tokens) - cache) // args.oracle_tokens)
        targets = list(range(cache, len(tokens), stride))[: args.oracle_tokens]
        recomputed = timed(
            f"recompute_w{window}", recompute_nll, model, tokens, cache, targets,
            prefix=bos_prefix(model, tokens),
        )  # fmt: skip
        same_tokens = [runs[name][t - 1] for t in targets]
        oracle[f"w{window}"] = {
            "cache_tokens": cache,
            "evaluated_tokens": len(targets),
            "stride": stride,
            "recompute_perplexity": perplexity(recomputed),
            "sinks4_perplexity_same_tokens": perplexity(same_tokens),
            "window_perplexity_same_tokens": (
                perplexity([runs["window"][t - 1] for t in targets])
                if window == main_window
                else None
            ),
            "ratio_sinks4_to_recompute": perplexity(same_tokens) / perplexity(recomputed),
        }
    return {
        "text": TEXT.name,
        "tokens": len(tokens),
        "model": model.name,
        "context": context,
        "dtype": "float32",
        "prefill_chunk": args.chunk,
        "block_size": 128,
        "overall": {name: perplexity(nll) for name, nll in runs.items()},
        "segments": {name: segments(nll) for name, nll in runs.items()},
        "recompute": oracle,
    }


def chunk_fidelity(args: argparse.Namespace) -> dict:
    """Perplexity per prefill chunk size vs token-by-token streaming (the reference)."""
    import torch

    window = 1020
    tokens = text_tokens(CONTEXT)
    starts = window_starts(len(tokens), SINKS, window, 128, prompt_len=len(tokens), chunk=1)
    reference = StreamingLlamaReference(MODEL)
    logprobs = reference.logprobs(tokens, SINKS, starts)
    one_by_one = [-logprobs[p - 1, tokens[p]].item() for p in range(1, len(tokens))]
    del reference, logprobs
    torch.set_num_threads(os.cpu_count() or 1)
    after = slice(SINKS + window, None)  # tokens past the first eviction
    result = {
        "tokens": len(tokens),
        "window": window,
        "token_by_token_perplexity": perplexity(one_by_one[after]),
        "chunks": {},
    }
    for chunk in args.chunks:
        nll = timed(f"chunk {chunk}", vllm_nll, tokens, **streaming(SINKS, window, chunk))
        diffs = [abs(a - b) for a, b in zip(nll[after], one_by_one[after])]
        result["chunks"][str(chunk)] = {
            "perplexity": perplexity(nll[after]),
            "ratio_to_token_by_token": perplexity(nll[after]) / perplexity(one_by_one[after]),
            "mean_abs_nll_diff": sum(diffs) / len(diffs),
            "max_abs_nll_diff": max(diffs),
        }
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.5))
    for name, values in result["segments"].items():
        ends = [min((i + 1) * SEGMENT, result["tokens"]) for i in range(len(values))]
        axis.plot(ends, [math.log(v) for v in values], marker=".", label=name)
    for window, oracle in result["recompute"].items():
        axis.axhline(
            math.log(oracle["recompute_perplexity"]), linestyle=":", linewidth=1,
            label=f"recompute {window}: mean of {oracle['evaluated_tokens']} sampled tokens",
        )  # fmt: skip
    context = result.get("context", CONTEXT)
    axis.axvline(context, color="grey", linewidth=0.8)
    axis.text(context, axis.get_ylim()[1], " model context", va="top", color="grey")
    axis.set_xlabel("tokens into the text (per 1024-token segment)")
    axis.set_ylabel("log perplexity")
    axis.set_title(f"{result['model']}, {result['text']}: streaming vs dense vs window")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_480)
    parser.add_argument("--windows", type=int, nargs="+", default=[508, 1020, 2044])
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk (streaming)")
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--oracle-windows", type=int, nargs="*", default=[1020])
    parser.add_argument(
        "--oracle-tokens", type=int, default=192, help="tokens the oracle evaluates per window"
    )
    parser.add_argument("--skip-extrapolated", action="store_true")
    parser.add_argument("--fidelity", action="store_true")
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    if args.fidelity:
        result = chunk_fidelity(args)
        name = args.name or "ppl_chunk_fidelity"
    else:
        result = compare_policies(args)
        name = args.name or f"ppl_{args.model}_{args.tokens // 1024}k"
    result["threads"] = thread_setting()
    save_result(name, result, print_without=("segments",))
    if not args.fidelity:
        plot(result, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
