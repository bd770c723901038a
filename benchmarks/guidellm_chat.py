"""guidellm's synthetic multi-turn chat against `vllm serve`: how many follow-ups resume.

guidellm (its own virtual environment: ``python -m venv .venv-guidellm &&
.venv-guidellm/bin/pip install guidellm==0.8.1``, since it pins versions of its
own) drives the server with ``--profile kind=concurrent`` conversations of
``--turns`` turns, each turn ``--prompt-tokens`` of synthetic text and
``--output-tokens`` of reply, the history re-sent as a client does. The server
logs, at debug level, how many prompt tokens each request resumed from a
snapshot: a follow-up turn resumed if a snapshot held most of its history.
Writes ``results/<name>.json``.

    .venv/bin/python benchmarks/guidellm_chat.py --guidellm .venv-guidellm/bin/guidellm
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from common import MODEL, save_result

from vllm_sink_dev.serve import vllm_serve

FLAGS = ["--streaming-sinks", "4", "--streaming-window", "1020"]


def admitted(log: Path) -> list[tuple[int, int]]:
    """``(prompt tokens, tokens resumed)`` of each request the server admitted, in order
    (the scheduler's debug line)."""
    pattern = re.compile(r"vllm-sink: request \S+: (\d+) prompt tokens, (\d+) resumed")
    return [(int(a), int(b)) for a, b in pattern.findall(log.read_text())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--guidellm", required=True, help="the guidellm command")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--output-tokens", type=int, default=24)
    parser.add_argument("--seconds", type=int, default=150)
    parser.add_argument("--flags", nargs="*", default=[], help="more server flags")
    parser.add_argument("--name", default="guidellm_chat")
    args = parser.parse_args()
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"  # what vllm_serve's servers compute on

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        log = scratch / "server.log"
        with vllm_serve(
            MODEL, [*FLAGS, *args.flags], log, env={"VLLM_LOGGING_LEVEL": "DEBUG"}
        ) as server:
            out = scratch / "guidellm.json"
            command = [
                args.guidellm, "run",
                "--backend", f"kind=openai_http,target={server.url},"
                             "request_format=/v1/chat/completions",
                "--profile", f"kind=concurrent,streams={args.streams}",
                "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                          f"output_tokens={args.output_tokens},turns={args.turns}",
                "--constraint", f"kind=max_duration,seconds={args.seconds}",
                "--output", f"kind=json,path={out}",
                "--disable-console-interactive",
            ]  # fmt: skip
            started = time.perf_counter()
            subprocess.run(command, check=True, cwd=scratch)
            wall = time.perf_counter() - started
            report = json.loads(out.read_text())
            requests = admitted(log)
    # A first turn is a prompt no longer than one turn's; a follow-up resumed if the
    # snapshot held more than half its prompt (the history before its last message).
    follow_ups = [(p, r) for p, r in requests if p > args.prompt_tokens * 1.3]
    resumed = [(p, r) for p, r in follow_ups if r > p / 2]
    completed = report["benchmarks"][0]["requests"]["successful"]
    ttft = sorted(r["time_to_first_token_ms"] for r in completed if r["time_to_first_token_ms"])
    save_result(
        args.name,
        {
            "settings": vars(args),
            "wall_s": wall,
            "requests_admitted": len(requests),
            "requests_completed": len(completed),
            "follow_ups": len(follow_ups),
            "follow_ups_resumed": len(resumed) / max(1, len(follow_ups)),
            "missed_follow_ups": [(p, r) for p, r in follow_ups if r <= p / 2],
            "ttft_ms": {q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] for q in (0.5, 0.95)},
            "admitted": requests,
        },
        print_without=("admitted",),
    )


if __name__ == "__main__":
    main()
