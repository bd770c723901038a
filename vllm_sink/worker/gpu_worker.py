"""The worker vLLM starts on CUDA when streaming is on: experimental, not yet run on a GPU.

vLLM's GPU worker builds its runner in ``_make_model_runner``, its override point;
this one builds vLLM's V1 runner with the same streaming mixin the CPU worker uses
(the CPU runner subclasses the V1 GPU runner, so the mixin's hooks already run the GPU
runner's own input preparation). The V2 runner keeps request state on the device and
is not supported: start-up selects V1 (:mod:`vllm_sink.frontend.engine_setup`).
Everything backend-specific is in :mod:`vllm_sink.worker.gpu_kv_layout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_sink.config import StreamingConfigError
from vllm_sink.worker.model_runner import StreamingModelRunnerMixin, worker_config
from vllm_sink.worker.seeded_sampling import SeededChunkedPrefillMixin

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class StreamingGPUModelRunner(StreamingModelRunnerMixin, SeededChunkedPrefillMixin, GPUModelRunner):
    """vLLM's V1 GPU model runner with sink + window streaming."""


class StreamingGPUWorker(Worker):
    def __init__(self, vllm_config: VllmConfig, *args, **kwargs) -> None:
        super().__init__(worker_config(vllm_config), *args, **kwargs)

    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()
        self.model_runner.check_room_for_a_stream(available)
        return available

    def _make_model_runner(self) -> GPUModelRunner:
        if self.use_v2_model_runner:
            raise StreamingConfigError(
                "vllm-sink supports vLLM's V1 model runner only; set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        return StreamingGPUModelRunner(self.vllm_config, self.device)
