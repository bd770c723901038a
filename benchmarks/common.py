"""What the in-process benchmarks share: paths, vLLM CPU settings, engine shutdown."""

from __future__ import annotations

import gc
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

# vLLM's CPU backend sizes its KV cache from NUMA node 0 unless told; engines run
# in this process so that benchmarks can read the scheduler and the KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
TEXT = REPO / "data" / "debian-handbook.txt"

# SmolLM2-135M's attention (its config.json) and vLLM CPU's default block size, for
# benchmarks that size or shape a KV cache like the engine's.
LAYERS, HEADS, KV_HEADS, HEAD_SIZE = 30, 9, 3, 64
BLOCK_SIZE = 128


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


def thread_setting() -> str:
    """The vLLM CPU thread binding a figure was measured under."""
    return "VLLM_CPU_OMP_THREADS_BIND=" + os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")


def provenance() -> dict[str, str]:
    """What a figure was measured with: commit, command, machine and vLLM CPU threads."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "commit": commit + ("-dirty" if dirty else ""),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB",
        "threads": thread_setting(),
    }


def save_result(name: str, result: dict, print_without: tuple[str, ...] = ()) -> None:
    """Write ``result`` and its :func:`provenance` to ``results/<name>.json`` and print it.

    Long entries named in ``print_without`` are written but not printed.
    """
    result = {**provenance(), **result}
    print(json.dumps({k: v for k, v in result.items() if k not in print_without}, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
