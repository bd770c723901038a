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

Only pure decode steps are timed (every request past its prompt), in runs of
``bs`` steps, i.e. exactly one eviction per stream per run; each cell is
measured in ``--repeats`` runs and the median of the runs' mean step times
kept. Writes ``results/<name>.json``.

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/decode.py
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "10")  # 32 streams of 4 + 4092

from common import MODEL, handbook_tokens, save_result, shutdown, thread_setting


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


def decode_step_seconds(llm, prompts: list[list[int]], steps: int, warmup: int, repeats: int):
    """Mean wall time of a decode step, in ``repeats`` runs of ``steps`` pure decode steps.

    Requests whose prefill ends early decode while the others prefill, so they
    run ahead; timing starts ``warmup`` steps after every request is decoding.
    Streams are in their steady state whatever their lead, so their runs are
    consecutive: each of ``steps = bs`` steps holds exactly one eviction per
    stream. A dense request's cache grows as it decodes, so each of its runs
    starts afresh from the same prompts: prefilled once, then found in vLLM's
    prefix cache, so that every run attends the same number of tokens.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    dense = engine.vllm_config.cache_config.enable_prefix_caching
    requests = [{"prompt_token_ids": p} for p in prompts]
    if dense:
        llm.generate(requests, SamplingParams(max_tokens=1), use_tqdm=False)
    room = engine.vllm_config.model_config.max_model_len - max(map(len, prompts))
    params = SamplingParams(max_tokens=min(room, 100_000), temperature=0.8, ignore_eos=True)
    runs: list[float] = []
    ids: list[str] = []
    for run in range(repeats):
        if dense or run == 0:
            ids = [f"r{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
            for request_id, request in zip(ids, requests):
                engine.add_request(request_id, request, params)
            timed = _timed_decode_steps(llm, len(prompts), steps, warmup)
        else:
            timed = _timed_decode_steps(llm, len(prompts), steps, 0)
        runs.append(statistics.mean(timed))
        if dense or run == repeats - 1:
            engine.abort_request(ids)
            while engine.has_unfinished_requests():
                engine.step()
    return runs


def _timed_decode_steps(llm, batch: int, steps: int, warmup: int) -> list[float]:
    """Times of ``steps`` engine steps in which all ``batch`` requests decode."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    timed: list[float] = []
    decoded = 0
    while len(timed) < steps:
        running = list(scheduler.requests.values())
        decoding = len(running) == batch and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in running
        )
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        if decoding:
            decoded += 1
            if decoded > warmup:
                timed.append(seconds)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1020, 4092])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument(
        "--modes", nargs="+", choices=("streaming", "dense"), default=["streaming", "dense"],
        help="one mode alone (e.g. under a profiler) reports no ratio",
    )  # fmt: skip
    parser.add_argument("--name", default="decode_smollm2")
    args = parser.parse_args()
    from tqdm import tqdm

    text = handbook_tokens()
    cells = []
    with tqdm(total=len(args.modes) * len(args.windows) * len(args.batches)) as bar:
        for window in args.windows:
            cached = args.sinks + window
            runs: dict[str, dict[int, list[float]]] = {}  # mean step seconds of each run
            for mode in args.modes:
                llm = make_engine(
                    window if mode == "streaming" else None,
                    args.sinks, max(args.batches), args.eager,
                )  # fmt: skip
                block_size = llm.llm_engine.vllm_config.cache_config.block_size
                prompt_len = cached + block_size if mode == "streaming" else cached - 1
                prompt_len -= args.warmup
                runs[mode] = {}
                for batch in args.batches:
                    starts = [(k + 1) * 7919 % (len(text) - prompt_len) for k in range(batch)]
                    prompts = [text[s : s + prompt_len] for s in starts]
                    runs[mode][batch] = decode_step_seconds(
                        llm, prompts, block_size, args.warmup, args.repeats
                    )
                    bar.update()
                    bar.write(f"W={window} {mode} batch {batch}: {runs[mode][batch]}")
                shutdown(llm)
                del llm  # frees its KV cache before the next engine allocates one
                gc.collect()
            for batch in args.batches:
                cell = {"window": window, "cached_tokens": cached, "batch": batch}
                step = {mode: statistics.median(runs[mode][batch]) for mode in args.modes}
                for mode in args.modes:
                    cell[f"{mode}_tokens_per_s"] = batch / step[mode]
                    cell[f"{mode}_step_seconds_per_run"] = runs[mode][batch]
                if len(step) == 2:
                    cell["ratio"] = step["dense"] / step["streaming"]
                cells.append(cell)
    result = {
        "model": MODEL.name,
        "dtype": "float32",
        "compiled": not args.eager,
        "sinks": args.sinks,
        "threads": thread_setting(),
        "cells": cells,
    }
    save_result(args.name, result)


if __name__ == "__main__":
    main()
