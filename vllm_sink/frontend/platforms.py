"""Which streaming worker a platform gets, and what CUDA needs set before its engine starts.

CPU is supported. CUDA is built (V1 runner, the GPU backends' KV layouts, the
start-up check of the cache) but has not run on a GPU, so it stays behind an
explicit opt-in whose start-up warning says so. The V1 runner is selected and
async scheduling turned off, each with a log line; asking for either otherwise is
refused.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from vllm_sink.config import StreamingConfigError

if TYPE_CHECKING:
    from vllm.engine.arg_utils import EngineArgs

logger = init_logger("vllm.vllm_sink")

CPU_WORKER = "vllm_sink.worker.cpu_worker.StreamingCPUWorker"
GPU_WORKER = "vllm_sink.worker.gpu_worker.StreamingGPUWorker"
EXPERIMENTAL_CUDA = "VLLM_SINK_EXPERIMENTAL_CUDA"
V2_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"


STREAMING_BACKENDS = {
    "cpu": ("CPU_ATTN",),
    "cuda": ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION"),
}
"""The attention backends whose KV caches the worker can evict in, per platform
(:mod:`vllm_sink.worker.cpu_attn_layout`, :mod:`vllm_sink.worker.gpu_kv_layout`)."""


def check_attention_backend(device: str, backend: str, layer: str | None = None) -> None:
    """Refuse an attention backend the streaming worker on ``device`` cannot evict in."""
    supported = STREAMING_BACKENDS.get(device, ())
    if backend not in supported:
        raise StreamingConfigError(
            f"vllm-sink streams on {device} through the {', '.join(supported)} attention "
            f"backend{'s' if len(supported) > 1 else ''}; "
            + (f"layer {layer} uses {backend}" if layer else f"remove the choice of {backend}")
        )


def streaming_worker(device: str, environ: MutableMapping[str, str]) -> str:
    """The worker class for ``device`` (vLLM's ``current_platform.device_type``)."""
    if device == "cpu":
        return CPU_WORKER
    if device != "cuda":
        raise StreamingConfigError(
            f"vllm-sink streams on vLLM's CPU backend (and, experimentally, on CUDA); not on "
            f"{device}. Remove --streaming-sinks/--streaming-window to serve without streaming."
        )
    if environ.get(EXPERIMENTAL_CUDA) != "1":
        raise StreamingConfigError(
            "vllm-sink's CUDA path is built but has not run on a GPU yet: set "
            f"{EXPERIMENTAL_CUDA}=1 to try it (scripts/gpu_check.sh checks it against the "
            "reference), or remove --streaming-sinks/--streaming-window to serve without "
            "streaming."
        )
    return GPU_WORKER


def prepare_cuda_args(args: EngineArgs, environ: MutableMapping[str, str]) -> None:
    """Select the V1 runner and turn async scheduling off, or refuse where asked otherwise."""
    logger.warning(
        "vllm-sink: streaming on CUDA is experimental (%s=1): it has not been verified on a "
        "GPU; run scripts/gpu_check.sh before trusting its output",
        EXPERIMENTAL_CUDA,
    )
    if environ.get(V2_RUNNER, "").lower() in ("1", "true"):
        raise StreamingConfigError(
            f"vllm-sink streams with vLLM's V1 model runner only; unset {V2_RUNNER}"
        )
    if environ.get(V2_RUNNER) is None:
        logger.info("vllm-sink: vLLM's V1 model runner (%s=0)", V2_RUNNER)
    environ[V2_RUNNER] = "0"  # read by this process and the engine processes it starts
    if args.async_scheduling:
        raise StreamingConfigError(
            "vllm-sink streaming does not support --async-scheduling yet: the worker moves "
            "each stream's view between steps; remove the flag"
        )
    if args.async_scheduling is None:
        logger.info("vllm-sink: async scheduling off (--no-async-scheduling)")
    args.async_scheduling = False
