"""Which worker each platform gets, and the CUDA opt-in with its settings."""

from __future__ import annotations

import pytest
from vllm.engine.arg_utils import EngineArgs

from vllm_sink.config import StreamingConfigError
from vllm_sink.frontend.platforms import (
    CPU_WORKER,
    EXPERIMENTAL_CUDA,
    GPU_WORKER,
    V2_RUNNER,
    check_attention_backend,
    prepare_cuda_args,
    streaming_worker,
)


def test_cpu_streams_without_opting_in():
    assert streaming_worker("cpu", {}) == CPU_WORKER


def test_cuda_is_refused_without_the_opt_in_and_says_how():
    with pytest.raises(StreamingConfigError, match=f"{EXPERIMENTAL_CUDA}=1"):
        streaming_worker("cuda", {})
    with pytest.raises(StreamingConfigError, match=f"{EXPERIMENTAL_CUDA}=1"):
        streaming_worker("cuda", {EXPERIMENTAL_CUDA: "yes"})


def test_cuda_with_the_opt_in_gets_the_gpu_worker_which_imports_here():
    import importlib

    assert streaming_worker("cuda", {EXPERIMENTAL_CUDA: "1"}) == GPU_WORKER
    module, _, name = GPU_WORKER.rpartition(".")
    assert hasattr(importlib.import_module(module), name)


@pytest.mark.parametrize("device", ["rocm", "tpu", "xpu"])
def test_other_platforms_are_refused(device):
    with pytest.raises(StreamingConfigError, match=device):
        streaming_worker(device, {EXPERIMENTAL_CUDA: "1"})


def test_cuda_selects_the_v1_runner_and_turns_async_scheduling_off():
    args, environ = EngineArgs(model="m"), {}
    prepare_cuda_args(args, environ)
    assert environ[V2_RUNNER] == "0"
    assert args.async_scheduling is False


@pytest.mark.parametrize(
    ("environ", "async_scheduling", "message"),
    [({V2_RUNNER: "1"}, None, V2_RUNNER), ({}, True, "--async-scheduling")],
)
def test_cuda_refuses_what_streaming_cannot_run_with(environ, async_scheduling, message):
    args = EngineArgs(model="m", async_scheduling=async_scheduling)
    with pytest.raises(StreamingConfigError, match=message):
        prepare_cuda_args(args, environ)


def test_the_gpu_worker_refuses_the_v2_runner():
    """Its ``_make_model_runner`` (vLLM's override point) builds V1 only."""
    from vllm_sink.worker.gpu_worker import StreamingGPUWorker

    worker = object.__new__(StreamingGPUWorker)  # no device here: only the runner choice
    worker.use_v2_model_runner = True
    with pytest.raises(StreamingConfigError, match=V2_RUNNER):
        worker._make_model_runner()


@pytest.mark.parametrize(
    ("device", "backend"),
    [("cpu", "CPU_ATTN"), ("cuda", "FLASH_ATTN"), ("cuda", "FLASHINFER"), ("cuda", "TRITON_ATTN"),
     ("cuda", "FLEX_ATTENTION")],
)  # fmt: skip
def test_each_platform_streams_through_the_backends_its_worker_evicts_in(device, backend):
    check_attention_backend(device, backend)


@pytest.mark.parametrize(
    ("device", "backend", "message"),
    [
        ("cpu", "FLASH_ATTN", "on cpu through the CPU_ATTN attention backend; remove the choice"),
        ("cuda", "CPU_ATTN", "FLASH_ATTN, FLASHINFER, TRITON_ATTN, FLEX_ATTENTION attention"),
        ("cuda", "FLASHMLA", "remove the choice of FLASHMLA"),
    ],
)
def test_other_backends_are_refused_naming_the_supported_ones(device, backend, message):
    with pytest.raises(StreamingConfigError, match=message):
        check_attention_backend(device, backend)
