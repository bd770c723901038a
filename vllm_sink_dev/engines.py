"""Engines started in this process."""

from __future__ import annotations

import gc


def shutdown(llm) -> None:
    """Stop an in-process engine so the next one can start in this process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
