"""Per-token latency: StreamingLLM against sliding window with re-computation.

The paper's baseline (its Figure 10) keeps quality by recomputing the KV of the
last L tokens for every new token; StreamingLLM decodes one token against a
cache of ``L = S + W`` tokens. Both run here through vLLM, same model, same
process:

* **streaming**: one stream past its first eviction, decoding (mean step time
  over a block of tokens, i.e. one eviction, the median of two such blocks;
  see ``decode.py``);
* **re-computation**: a dense engine (no prefix caching) predicting each token
  from a fresh prefill of the L tokens before it, timed per token.

Writes ``results/<name>.json``.

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/recompute.py
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import (
    MODEL,
    handbook_tokens,
    make_engine,
    save_result,
    shutdown,
    thread_setting,
    timed_decode_steps,
)

PAPER_SPEEDUP_AT_4096 = 22.2  # Llama-2-13B on an A6000, the paper's Figure 10


def recompute_seconds(llm, text: list[int], cache: int, tokens: int) -> list[float]:
    """Time to predict each of ``tokens`` tokens from a fresh prefill of ``cache`` tokens."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.8)
    times = []
    for t in range(cache, cache + tokens):
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": text[t - cache : t]}], params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--recomputed-tokens", type=int, default=8)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--name", default="recompute_smollm2")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    text = handbook_tokens()
    endless = SamplingParams(max_tokens=10**6, temperature=0.8, ignore_eos=True)
    streaming: dict[int, float] = {}
    for cache in args.caches:
        llm = make_engine(cache - args.sinks, args.sinks, 1, args.eager)
        block_size = llm.llm_engine.vllm_config.cache_config.block_size
        warmup = 4
        prompt = text[: cache + block_size - warmup]
        llm.llm_engine.add_request("stream", {"prompt_token_ids": prompt}, endless)
        runs = [
            timed_decode_steps(llm, 1, block_size, warmup if run == 0 else 0)[0] for run in (0, 1)
        ]
        streaming[cache] = statistics.median(statistics.mean(run) for run in runs)
        print(f"streaming, cache {cache}: {streaming[cache] * 1e3:.1f} ms/token", flush=True)
        llm.llm_engine.abort_request(["stream"])
        shutdown(llm)

    dense = LLM(
        str(MODEL), dtype="float32", enforce_eager=args.eager, max_num_seqs=1,
        max_num_batched_tokens=max(args.caches), enable_prefix_caching=False,
        disable_log_stats=True,
    )  # fmt: skip
    rows = []
    for cache in args.caches:
        recompute_seconds(dense, text, cache, 1)  # warm-up for this prefill size
        per_token = statistics.mean(recompute_seconds(dense, text, cache, args.recomputed_tokens))
        rows.append(
            {
                "cache_tokens": cache,
                "streaming_ms_per_token": streaming[cache] * 1e3,
                "recompute_ms_per_token": per_token * 1e3,
                "speedup": per_token / streaming[cache],
            }
        )
        print(rows[-1], flush=True)
    shutdown(dense)
    result = {
        "model": MODEL.name,
        "dtype": "float32",
        "compiled": not args.eager,
        "sinks": args.sinks,
        "threads": thread_setting(),
        "paper_speedup_at_4096": PAPER_SPEEDUP_AT_4096,
        "rows": rows,
    }
    save_result(args.name, result)


if __name__ == "__main__":
    main()
