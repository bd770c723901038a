"""The worker vLLM starts when streaming is on (set through ``worker_cls``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_sink.config import StreamingConfigError
from vllm_sink.worker.model_runner import StreamingModelRunnerMixin, worker_config
from vllm_sink.worker.seeded_sampling import SeededChunkedPrefillMixin

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class StreamingCPUModelRunner(StreamingModelRunnerMixin, SeededChunkedPrefillMixin, CPUModelRunner):
    """vLLM's CPU model runner with sink + window streaming."""


class StreamingCPUWorker(CPUWorker):
    def __init__(self, vllm_config: VllmConfig, *args, **kwargs) -> None:
        super().__init__(worker_config(vllm_config), *args, **kwargs)

    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()
        self.model_runner.check_room_for_a_stream(available)
        return available

    def init_device(self) -> None:
        if self.use_v2_model_runner:
            raise StreamingConfigError(
                "vllm-sink supports vLLM's V1 model runner only; unset VLLM_USE_V2_MODEL_RUNNER"
            )
        super().init_device()
        # CPUWorker builds its runner inline (no factory hook like the GPU
        # worker's _make_model_runner). The subclass adds no state of its own
        # in __init__, so re-classing the fresh instance is equivalent to
        # having constructed it.
        self.model_runner.__class__ = StreamingCPUModelRunner
