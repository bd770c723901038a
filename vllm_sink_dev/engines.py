"""Engines started in this process, and inputs for them.

Stopping an engine so the next can start (the tests' fixtures, the in-process
benchmarks), streaming settings, a streaming engine on the tiny Llama, random
prompts, and the tolerance float32 engines are held to.
"""

from __future__ import annotations

import gc
import random

FP32_TOLERANCE = 1e-3
"""Per-token logprob, a float32 engine against the float32 reference."""


def shutdown(llm) -> None:
    """Stop an in-process engine so the next one can start in this process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def streaming(sinks: int, window: int, **settings) -> dict:
    """``LLM`` arguments for streaming; ``settings``: more ``streaming_*`` keys."""
    config = {"streaming_sinks": sinks, "streaming_window": window, **settings}
    return {"additional_config": config}


def tiny_streaming_engine(
    engine_factory, model, sinks, window, block, chunk, dtype="float32", settings=None, **extra
):
    """A streaming engine (float32 unless told) on the tiny Llama (token ids in, no tokenizer).

    ``settings``: more ``streaming_*`` keys for ``additional_config``.
    """
    return engine_factory(
        model,
        dtype=dtype,
        block_size=block,
        max_num_batched_tokens=chunk,
        skip_tokenizer_init=True,
        **streaming(sinks, window, **(settings or {})),
        **extra,
    )


def random_prompt(length: int, seed: int, vocab: int = 500) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def kv_manager(llm):
    """The KV manager of the engine's sink + window layer group."""
    return llm.llm_engine.engine_core.engine_core.scheduler.streaming.sinks
