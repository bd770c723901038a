"""Batch inference over documents far longer than the model's context, with Ray Data.

Each document is one prompt, streamed through vllm-sink (attention sinks + a rolling
window) by ``ray.data.llm``'s vLLM stage on CPU bundles, one engine per replica. Per
document it writes the stream's perplexity (every token after the first, scored while
the cache holds only sinks + window) and a greedy continuation, as JSON lines.

    pip install 'vllm-sink[ray]'
    .venv/bin/python examples/ray_data_long_documents.py [--documents 8] [--tokens 16384] \\
        [--replicas 2] [--output ray_data_results]

The replicas share this machine's cores: each engine runs its OpenMP threads unbound
(``VLLM_CPU_OMP_THREADS_BIND=nobind``, ``--threads`` each), because vLLM's automatic
binding would put every replica on the same core, and computes in its engine core
process (no separate worker process). The last line printed is a JSON summary
(documents, tokens, seconds, tokens/s).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def documents(tokenizer, text: str, count: int, tokens: int) -> list[list[int]]:
    """``count`` consecutive pieces of ``text``, ``tokens`` token ids each, each starting
    with the tokenizer's BOS where it adds one."""
    bos = tokenizer("")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    size = tokens - len(bos)
    if len(ids) < count * size:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {count} x {size}")
    return [bos + ids[i * size : (i + 1) * size] for i in range(count)]


def stream_perplexity(row: dict) -> dict:
    """Ray Data postprocess: the perplexity of the document under the streaming cache."""
    # With prompt_logprobs=0 each position's dict holds the prompt token's own logprob.
    nll = [-next(iter(d.values()))["logprob"] for d in row["prompt_logprobs"][1:]]
    return {
        "document": row["document"],
        "tokens": row["num_input_tokens"],
        "perplexity": math.exp(sum(nll) / len(nll)),
        "continuation": row["generated_text"],
        "continuation_token_ids": [int(t) for t in row["generated_tokens"]],
    }


def build_processor(args: argparse.Namespace):
    """A ``ray.data.llm`` processor whose vLLM engines stream with sinks + window."""
    from ray.data.llm import build_processor as build_llm_processor
    from ray.data.llm import vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=args.model,
        engine_kwargs=dict(
            dtype="float32",  # faster than bf16 on CPUs without native bf16 matmuls
            enforce_eager=not args.compile,
            block_size=args.block_size,
            max_num_batched_tokens=args.chunk,
            max_num_seqs=args.max_num_seqs,
            additional_config={"streaming_sinks": args.sinks, "streaming_window": args.window},
        ),
        # CPU bundles: without them Ray asks for a GPU per engine.
        placement_group_config={"bundles": [{"CPU": args.threads}]},
        runtime_env={
            "env_vars": {
                "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib),
                "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "OMP_NUM_THREADS": str(args.threads),
                # The worker inside the engine core process: with vLLM's mp executor each
                # engine keeps a second process polling its worker, which takes CPU time
                # from the other replicas on a small machine.
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            }
        },
        concurrency=(args.replicas, args.replicas),
        # One document per batch, and no more documents sent to an engine than it streams
        # at once: queued at one replica, a long document would wait while another idles.
        batch_size=1,
        max_concurrent_batches=args.max_num_seqs,
        max_tasks_in_flight_per_actor=args.max_num_seqs,
        accelerator_type=None,
        chat_template_stage=False,
        tokenize_stage=False,  # token ids come from the driver
        detokenize_stage=False,  # the engine detokenizes the continuation itself
    )
    sampling = dict(max_tokens=args.generate, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    return build_llm_processor(
        config,
        preprocess=lambda row: dict(
            document=row["document"], tokenized_prompt=row["ids"], sampling_params=sampling
        ),
        postprocess=stream_perplexity,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--text", default=str(REPO / "data" / "debian-handbook.txt"))
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per document")
    parser.add_argument("--generate", type=int, default=32, help="continuation tokens")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    parser.add_argument("--max-num-seqs", type=int, default=4, help="streams per engine")
    parser.add_argument("--replicas", type=int, default=2, help="vLLM engines")
    parser.add_argument("--threads", type=int, default=1, help="CPU cores per engine")
    parser.add_argument("--kv-gib", type=int, default=2, help="KV cache per engine (GiB)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (slow start)")
    parser.add_argument("--output", default="ray_data_results", help="JSON lines directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import ray
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    docs = documents(tokenizer, Path(args.text).read_text(), args.documents, args.tokens)
    context = json.loads((Path(args.model) / "config.json").read_text()).get(
        "max_position_embeddings"
    )
    print(
        f"{len(docs)} documents of {args.tokens} tokens (model context: {context}); "
        f"{args.replicas} replica(s), {args.sinks} sinks + {args.window} window",
        flush=True,
    )
    # Logical CPUs: one per engine thread, and one for the light pre- and post-processing
    # tasks (without it they wait for an engine to finish).
    ray.init(num_cpus=args.replicas * args.threads + 1, include_dashboard=False)
    dataset = ray.data.from_items([{"document": i, "ids": ids} for i, ids in enumerate(docs)])
    start = time.perf_counter()
    build_processor(args)(dataset).write_json(args.output)
    seconds = time.perf_counter() - start
    ray.shutdown()
    generated = len(docs) * args.generate
    summary = {
        "documents": len(docs),
        "prompt_tokens": len(docs) * args.tokens,
        "generated_tokens": generated,
        "replicas": args.replicas,
        "seconds": round(seconds, 2),
        "tokens_per_s": round((len(docs) * args.tokens + generated) / seconds, 1),
        "output": args.output,
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
