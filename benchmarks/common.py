"""What the in-process benchmarks share: paths, vLLM CPU settings, engine shutdown."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

# vLLM's CPU backend sizes its KV cache from NUMA node 0 unless told; engines run
# in this process so that benchmarks can read the scheduler and the KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# Benchmarks run as scripts (``python benchmarks/x.py``): the checkout's root
# makes the shared dev helpers importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vllm_sink_dev.engines import shutdown  # noqa: E402
from vllm_sink_dev.paths import REPO, RESULTS, TEXT  # noqa: E402
from vllm_sink_dev.paths import SMOLLM2 as MODEL  # noqa: E402

__all__ = ["REPO", "RESULTS", "TEXT", "MODEL", "shutdown"]

# SmolLM2-135M's attention (its config.json) and vLLM CPU's default block size, for
# benchmarks that size or shape a KV cache like the engine's.
LAYERS, HEADS, KV_HEADS, HEAD_SIZE = 30, 9, 3, 64
BLOCK_SIZE = 128
DECODE_CHUNK = 1024
"""``--max-num-batched-tokens`` of the decode-timing engines."""


def handbook_tokens(model: Path = MODEL) -> list[int]:
    """The whole Debian handbook text (set-up's ``data/``), in ``model``'s tokens (SmolLM2's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)(TEXT.read_text())["input_ids"]


def thread_setting() -> str:
    """The vLLM CPU thread binding a figure was measured under."""
    return "VLLM_CPU_OMP_THREADS_BIND=" + os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")


def provenance() -> dict[str, str]:
    """What a figure was measured with: commit, command, machine, vLLM CPU threads, versions."""
    import torch
    import vllm

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(  # results written meanwhile are not code: they do not count
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
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
        "vllm": vllm.__version__,
        "torch": torch.__version__,
    }


def save_result(name: str, result: dict, print_without: tuple[str, ...] = ()) -> None:
    """Write ``result`` and its :func:`provenance` to ``results/<name>.json`` and print it.

    Long entries named in ``print_without`` are written but not printed.
    """
    result = {**provenance(), **result}
    print(json.dumps({k: v for k, v in result.items() if k not in print_without}, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))


def make_engine(
    window: int | None,
    sinks: int,
    max_batch: int,
    eager: bool,
    chunk: int = DECODE_CHUNK,
    kv_cache_gib: int | None = None,
):
    """SmolLM2 in this process: streaming over ``sinks + window``, or dense without a window.

    ``kv_cache_gib`` sizes the KV cache on a GPU as ``VLLM_CPU_KVCACHE_SPACE`` does on
    CPU, and leaves room on the device for the other engine of a side-by-side run.
    """
    import torch
    from vllm import LLM

    streaming = (
        {"additional_config": {"streaming_sinks": sinks, "streaming_window": window}}
        if window is not None
        else {}
    )
    device_memory = (
        {"kv_cache_memory_bytes": kv_cache_gib * 2**30, "gpu_memory_utilization": 0.4}
        if kv_cache_gib is not None and torch.cuda.is_available()
        else {}
    )
    return LLM(
        str(MODEL), dtype="float32", enforce_eager=eager, max_num_seqs=max_batch,
        max_num_batched_tokens=chunk, disable_log_stats=True, **streaming, **device_memory,
    )  # fmt: skip


def all_decoding(llm, batch: int) -> bool:
    """Whether the engine holds ``batch`` requests, every one past its prompt."""
    running = list(llm.llm_engine.engine_core.engine_core.scheduler.requests.values())
    return len(running) == batch and all(
        r.num_computed_tokens >= r.num_prompt_tokens for r in running
    )


def timed_decode_steps(
    llm, batch: int, steps: int, warmup: int, breakdown=None
) -> tuple[list[float], dict[str, float]]:
    """Times of ``steps`` engine steps in which all ``batch`` requests decode, and their phases.

    Timing starts ``warmup`` decode steps after every request is decoding
    (requests whose prefill ends early decode while the others prefill). The
    phases come from ``breakdown`` (``step_breakdown.StepBreakdown``), if given.
    """
    engine = llm.llm_engine
    timed: list[float] = []
    decoded = 0
    while len(timed) < steps:
        decoding = all_decoding(llm, batch)
        if decoding and decoded == warmup and breakdown is not None:
            breakdown.start()
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        if decoding:
            decoded += 1
            if decoded > warmup:
                timed.append(seconds)
    return timed, breakdown.stop(len(timed)) if breakdown is not None else {}
