"""What both streaming workers (CPU, CUDA) add to vLLM's: the config they see, and checks.

vLLM builds each worker from the engine's config; the streaming workers hand it the
config of :func:`worker_config` instead, refuse the V2 model runner, and check that
the KV cache holds at least one whole stream before vLLM sizes its pool.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from vllm_sink.config import StreamingConfigError, streaming_policy
from vllm_sink.worker.vllm_runner import uses_v2_runner

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def worker_config(vllm_config: VllmConfig) -> VllmConfig:
    """The engine's config as the streaming workers give it to vLLM's: sequences as long
    as the cache.

    The scheduler's ``max_model_len`` is the stream length limit; the worker
    only ever holds a stream's compact view, so every buffer vLLM sizes by
    ``max_model_len`` (token rows, block-table rows) is sized by the cache
    instead. A shallow copy: the engine core may share the original object
    (in-process engines) and must keep the stream limit.
    """
    config = copy.copy(vllm_config)
    config.model_config = copy.copy(vllm_config.model_config)
    config.model_config.max_model_len = streaming_policy(vllm_config).view_width
    return config


class StreamingWorkerMixin:
    """Mixed in front of a vLLM worker class whose runner has the streaming mixin."""

    def __init__(self, vllm_config: VllmConfig, *args, **kwargs) -> None:
        super().__init__(worker_config(vllm_config), *args, **kwargs)

    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()
        self.model_runner.check_room_for_a_stream(available)
        return available

    def refuse_v2_runner(self) -> None:
        """Call before the runner is built: streaming runs on vLLM's V1 runner only."""
        if uses_v2_runner(self):
            raise StreamingConfigError(
                "vllm-sink supports vLLM's V1 model runner only; set VLLM_USE_V2_MODEL_RUNNER=0"
            )
