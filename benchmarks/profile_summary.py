"""Where decode steps spend their time: a py-spy profile of ``decode.py``, summarized.

Reads py-spy's raw (collapsed) stacks, keeps the samples taken inside timed
decode steps, and reports the share spent in vllm-sink's own code (any frame
from ``vllm_sink/``), broken down by the plugin function on the stack, the
share in vLLM's attention kernel, and the functions where the step's samples
land (leaf frames). Writes ``results/<name>.json``.

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/py-spy record --subprocesses --rate 50 \\
        --format raw -o /tmp/decode.txt -- .venv/bin/python benchmarks/decode.py \\
        --modes streaming --windows 1020 --batches 8 --name decode_profiled
    .venv/bin/python benchmarks/profile_summary.py /tmp/decode.txt
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from common import save_result

STEP_FRAME = "timed_decode_steps"
ATTENTION_FRAME = "cpu_attention_with_kv_cache"  # vLLM's CPU attention kernel
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^:]*):\d+\)$")


def frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) of each frame, outermost first."""
    out = []
    for frame in stack.split(";"):
        match = FRAME.match(frame)
        out.append((match["function"], match["file"]) if match else (frame, ""))
    return out


def summarize(lines: list[str], top: int) -> dict:
    total = attention = 0
    plugin: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if STEP_FRAME not in stack:
            continue
        samples = int(count)
        total += samples
        attention += samples if ATTENTION_FRAME in stack else 0
        stack_frames = frames(stack)
        ours = [f for f, file in stack_frames if "vllm_sink/" in file]
        if ours:
            plugin[ours[0]] += samples
        function, file = stack_frames[-1]
        leaves[f"{function} ({Path(file).name})"] += samples
    share = {name: round(n / total, 4) for name, n in plugin.most_common()}
    return {
        "decode_step_samples": total,
        "vllm_sink_share": round(sum(plugin.values()) / total, 4),
        "vllm_sink_share_by_function": share,
        "attention_kernel_share": round(attention / total, 4),
        "top_leaf_functions": {name: round(n / total, 4) for name, n in leaves.most_common(top)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--name", default="decode_profile")
    args = parser.parse_args()
    result = summarize(args.profile.read_text().splitlines(), args.top)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
