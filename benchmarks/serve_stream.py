"""One endless SSE stream from `vllm serve`: tokens received, KV blocks and server memory.

A client for a running streaming server: asks one completion for ``--tokens``
tokens (``ignore_eos``, streamed), counts what arrives, and every ``--every``
tokens samples the server's ``/metrics`` (vllm-sink's resident KV blocks) and,
given ``--server-pid``, the RSS of the server's whole process tree. Writes
``results/<name>.json`` and a plot ``results/<name>.png``.

    VLLM_CPU_KVCACHE_SPACE=2 vllm serve models/SmolLM2-135M-Instruct \\
        --streaming-sinks 4 --streaming-window 1020 --port 8000 &
    .venv/bin/python benchmarks/serve_stream.py --tokens 100000 --server-pid $!
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS, save_result

from vllm_sink_dev.serve import metric_samples, tree_rss_mib


def server_rss_mib(pid: int | None) -> float | None:
    import psutil

    return None if pid is None else tree_rss_mib(psutil.Process(pid))[0]


def resident_blocks(url: str) -> float:
    for key, value in metric_samples(url).items():
        if key.startswith("vllm_sink:resident_kv_blocks{"):
            return value
    raise RuntimeError(f"{url}/metrics has no vllm_sink figures: is streaming on?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=2000)
    parser.add_argument("--server-pid", type=int, default=None)
    parser.add_argument("--prompt", default="Tell me a very long story.")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    import openai
    from tqdm import tqdm

    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    samples = []
    start = time.time()
    stream = client.completions.create(
        model=model,
        prompt=args.prompt,
        max_tokens=args.tokens,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True},
    )
    received, events, usage, text_chars = 0, 0, None, 0
    with tqdm(total=args.tokens, unit="tok", desc="SSE tokens") as progress:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if not chunk.choices:
                continue
            events += 1
            text_chars += len(chunk.choices[0].text)
            now = usage.completion_tokens if usage else events
            progress.update(now - received)
            if now // args.every > received // args.every:
                samples.append(
                    {
                        "tokens": now,
                        "seconds": round(time.time() - start, 1),
                        "resident_blocks": resident_blocks(args.url),
                        "server_rss_mib": server_rss_mib(args.server_pid),
                    }
                )
            received = now
    wall = time.time() - start
    result = {
        "model": model,
        "url": args.url,
        "requested_tokens": args.tokens,
        "completion_tokens": usage.completion_tokens if usage else None,
        "sse_events": events,
        "text_chars": text_chars,
        "wall_s": round(wall, 1),
        "samples": samples,
    }
    name = args.name or f"serve_stream_{args.tokens}"
    save_result(name, result, print_without=("samples",))  # threads: the client's, not the server's
    plot(result, RESULTS / f"{name}.png")
    blocks = [s["resident_blocks"] for s in samples]
    print(
        f"{result['completion_tokens']} tokens in {events} SSE events, {wall:.0f} s; "
        f"resident KV blocks {min(blocks, default=0):.0f}-{max(blocks, default=0):.0f}"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    tokens = [s["tokens"] for s in samples]
    figure, blocks_axis = plt.subplots(figsize=(8, 4))
    blocks_axis.plot(tokens, [s["resident_blocks"] for s in samples], color="tab:blue")
    blocks_axis.set_xlabel("tokens streamed to the client")
    blocks_axis.set_ylabel("KV blocks held (vllm_sink:resident_kv_blocks)", color="tab:blue")
    blocks_axis.set_ylim(bottom=0)
    if samples and samples[0]["server_rss_mib"] is not None:
        rss_axis = blocks_axis.twinx()
        rss_axis.plot(tokens, [s["server_rss_mib"] for s in samples], color="tab:red")
        rss_axis.set_ylabel("server RSS, all processes (MiB)", color="tab:red")
        rss_axis.set_ylim(0, 1.25 * max(s["server_rss_mib"] for s in samples))
    blocks_axis.set_title(f"One SSE stream from vllm serve: {result['model']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
