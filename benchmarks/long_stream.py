"""One very long stream: KV blocks held and process memory as it grows.

Feeds a prompt and/or generates tokens in a single stream on an in-process
engine, sampling the stream's resident KV blocks and the process RSS every
``--every`` tokens. Writes JSON (and a PNG plot) under benchmarks/results/.

    .venv/bin/python benchmarks/long_stream.py --model tiny --generate 100000
    .venv/bin/python benchmarks/long_stream.py --prompt 50000 --generate 100

No ``max_model_len`` is set: with streaming on, streams have no length limit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import MODEL, RESULTS, TEXT, save_result, thread_setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a path")
    parser.add_argument(
        "--prompt", type=int, default=0, help="prompt tokens (real text for smollm2)"
    )
    parser.add_argument("--generate", type=int, default=100_000)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--chunk", type=int, default=256, help="--max-num-batched-tokens")
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    import psutil
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    if args.model == "tiny":
        from vllm_sink_dev.tiny_llama import build_tiny_llama

        model = str(build_tiny_llama(RESULTS / "tmp" / "tiny_llama"))
        prompt = [3 + (i * 7919) % 500 for i in range(max(args.prompt, 1))]
    else:
        from transformers import AutoTokenizer

        model = str(MODEL) if args.model == "smollm2" else args.model
        tokenizer = AutoTokenizer.from_pretrained(model)
        text = TEXT.read_text()
        ids: list[int] = []
        while len(ids) < max(args.prompt, 1):  # repeat the text if the prompt is longer
            ids += tokenizer(text)["input_ids"]
        prompt = ids[: max(args.prompt, 1)]
    total = len(prompt) + args.generate
    llm = LLM(
        model,
        dtype="float32",
        enforce_eager=True,
        max_num_batched_tokens=args.chunk,
        skip_tokenizer_init=args.model == "tiny",
        additional_config={"streaming_sinks": args.sinks, "streaming_window": args.window},
    )
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    manager = core.scheduler.streaming.sinks
    params = SamplingParams(
        max_tokens=args.generate, temperature=0.8, ignore_eos=True, detokenize=args.model != "tiny"
    )
    process = psutil.Process()
    rss_before_mb = process.memory_info().rss / 2**20
    engine.add_request("stream", {"prompt_token_ids": prompt}, params)
    samples, next_sample = [], 0
    start = time.time()
    with tqdm(total=total, unit="tok", desc="stream") as bar:
        while engine.has_unfinished_requests():
            engine.step()
            running = list(core.scheduler.requests.values())  # the one stream
            if not running:
                break
            request = running[0]
            bar.update(request.num_computed_tokens - bar.n)
            if request.num_computed_tokens >= next_sample:
                samples.append(
                    {
                        "tokens": request.num_computed_tokens,
                        "kv_blocks": manager.resident_blocks(request.request_id),
                        "rss_mb": round(process.memory_info().rss / 2**20, 1),
                        "seconds": round(time.time() - start, 2),
                    }
                )
                next_sample += args.every
    result = {
        "command": " ".join(sys.argv),
        "model": args.model,
        "prompt_tokens": len(prompt),
        "generated_tokens": args.generate,
        "sinks": args.sinks,
        "window": args.window,
        "block_size": manager.block_size,
        "chunk": args.chunk,
        "peak_kv_blocks": manager.peak_resident_blocks,
        "kv_block_bound": manager.policy.max_resident_blocks,
        "evicted_blocks": manager.num_evicted_blocks,
        "wall_seconds": round(time.time() - start, 1),
        "rss_before_request_mb": round(rss_before_mb, 1),
        "rss_growth_bytes_per_token": round(
            (samples[-1]["rss_mb"] - rss_before_mb) * 2**20 / samples[-1]["tokens"], 1
        ),
        "threads": thread_setting(),
        "samples": samples,
    }
    name = args.name or f"long_stream_{args.model}_p{len(prompt)}_g{args.generate}"
    save_result(name, result, print_without=("samples",))
    plot(result, RESULTS / f"{name}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [s["tokens"] for s in result["samples"]]
    fig, left = plt.subplots(figsize=(8, 4))
    left.plot(tokens, [s["kv_blocks"] for s in result["samples"]], color="tab:blue")
    left.axhline(result["kv_block_bound"], color="tab:blue", linestyle=":", label="bound")
    left.set_xlabel("tokens in the stream")
    left.set_ylabel("KV blocks held", color="tab:blue")
    left.set_ylim(0, 1.25 * result["kv_block_bound"])
    left.legend(loc="lower right")
    right = left.twinx()
    rss = [s["rss_mb"] for s in result["samples"]]
    right.plot(tokens, rss, color="tab:red")
    right.set_ylabel("process RSS (MiB)", color="tab:red")
    right.set_ylim(0, 1.25 * max(rss))
    left.set_title(
        f"{result['model']}: {result['sinks']} sinks + {result['window']} window, "
        f"{result['block_size']}-token blocks"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
