"""Steady-state decode: streams past their first eviction vs dense requests, same cache size.

Once a stream's cache is full, each decode step attends its S sinks plus
``W .. W + bs - 1`` recent tokens: the work of a dense step over the same
number of cached tokens. This benchmark measures both side by side, in one
process, on the same model and batch:

* **streaming**: ``batch`` streams whose prompts end just before their first
  eviction, decoding past it: one eviction (table compaction, moving the
  sinks, now and then re-rotating the window) every ``bs`` tokens per stream;
* **dense**: the same engine settings without streaming, prompts of
  ``S + W - 1`` tokens, so that each measured step attends the same number of
  tokens as the streaming step it is compared with (``S + W .. S + W + bs - 1``,
  the streams' cache after their first eviction).

Only pure decode steps are timed (every request past its prompt), ``bs`` of
them per cell, i.e. exactly one eviction per stream; each cell is measured
``--repeats`` times (fresh requests) and the median of the runs' mean step
times kept. Writes
``results/<name>.json``.

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/decode.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "10")  # 32 streams of 4 + 4092

from common import MODEL, RESULTS, handbook_tokens, shutdown


def make_engine(window: int | None, sinks: int, max_batch: int, eager: bool):
    from vllm import LLM

    streaming = (
        {"additional_config": {"streaming_sinks": sinks, "streaming_window": window}}
        if window is not None
        else {}
    )
    return LLM(
        str(MODEL), dtype="float32", enforce_eager=eager, max_num_seqs=max_batch,
        max_num_batched_tokens=1024, disable_log_stats=True, **streaming,
    )  # fmt: skip


def decode_step_seconds(llm, prompts: list[list[int]], steps: int, warmup: int) -> list[float]:
    """Wall time of ``steps`` pure decode steps, after ``warmup`` of them.

    Requests whose prefill ends early decode while the others prefill, so they
    run ahead. For a dense engine (prefix caching on) the prompts are prefilled
    once beforehand so that every request starts decoding within a step or two
    at the same cache length; streams are in their steady state whatever their
    lead. Requests are aborted once the steps are timed.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    requests = [{"prompt_token_ids": p} for p in prompts]
    if engine.vllm_config.cache_config.enable_prefix_caching:
        llm.generate(requests, SamplingParams(max_tokens=1), use_tqdm=False)
    room = engine.vllm_config.model_config.max_model_len - max(map(len, prompts))
    params = SamplingParams(max_tokens=min(room, 100_000), temperature=0.8, ignore_eos=True)
    ids = [f"r{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for request_id, request in zip(ids, requests):
        engine.add_request(request_id, request, params)
    timed: list[float] = []
    decoded = 0
    while len(timed) < steps:
        running = list(scheduler.requests.values())
        decoding = len(running) == len(prompts) and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in running
        )
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        if decoding:
            decoded += 1
            if decoded > warmup:
                timed.append(seconds)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1020, 4092])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--name", default="decode_smollm2")
    args = parser.parse_args()
    from tqdm import tqdm

    text = handbook_tokens()
    cells = []
    with tqdm(total=2 * len(args.windows) * len(args.batches) * args.repeats) as bar:
        for window in args.windows:
            cached = args.sinks + window
            medians: dict[str, dict[int, float]] = {}
            for mode in ("streaming", "dense"):
                llm = make_engine(
                    window if mode == "streaming" else None,
                    args.sinks, max(args.batches), args.eager,
                )  # fmt: skip
                block_size = llm.llm_engine.vllm_config.cache_config.block_size
                prompt_len = cached + block_size if mode == "streaming" else cached - 1
                prompt_len -= args.warmup
                medians[mode] = {}
                for batch in args.batches:
                    runs = []
                    for repeat in range(args.repeats):
                        starts = [
                            ((k + 1) * 7919 + repeat * 131) % (len(text) - prompt_len)
                            for k in range(batch)
                        ]
                        prompts = [text[s : s + prompt_len] for s in starts]
                        runs.append(
                            statistics.mean(
                                decode_step_seconds(llm, prompts, block_size, args.warmup)
                            )
                        )
                        bar.update()
                    medians[mode][batch] = statistics.median(runs)
                    bar.write(f"W={window} {mode} batch {batch}: {runs}")
                shutdown(llm)
                del llm  # frees its KV cache before the next engine allocates one
                gc.collect()
            for batch in args.batches:
                stream_s, dense_s = medians["streaming"][batch], medians["dense"][batch]
                cells.append(
                    {
                        "window": window,
                        "cached_tokens": cached,
                        "batch": batch,
                        "streaming_tokens_per_s": batch / stream_s,
                        "dense_tokens_per_s": batch / dense_s,
                        "ratio": dense_s / stream_s,
                    }
                )
    result = {
        "model": MODEL.name,
        "dtype": "float32",
        "compiled": not args.eager,
        "sinks": args.sinks,
        "threads": "VLLM_CPU_OMP_THREADS_BIND="
        + os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "cells": cells,
    }
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
