"""Steady-state decode: streams past their first eviction vs dense requests, same cache size.

Once a stream's cache is full, each decode step attends its S sinks plus
``W .. W + bs - 1`` recent tokens: the work of a dense step over the same
number of cached tokens. This benchmark measures both side by side, on the
same model and batch, with both engines alive at once (one process each):

* **streaming**: ``batch`` streams past their first eviction, decoding on:
  each evicts one block (table compaction, moving the sinks, now and then
  re-rotating the window) every ``bs`` tokens. Their prompt lengths are
  staggered across a block, so that their evictions fall on different steps,
  one at a time, as in a server whose streams arrived at different times;
* **dense**: the same engine settings without streaming, prompts of
  ``S + W - 1`` tokens, so that over a run each request attends on average as
  many tokens as a stream (``S + W .. S + W + bs - 1``).

Only pure decode steps are timed (every request past its prompt), in runs of
``bs`` steps: exactly one eviction per stream per run. The two engines take
turns run by run, in alternating order, so that the machine's drifts hit both
alike; each cell keeps the median of the runs' mean step times, over at least
``--repeats`` runs and ``--min-seconds`` of timed steps per mode.
Batches are measured largest first, each a subset of the previous one, so that
the streams need no fresh prefill and dense prompts come from vLLM's prefix
cache. Each run also reports where its steps' time went, phase by phase
(:mod:`step_breakdown`), so that a gap between the modes can be placed.
Writes ``results/<name>.json``.

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/decode.py
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import time
from multiprocessing.connection import Connection

from common import (
    BLOCK_SIZE,
    DECODE_CHUNK,
    HEAD_SIZE,
    KV_HEADS,
    LAYERS,
    MODEL,
    all_decoding,
    handbook_tokens,
    make_engine,
    save_result,
    shutdown,
    thread_setting,
    timed_decode_steps,
)  # fmt: skip
from step_breakdown import StepBreakdown

KV_BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_SIZE * 4  # fp32 K and V


def kv_cache_gib(window: int, sinks: int, max_batch: int) -> int:
    """``VLLM_CPU_KVCACHE_SPACE`` for one engine: every stream's bound, and a spare block."""
    blocks = math.ceil((sinks + window + DECODE_CHUNK) / BLOCK_SIZE) + 2
    return math.ceil((max_batch * blocks + 1) * BLOCK_SIZE * KV_BYTES_PER_TOKEN / 2**30)


