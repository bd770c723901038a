"""Ray Data batch inference over long documents: 1 vs 2 replicas, tokens per second.

Runs ``examples/ray_data_long_documents.py`` (SmolLM2, float32, eager, 4 sinks +
1020 window, each document's perplexity and a 32-token continuation) three times on
the same documents, each a fresh Ray cluster and fresh engines:

* one replica on one core (``--threads 1``);
* two replicas, one core each (the example's default);
* one replica on both cores (``--threads 2``), the alternative use of this machine.

Tokens per second count every prompt and generated token over the whole pipeline,
engine start-up included (eager start-up is about 20 s per engine). Writes
``results/<name>.json``.

    .venv/bin/python benchmarks/ray_data_throughput.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, save_result

EXAMPLE = REPO / "examples" / "ray_data_long_documents.py"
CELLS = {"1 replica x 1 core": (1, 1), "2 replicas x 1 core": (2, 1), "1 replica x 2 cores": (1, 2)}


def run_showing_progress(command: list[str], label: str) -> list[str]:
    """Run the example, echoing Ray Data's progress when it changes; its output lines."""
    lines, shown = [], ""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as child:
        for line in child.stdout:
            lines.append(line.rstrip("\n"))
            progress = line.strip().rpartition(" -- ")[2]
            if progress.startswith("Total Progress") and progress != shown:
                print(f"  {label}: {progress}", flush=True)
                shown = progress
    if child.returncode != 0:
        raise RuntimeError(f"{label} failed:\n" + "\n".join(lines[-40:]))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per document")
    parser.add_argument("--name", default="ray_data_smollm2")
    args = parser.parse_args()
    cells = {}
    for label, (replicas, threads) in CELLS.items():
        print(f"{label} ...", flush=True)
        with tempfile.TemporaryDirectory() as out:
            command = [
                sys.executable, str(EXAMPLE), "--documents", str(args.documents),
                "--tokens", str(args.tokens), "--replicas", str(replicas),
                "--threads", str(threads), "--output", out,
            ]  # fmt: skip
            lines = run_showing_progress(command, label)
            summary = json.loads(next(x for x in reversed(lines) if x.startswith('{"documents"')))
            ppl = sorted(
                json.loads(line)["perplexity"]
                for path in sorted(Path(out).glob("*.json"))
                for line in open(path)
            )
        cells[label] = {**summary, "perplexities": [round(p, 3) for p in ppl]}
        cells[label].pop("output")
        print(f"{label}: {summary['tokens_per_s']} tokens/s in {summary['seconds']} s", flush=True)
    rate = {label: cell["tokens_per_s"] for label, cell in cells.items()}
    save_result(args.name, {
        "model": "SmolLM2-135M-Instruct (float32, eager)", "sinks": 4, "window": 1020,
        "documents": args.documents, "tokens_per_document": args.tokens,
        "threads": "VLLM_CPU_OMP_THREADS_BIND=nobind, OMP_NUM_THREADS=cores per replica",
        "cells": cells,
        "two_replicas_over_one": round(rate["2 replicas x 1 core"] / rate["1 replica x 1 core"], 3),
        "two_replicas_over_one_on_both_cores": round(
            rate["2 replicas x 1 core"] / rate["1 replica x 2 cores"], 3
        ),
    })  # fmt: skip


if __name__ == "__main__":
    main()
