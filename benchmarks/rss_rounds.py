"""Does a streaming engine keep memory per request? The same requests, round after round.

One in-process streaming engine on the tiny random Llama (4 + 252, blocks of 32, prefill
chunks of 256, eager) serves the same 48 requests (prompts of 10-1,500 tokens, 1-400 outputs,
half seeded, a third with n = 2), plus six it aborts mid-flight, ``--rounds`` times. After each
round: the process RSS and Python's traced allocations (tracemalloc). Memory kept per request
grows every round; an allocator meeting new tensor sizes grows in the first rounds only.
``--dense`` runs the same without streaming (prompts and outputs fit the context) and
without seeds (plain vLLM 0.32 on CPU dies on a seeded prompt longer than a prefill chunk).

    VLLM_CPU_OMP_THREADS_BIND=0-1 .venv/bin/python benchmarks/rss_rounds.py --rounds 6
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc

from common import RESULTS, save_result, shutdown


def requests(seeded: bool, seed: int = 0) -> list[tuple[dict, object]]:
    from vllm import SamplingParams

    rng = random.Random(seed)
    made = []
    for i in range(48):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(10, 1500))]
        params = SamplingParams(
            max_tokens=rng.randrange(1, 400), temperature=1.0, n=rng.choice([1, 1, 2]),
            seed=rng.choice([None, i]) if seeded else None, ignore_eos=True, detokenize=False,
        )  # fmt: skip
        made.append(({"prompt_token_ids": prompt}, params))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dense", action="store_true")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    import psutil
    from vllm import LLM

    from vllm_sink_dev.tiny_llama import build_tiny_llama

    model = build_tiny_llama(RESULTS / "tmp" / "tiny_llama")
    streaming = {} if args.dense else {
        "additional_config": {"streaming_sinks": 4, "streaming_window": 252}
    }  # fmt: skip
    llm = LLM(str(model), dtype="float32", enforce_eager=True, block_size=32,
              max_num_batched_tokens=256, skip_tokenizer_init=True, **streaming)  # fmt: skip
    # Plain vLLM 0.32 on CPU dies on a seeded request longer than a prefill chunk.
    work, engine, process = requests(seeded=not args.dense), llm.llm_engine, psutil.Process()
    tracemalloc.start()
    rounds = []
    for r in range(args.rounds):
        start = time.time()
        llm.generate([p for p, _ in work], [s for _, s in work], use_tqdm=False)
        aborted = [f"abort-{r}-{k}" for k in range(6)]
        for request_id, (prompt, params) in zip(aborted, work):
            engine.add_request(request_id, prompt, params)
        for _ in range(15):
            engine.step()
        engine.abort_request(aborted)
        while engine.has_unfinished_requests():
            engine.step()
        gc.collect()
        rounds.append({
            "rss_mib": round(process.memory_info().rss / 2**20, 1),
            "traced_mib": round(tracemalloc.get_traced_memory()[0] / 2**20, 2),
            "seconds": round(time.time() - start, 1),
        })  # fmt: skip
        print(f"round {r}: {rounds[-1]}", flush=True)
    shutdown(llm)
    growth = rounds[-1]["rss_mib"] - rounds[1]["rss_mib"]
    save_result(
        args.name or ("rss_rounds_dense" if args.dense else "rss_rounds_streaming"),
        {"mode": "dense" if args.dense else "streaming 4 + 252", "rounds": rounds,
         "rss_growth_after_round_1_mib_per_round": round(growth / (len(rounds) - 2), 2)},
    )  # fmt: skip


if __name__ == "__main__":
    main()