def stream_phases(batch: int, block_size: int) -> list[int]:
    """How far into its block each stream starts; every subset of the batch spread evenly."""
    return [k * block_size // batch for k in range(batch)]


def subset(batch: int, max_batch: int) -> list[int]:
    """The requests (by index) of a smaller batch: every ``max_batch // batch``-th."""
    return list(range(0, max_batch, max_batch // batch))[:batch]


def engine_process(conn: Connection, mode: str, window: int, args: argparse.Namespace) -> None:
    """One engine (streaming or dense); runs timed runs when the parent asks."""
    kv_gib = kv_cache_gib(window, args.sinks, args.max_batch)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    from vllm import SamplingParams

    streaming = mode == "streaming"
    llm = make_engine(
        window if streaming else None, args.sinks, args.max_batch, args.eager, kv_cache_gib=kv_gib
    )
    engine = llm.llm_engine
    block_size = engine.vllm_config.cache_config.block_size
    cached = args.sinks + window
    text = handbook_tokens()
    if streaming:  # past the first eviction, staggered across a block
        lengths = [cached + block_size + p for p in stream_phases(args.max_batch, block_size)]
    else:
        lengths = [cached - 1] * args.max_batch
    lengths = [n - args.warmup for n in lengths]
    starts = [(k + 1) * 7919 % (len(text) - max(lengths)) for k in range(args.max_batch)]
    requests = [{"prompt_token_ids": text[s : s + n]} for s, n in zip(starts, lengths)]
    room = engine.vllm_config.model_config.max_model_len - max(lengths)
    params = SamplingParams(max_tokens=min(room, 10**6), temperature=0.8, ignore_eos=True)
    if streaming:
        streams = {k: f"stream-{k}" for k in range(args.max_batch)}  # request index -> id
        for k, request_id in streams.items():
            engine.add_request(request_id, requests[k], params)
        while not all_decoding(llm, args.max_batch):  # prefill before the timed runs
            engine.step()
    else:  # prefilled once; every run finds the prompts in the prefix cache
        llm.generate(requests, SamplingParams(max_tokens=1), use_tqdm=False)
    breakdown = StepBreakdown(llm)
    conn.send("ready")
    while (batch := conn.recv()) is not None:
        keep = subset(batch, args.max_batch)
        if streaming:
            engine.abort_request([streams.pop(k) for k in list(streams) if k not in keep])
            timed, phases = timed_decode_steps(llm, batch, block_size, args.warmup, breakdown)
        else:
            run_ids = [f"dense-{time.monotonic_ns()}-{k}" for k in keep]
            for request_id, k in zip(run_ids, keep):
                engine.add_request(request_id, requests[k], params)
            timed, phases = timed_decode_steps(llm, batch, block_size, args.warmup, breakdown)
            engine.abort_request(run_ids)
            while engine.has_unfinished_requests():
                engine.step()
        conn.send((statistics.mean(timed), phases))
    shutdown(llm)


def mean_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's milliseconds per step, averaged over runs."""
    return {phase: statistics.mean(run.get(phase, 0.0) for run in runs) for phase in runs[0]}


def measure_window(window: int, args: argparse.Namespace, bar) -> list[dict]:
    """Every batch size's cell for one window, the engines taking turns."""
    context = multiprocessing.get_context("spawn")
    engines: dict[str, Connection] = {}
    processes = []
    for mode in args.modes:  # one at a time: start-ups would share the cores
        parent, child = context.Pipe()
        process = context.Process(target=engine_process, args=(child, mode, window, args))
        process.start()
        if parent.recv() != "ready":
            raise RuntimeError(f"{mode} engine did not start")
        engines[mode], processes = parent, processes + [process]
    cells = []
    for batch in sorted(args.batches, reverse=True):
        runs: dict[str, list[float]] = {mode: [] for mode in args.modes}
        phases: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.modes}
        while (
            len(runs[args.modes[0]]) < args.repeats
            or min(sum(seconds) * BLOCK_SIZE for seconds in runs.values()) < args.min_seconds
        ):  # short runs (small batches) are noisier: more of them
            order = args.modes if len(runs[args.modes[0]]) % 2 == 0 else args.modes[::-1]
            for mode in order:
                engines[mode].send(batch)
                seconds, run_phases = engines[mode].recv()
                runs[mode].append(seconds)
                phases[mode].append(run_phases)
        bar.update()
        cell = {"window": window, "cached_tokens": args.sinks + window, "batch": batch}
        step = {mode: statistics.median(seconds) for mode, seconds in runs.items()}
        for mode in args.modes:
            cell[f"{mode}_tokens_per_s"] = batch / step[mode]
        if len(step) == 2:
            cell["ratio"] = step["dense"] / step["streaming"]
        for mode in args.modes:
            cell[f"{mode}_ms_per_step_by_phase"] = mean_phases(phases[mode])
        for mode in args.modes:
            cell[f"{mode}_step_seconds_per_run"] = runs[mode]
        cells.append(cell)
        bar.write(f"W={window} batch {batch}: ratio {cell.get('ratio', '-')} {runs}")
    for connection in engines.values():
        connection.send(None)
    for process in processes:
        process.join()
    return sorted(cells, key=lambda cell: cell["batch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1020, 4092])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="fewest runs per cell and mode")
    parser.add_argument(
        "--min-seconds", type=float, default=60, help="fewest timed seconds per cell and mode"
    )
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument(
        "--modes", nargs="+", choices=("streaming", "dense"), default=["streaming", "dense"],
        help="one mode alone (e.g. under a profiler) reports no ratio",
    )  # fmt: skip
    parser.add_argument("--name", default="decode_smollm2")
    args = parser.parse_args()
    args.max_batch = max(args.batches)
    if any(args.max_batch % batch for batch in args.batches):
        parser.error("every batch size must divide the largest")
    from tqdm import tqdm

    with tqdm(total=len(args.windows) * len(args.batches), unit="cell") as bar:
        cells = [cell for window in args.windows for cell in measure_window(window, args, bar)]
    result = {
        "model": MODEL.name,
        "dtype": "float32",
        "compiled": not args.eager,
        "sinks": args.sinks,
        "min_runs": args.repeats,
        "min_timed_seconds": args.min_seconds,
        "threads": thread_setting(),
        "cells": cells,
    }
    save_result(args.name, result)


if __name__ == "__main__":
    main()
