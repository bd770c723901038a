"""guidellm's synthetic multi-turn chat against `vllm serve`: how many follow-ups resume.

guidellm (its own virtual environment: ``python -m venv .venv-guidellm &&
.venv-guidellm/bin/pip install guidellm==0.8.1``, since it pins versions of its
own) drives the server with ``--profile kind=concurrent`` conversations of
``--turns`` turns, each turn ``--prompt-tokens`` of synthetic text and
``--output-tokens`` of reply, the history re-sent as a client does. vllm-sink's
``/metrics`` before and after count the requests that resumed a snapshot;
every conversation's first turn has nothing to resume.
Writes ``results/<name>.json``.

    .venv/bin/python benchmarks/guidellm_chat.py --guidellm .venv-guidellm/bin/guidellm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from common import MODEL, save_result

from vllm_sink_dev.serve import vllm_serve

FLAGS = ["--streaming-sinks", "4", "--streaming-window", "1020"]


def counters(server) -> dict[str, float]:
    metrics = server.metrics()
    return {name: metrics[f"vllm_sink:snapshot_{name}_total"] for name in ("hits", "misses")}


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

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        with vllm_serve(MODEL, [*FLAGS, *args.flags], scratch / "server.log") as server:
            before = counters(server)
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
            time.sleep(2)
            after = counters(server)
            report = json.loads(out.read_text())
    hits, misses = (after[k] - before[k] for k in ("hits", "misses"))
    benchmark = report["benchmarks"][0]
    requests = benchmark["requests"]["successful"]
    conversations = len({r.get("conversation_id") or r.get("request_id") for r in requests
                         if r.get("turn_index", 0) == 0})  # fmt: skip
    ttft = benchmark["metrics"]["time_to_first_token_ms"]["successful"]
    save_result(
        args.name,
        {
            "settings": vars(args),
            "wall_s": wall,
            "requests_completed": len(requests),
            "snapshot_hits": hits,
            "snapshot_misses": misses,
            "first_turns": conversations,
            "follow_ups_resumed": hits / max(1, hits + misses - conversations),
            "ttft_ms": {k: ttft.get(k) for k in ("median", "p95", "p99")},
            "requests": [
                {
                    k: r.get(k)
                    for k in (
                        "prompt_tokens",
                        "output_tokens",
                        "time_to_first_token_ms",
                        "turn_index",
                    )
                }
                for r in requests
            ],  # fmt: skip
        },
        print_without=("requests",),
    )


if __name__ == "__main__":
    main()
