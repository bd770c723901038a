"""The streaming engine's scheduler: vLLM's own, publishing the streaming figures.

vLLM makes its scheduler stats once per step (``make_stats``) when stats are
on; the streaming figures are made at the same moment from the streaming KV
managers and written to this engine core's board
(:mod:`vllm_sink.metrics`), which the API server reads for ``/metrics``.
Set through vLLM's ``scheduler_cls`` by :mod:`vllm_sink.frontend.engine_setup`.
"""

from __future__ import annotations

import time

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_sink.metrics import StreamingBoard, engine_key
from vllm_sink.scheduler.kv_cache import StreamingSinkManager
from vllm_sink.scheduler.vllm_scheduler import single_type_managers

PUBLISH_INTERVAL_S = 0.5
"""How often a busy scheduler refreshes the figures (they cost O(streams) to make)."""


class StreamingSchedulerMixin:
    """Mixed in front of a vLLM scheduler class."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # One KV cache group: the worker refuses models with any other kind of layer.
        (self.streaming_manager,) = (
            m for m in single_type_managers(self) if isinstance(m, StreamingSinkManager)
        )
        self._board: StreamingBoard | None = None
        self._published_at = 0.0
        if self.log_stats:
            config = self.vllm_config
            engine = config.parallel_config.data_parallel_rank
            self._board = StreamingBoard.create(engine_key(config.instance_id, engine))
            self.publish_streaming_figures()

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        self.publish_streaming_figures(when_due=True)
        return stats

    def finish_requests(self, *args, **kwargs):
        finished = super().finish_requests(*args, **kwargs)
        self.publish_streaming_figures(when_due=True)
        return finished

    def publish_streaming_figures(self, when_due: bool = False) -> None:
        """Write the figures to the board; with ``when_due``, only if they may be stale.

        Once no stream is left they are written at once: an idle engine takes
        no more steps (aborts arrive between steps).
        """
        if self._board is None:
            return
        now = time.monotonic()
        idle = not self.streaming_manager.has_streams
        if when_due and not idle and now - self._published_at < PUBLISH_INTERVAL_S:
            return
        self._published_at = now
        self._board.publish(self.streaming_manager.figures())


class StreamingScheduler(StreamingSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler (the CPU platform turns async scheduling off)."""
