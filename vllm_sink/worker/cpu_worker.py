"""The worker vLLM starts when streaming is on (set through ``worker_cls``)."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_sink.worker.model_runner import StreamingModelRunnerMixin
from vllm_sink.worker.seeded_sampling import SeededChunkedPrefillMixin
from vllm_sink.worker.streaming_worker import StreamingWorkerMixin
from vllm_sink.worker.vllm_runner import V1RunnerDoor, v1_runner_class


class StreamingCPUModelRunner(
    StreamingModelRunnerMixin, SeededChunkedPrefillMixin, V1RunnerDoor, v1_runner_class("cpu")
):
    """vLLM's CPU model runner with sink + window streaming."""


class StreamingCPUWorker(StreamingWorkerMixin, CPUWorker):
    def init_device(self) -> None:
        self.refuse_v2_runner()
        super().init_device()
        # CPUWorker builds its runner inline (no factory hook like the GPU
        # worker's). The subclass adds no state of its own in __init__, so
        # re-classing the fresh instance is equivalent to having constructed it.
        self.model_runner.__class__ = StreamingCPUModelRunner
