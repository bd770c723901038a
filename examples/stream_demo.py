"""Stream a long real text through SmolLM2 far past its 8192-token context.

The text is fed as one prompt (streamed through chunked prefill, with window
blocks evicted between chunks), then the model continues it. Every few steps
the demo prints how many KV blocks the stream holds: it stays flat while the
stream grows.

    .venv/bin/python examples/stream_demo.py [--tokens 20000] [--generate 200]
    .venv/bin/python examples/stream_demo.py --model models/gemma-3-270m   # Gemma 3
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# The CPU backend must be told its KV cache size (GiB); the engine runs in this
# process so the demo can look at the scheduler's block accounting.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--text", default=str(REPO / "data" / "debian-handbook.txt"))
    parser.add_argument("--tokens", type=int, default=20_000, help="prompt length in tokens")
    parser.add_argument("--generate", type=int, default=200, help="tokens to generate")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = Path(args.text).read_text()
    prompt = tokenizer(text[: args.tokens * 8])["input_ids"][: args.tokens]
    llm = LLM(
        args.model,
        dtype="float32",  # faster than bf16 on CPUs without native bf16 matmuls
        enforce_eager=True,
        max_num_batched_tokens=1024,
        additional_config={"streaming_sinks": args.sinks, "streaming_window": args.window},
    )
    engine = llm.llm_engine
    manager = (
        engine.engine_core.engine_core.scheduler.kv_cache_manager.coordinator.single_type_managers[
            0
        ]
    )
    block = manager.block_size
    context = engine.model_config.hf_text_config.max_position_embeddings
    print(
        f"\nprompt: {len(prompt)} tokens of {Path(args.text).name} "
        f"(model context: {context}); cache: {args.sinks} sinks + {args.window} window, "
        f"{block}-token blocks; a dense cache would need {-(-len(prompt) // block)} blocks\n"
    )
    params = SamplingParams(
        max_tokens=args.generate, temperature=0.7, top_p=0.9, repetition_penalty=1.1
    )
    engine.add_request("demo", {"prompt_token_ids": prompt}, params)
    start, step, last, output = time.time(), 0, 0.0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            output = out
        step += 1
        # vLLM gives the request an internal id: "demo-<suffix>".
        running = list(engine.engine_core.engine_core.scheduler.requests.values())
        if running and (time.time() - last > 5 or step == 1):
            last = time.time()
            print(
                f"[{last - start:6.1f}s] stream at {running[0].num_computed_tokens:6d} "
                f"tokens: holding {manager.resident_blocks(running[0].request_id):3d} KV blocks, "
                f"{manager.num_evicted_blocks:4d} evicted so far",
                flush=True,
            )
    elapsed = time.time() - start
    total = len(prompt) + len(output.outputs[0].token_ids)
    print(
        f"\nstreamed {total} tokens in {elapsed:.0f}s; most blocks held at once: "
        f"{manager.peak_resident_blocks}\n"
    )
    print("…" + tokenizer.decode(prompt[-60:]))
    print(">>> continuation:")
    print(output.outputs[0].text)


if __name__ == "__main__":
    main()
