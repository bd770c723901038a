"""``vllm bench throughput`` with and without the streaming flags, same workload.

Before a stream's first eviction, streaming should cost nothing: same
scheduler, same kernel, same cache, only the plugin's per-step bookkeeping.
This runs vLLM's own throughput benchmark on one workload that fits inside the
window (random prompts, ``--input-len + --output-len <= S + W``), alternating
plain and streaming runs ``--repeats`` times so that drifts of the machine hit
both alike, and reports the ratio of the medians. Each run is a fresh
``vllm bench throughput`` process; its command line is in the JSON.

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MODEL, save_result, thread_setting


def bench(extra: list[str], workload: list[str]) -> tuple[list[str], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            str(Path(sys.executable).parent / "vllm"), "bench", "throughput",
            "--model", str(MODEL), *workload, *extra, "--output-json", str(out),
        ]  # fmt: skip
        env = dict(os.environ)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # as users run it: engine in its own process
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        return command, json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--name", default="throughput_smollm2")
    args = parser.parse_args()
    if args.input_len + args.output_len > args.sinks + args.window:
        parser.error("the workload must fit in sinks + window (no eviction)")

    workload = [
        "--dataset-name", "random", "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--dtype", "float32", "--seed", "0",
    ] + (["--enforce-eager"] if args.eager else [])  # fmt: skip
    streaming = ["--streaming-sinks", str(args.sinks), "--streaming-window", str(args.window)]
    runs: dict[str, list[dict]] = {"plain": [], "streaming": []}
    commands = {}
    for repeat in range(args.repeats):
        for mode, extra in (("plain", []), ("streaming", streaming)):
            commands[mode], result = bench(extra, workload)
            runs[mode].append(result)
            print(f"{mode} #{repeat + 1}: {result['tokens_per_second']:.1f} tokens/s", flush=True)
    median = {
        mode: statistics.median(r["tokens_per_second"] for r in results)
        for mode, results in runs.items()
    }
    result = {
        "model": MODEL.name,
        "threads": thread_setting(),
        "commands": {mode: " ".join(c) for mode, c in commands.items()},
        "tokens_per_second": {m: [r["tokens_per_second"] for r in rs] for m, rs in runs.items()},
        "median_tokens_per_second": median,
        "ratio": median["streaming"] / median["plain"],
    }
    save_result(args.name, result)


if __name__ == "__main__":
    main()
