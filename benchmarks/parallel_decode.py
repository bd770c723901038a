"""Decode with tensor parallelism: TP=2 vs TP=1, streaming vs dense over the same cache size.

Gemma 3 270M (float32, eager), ``--batch`` requests decoding together:

* **streaming**: 4 sinks + 1020 window, prompts past the first eviction;
* **dense**: no streaming, prompts of ``S + W - 1`` tokens, so that over the
  timed steps each request attends on average as many tokens as a stream.

Each of the four engines runs in a process of its own, one after the other:
TP=1 with both cores for its one rank (``VLLM_CPU_OMP_THREADS_BIND=0-1``),
TP=2 with one core per rank (``0|1``). Only pure decode steps are timed,
``--steps`` of them after ``--warmup``. Writes ``results/<name>.json``.

    .venv/bin/python benchmarks/parallel_decode.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import all_decoding, save_result

from vllm_sink_dev.paths import GEMMA3, TEXT

SINKS, WINDOW, BLOCK, CHUNK = 4, 1020, 128, 1024
BINDINGS = {1: "0-1", 2: "0|1"}
"""Tensor-parallel size -> ``VLLM_CPU_OMP_THREADS_BIND``: both cores either way."""


def measure(tp: int, streaming: bool, args: argparse.Namespace) -> dict:
    """Runs in its own process: one engine, its decode tokens per second."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    ids = AutoTokenizer.from_pretrained(GEMMA3)(TEXT.read_text()[:200_000])["input_ids"]
    length = args.prompt if streaming else SINKS + WINDOW - 1
    prompts = [[ids[0], *ids[1 + i * 97 : i * 97 + length]] for i in range(args.batch)]
    extra = (
        {"additional_config": {"streaming_sinks": SINKS, "streaming_window": WINDOW}}
        if streaming
        else {}
    )
    llm = LLM(
        str(GEMMA3), dtype="float32", enforce_eager=True, block_size=BLOCK,
        max_num_batched_tokens=CHUNK, max_num_seqs=args.batch, disable_log_stats=True,
        tensor_parallel_size=tp, distributed_executor_backend="mp" if tp > 1 else None,
        **extra,
    )  # fmt: skip
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=args.warmup + args.steps + 8, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    while not all_decoding(llm, args.batch):
        engine.step()
    for _ in range(args.warmup):
        engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    seconds = time.perf_counter() - start
    return {"decode_tokens_per_s": round(args.batch * args.steps / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1300, help="streaming prompt tokens")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--name", default="parallel_decode_gemma3")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "tp,streaming": one measurement
    args = parser.parse_args()
    if args.child:
        tp, streaming = args.child.split(",")
        print("RESULT " + json.dumps(measure(int(tp), streaming == "1", args)), flush=True)
        return
    cells = {}
    for tp, binding in BINDINGS.items():
        for streaming in (True, False):
            mode = f"TP={tp} {'streaming' if streaming else 'dense'}"
            print(f"{mode} ...", flush=True)
            env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": binding}
            child = [*sys.argv, "--child", f"{tp},{int(streaming)}"]
            out = subprocess.run([sys.executable, *child], env=env, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
            cells[mode] = json.loads(lines[-1].removeprefix("RESULT "))
            print(f"{mode}: {cells[mode]}", flush=True)
    rate = {mode: cell["decode_tokens_per_s"] for mode, cell in cells.items()}
    save_result(args.name, {
        "model": "gemma-3-270m (float32, eager)",
        "batch": args.batch, "sinks": SINKS, "window": WINDOW, "block_size": BLOCK,
        "streaming_prompt_tokens": args.prompt, "dense_prompt_tokens": SINKS + WINDOW - 1,
        "timed_steps": args.steps, "bindings": {f"TP={k}": v for k, v in BINDINGS.items()},
        "cells": cells,
        "streaming_over_dense": {
            f"TP={tp}": round(rate[f"TP={tp} streaming"] / rate[f"TP={tp} dense"], 3)
            for tp in BINDINGS
        },
        "tp2_over_tp1": {
            kind: round(rate[f"TP=2 {kind}"] / rate[f"TP=1 {kind}"], 3)
            for kind in ("streaming", "dense")
        },
    })  # fmt: skip


if __name__ == "__main__":
    main()
