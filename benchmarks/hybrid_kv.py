"""Gemma 3's KV memory per stream: sliding-window layers in groups of their own vs one group.

Two engines on Gemma 3 270M, one after the other in one run, with the same
streaming settings and the same KV budget: one with vLLM's hybrid KV cache
manager (the default: its 15 sliding-window layers hold only their own
window of 512 tokens), one with it off (``disable_hybrid_kv_cache_manager``:
every layer holds the sinks + the streaming window). Each serves the same
batch of streams past the first eviction, greedily. Per mode: the per-stream
bound in bytes (what admission and the pool's capacity use), the KV bytes a
stream holds while decoding, how many full-size streams the pool holds,
decode throughput, and how far the two modes' logprobs are apart (the same
attention, so they should agree to rounding).

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/hybrid_kv.py
"""

from __future__ import annotations

import argparse
import time

from common import RESULTS, save_result, shutdown

from vllm_sink_dev.paths import GEMMA3, TEXT

MODES = {"hybrid groups": False, "one group": True}
"""Mode name -> ``disable_hybrid_kv_cache_manager``."""


def prompts(count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` handbook tokens, from different places, behind ``<bos>``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GEMMA3)
    ids = tokenizer(TEXT.read_text()[: 40 * length * count])["input_ids"]
    body = ids[1:]
    return [[ids[0], *body[i * length : (i + 1) * length - 1]] for i in range(count)]


def measure(disable_hybrid: bool, batch: list[list[int]], args) -> dict:
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    llm = LLM(
        str(GEMMA3), dtype="float32", enforce_eager=True, block_size=args.block,
        max_num_batched_tokens=args.chunk, max_num_seqs=len(batch), disable_log_stats=True,
        disable_hybrid_kv_cache_manager=disable_hybrid,
        additional_config={"streaming_sinks": args.sinks, "streaming_window": args.window},
    )  # fmt: skip
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    config = scheduler.kv_cache_config
    group = config.kv_cache_groups[0]  # every group has as many layers, pages of one size
    bytes_per_block = group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    params = SamplingParams(max_tokens=args.decode, temperature=0, logprobs=0, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    resident, outputs, decode_seconds, decoded = [], {}, 0.0, 0
    total = len(batch) * (len(batch[0]) + args.decode)
    with tqdm(total=total, unit="tok", desc="disable_hybrid=" + str(disable_hybrid)) as bar:
        while engine.has_unfinished_requests():
            running = list(scheduler.requests.values())
            decoding = len(running) == len(batch) and all(
                r.num_computed_tokens >= r.num_prompt_tokens for r in running
            )
            start = time.perf_counter()
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0]
            figures = scheduler.streaming_figures()
            bar.update(sum(r.num_computed_tokens for r in scheduler.requests.values()) - bar.n)
            if decoding:
                decode_seconds += time.perf_counter() - start
                decoded += len(batch)
                if figures["streams_evicting"] == len(batch):
                    resident.append(figures["resident_blocks"] / len(batch))
    figures = scheduler.streaming_figures()
    limit = figures["blocks_per_stream_limit"]
    logprobs = {
        r: [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)] for r, o in outputs.items()
    }
    shutdown(llm)
    return {
        "kv_cache_groups": len(config.kv_cache_groups),
        "pool_blocks": config.num_blocks,
        "kv_mib_per_block": round(bytes_per_block / 2**20, 4),
        "bound_blocks_per_stream": limit,
        "bound_kv_mib_per_stream": round(limit * bytes_per_block / 2**20, 2),
        "streams_the_pool_holds": (config.num_blocks - 1) // limit,
        "decoding_kv_mib_per_stream": round(
            sum(resident) / len(resident) * bytes_per_block / 2**20, 2
        ),
        "decode_tokens_per_s": round(decoded / decode_seconds, 1),
        "logprobs": logprobs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=1536)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=512, help="--max-num-batched-tokens")
    parser.add_argument("--name", default="hybrid_kv_gemma3")
    args = parser.parse_args()
    batch = prompts(args.streams, args.prompt)
    modes = {name: measure(disable, batch, args) for name, disable in MODES.items()}
    hybrid, single = modes["hybrid groups"], modes["one group"]
    difference = max(
        abs(a - b)
        for r in hybrid["logprobs"]
        for a, b in zip(hybrid["logprobs"][r], single["logprobs"][r])
    )
    for mode in modes.values():
        mode.pop("logprobs")
    result = {
        "model": "gemma-3-270m (float32, eager)",
        "streams": args.streams,
        "prompt_tokens": args.prompt,
        "decode_tokens": args.decode,
        "sinks": args.sinks,
        "window": args.window,
        "block_size": args.block,
        "chunk": args.chunk,
        "modes": modes,
        "hybrid_over_one_group": {
            "bound_kv_per_stream": round(
                hybrid["bound_kv_mib_per_stream"] / single["bound_kv_mib_per_stream"], 3
            ),
            "decoding_kv_per_stream": round(
                hybrid["decoding_kv_mib_per_stream"] / single["decoding_kv_mib_per_stream"], 3
            ),
            "streams_the_pool_holds": round(
                hybrid["streams_the_pool_holds"] / single["streams_the_pool_holds"], 3
            ),
            "decode_tokens_per_s": round(
                hybrid["decode_tokens_per_s"] / single["decode_tokens_per_s"], 3
            ),
        },
        "max_logprob_difference": difference,
    }
    save_result(args.name, result)
    plot(result, RESULTS / f"{args.name}.png")


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    names = list(modes)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, (key, label) in enumerate(
        [("bound_kv_mib_per_stream", "bound (admission)"),
         ("decoding_kv_mib_per_stream", "held while decoding")]
    ):  # fmt: skip
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        bars = ax.bar(xs, [modes[n][key] for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("KV MiB per stream")
    ax.set_title(
        f"Gemma 3 270M, {result['sinks']} sinks + {result['window']} window, "
        f"{result['chunk']}-token chunks"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
