"""The worker vLLM starts on CUDA when streaming is on: experimental, not yet run on a GPU.

vLLM's GPU worker builds its runner in ``_make_model_runner``, its override point;
this one builds vLLM's V1 runner with the same streaming mixin the CPU worker uses
(the CPU runner subclasses the V1 GPU runner, so the mixin's hooks already run the GPU
runner's own input preparation). The V2 runner keeps request state on the device and
is not supported: start-up selects V1 (:mod:`vllm_sink.frontend.engine_setup`).
Everything backend-specific is in :mod:`vllm_sink.worker.gpu_kv_layout`.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_sink.worker.model_runner import StreamingModelRunnerMixin
from vllm_sink.worker.seeded_sampling import SeededChunkedPrefillMixin
from vllm_sink.worker.streaming_worker import StreamingWorkerMixin


class StreamingGPUModelRunner(StreamingModelRunnerMixin, SeededChunkedPrefillMixin, GPUModelRunner):
    """vLLM's V1 GPU model runner with sink + window streaming."""


class StreamingGPUWorker(StreamingWorkerMixin, Worker):
    def _make_model_runner(self) -> GPUModelRunner:
        self.refuse_v2_runner()
        return StreamingGPUModelRunner(self.vllm_config, self.device)
