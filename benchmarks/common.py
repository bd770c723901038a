"""What the in-process benchmarks share: paths, vLLM CPU settings, engine shutdown."""

from __future__ import annotations

import gc
import os
from pathlib import Path

# vLLM's CPU backend sizes its KV cache from NUMA node 0 unless told; engines run
# in this process so that benchmarks can read the scheduler and the KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
TEXT = REPO / "data" / "debian-handbook.txt"


def handbook_tokens() -> list[int]:
    """The whole Debian handbook text (set-up's ``data/``), in SmolLM2's tokens."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)(TEXT.read_text())["input_ids"]


def shutdown(llm) -> None:
    """Stop an in-process engine so that the next one can start in this process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    gc.collect()
    cleanup_dist_env_and_memory()
