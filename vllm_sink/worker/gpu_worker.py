"""The worker vLLM starts on CUDA when streaming is on: experimental, not yet run on a GPU.

vLLM's GPU worker builds its runner in a factory method, its override point (reached
through :class:`~vllm_sink.worker.vllm_runner.V1GPUWorkerDoor`); this one builds vLLM's
V1 runner with the same streaming mixins the CPU worker uses (the CPU runner subclasses
the V1 GPU runner, so the mixins' hooks already run the GPU runner's own input
preparation). The V2 runner keeps request state on the device and is not supported:
start-up selects V1 (:mod:`vllm_sink.frontend.engine_setup`). Everything
backend-specific is in :mod:`vllm_sink.worker.gpu_kv_layout`.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from vllm_sink.worker.model_runner import StreamingModelRunnerMixin
from vllm_sink.worker.seeded_sampling import SeededChunkedPrefillMixin
from vllm_sink.worker.streaming_worker import StreamingWorkerMixin
from vllm_sink.worker.vllm_runner import V1GPUWorkerDoor, V1RunnerDoor, v1_runner_class


class StreamingGPUModelRunner(
    StreamingModelRunnerMixin, SeededChunkedPrefillMixin, V1RunnerDoor, v1_runner_class("cuda")
):
    """vLLM's V1 GPU model runner with sink + window streaming."""


class StreamingGPUWorker(StreamingWorkerMixin, V1GPUWorkerDoor, Worker):
    def build_model_runner(self) -> StreamingGPUModelRunner:
        self.refuse_v2_runner()
        return StreamingGPUModelRunner(self.vllm_config, self.device)
