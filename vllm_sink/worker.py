"""The worker vLLM starts when streaming is on (set through ``worker_cls``)."""

from __future__ import annotations

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_sink.model_runner import StreamingModelRunnerMixin


class StreamingCPUModelRunner(StreamingModelRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with sink + window streaming."""


class StreamingCPUWorker(CPUWorker):
    def init_device(self) -> None:
        if self.use_v2_model_runner:
            raise RuntimeError(
                "vllm-sink supports vLLM's V1 model runner only; unset VLLM_USE_V2_MODEL_RUNNER"
            )
        super().init_device()
        # CPUWorker builds its runner inline (no factory hook like the GPU
        # worker's _make_model_runner). The subclass adds no state of its own
        # in __init__, so re-classing the fresh instance is equivalent to
        # having constructed it.
        self.model_runner.__class__ = StreamingCPUModelRunner
