"""The worker's persistent batch, holding each stream in its compact view.

vLLM's ``InputBatch.add_request`` copies a request's whole history (prompt and
outputs) into a token row as wide as ``max_model_len``. A stream's history is
unbounded, so the streaming runner gives its batch rows only as wide as the
cache (:attr:`~vllm_sink.core.policy.SinkWindowPolicy.view_width`) and this
subclass writes what the view holds: the resident tokens, and of a prompt not
yet computed, as much as fits (the runner refills the row as the stream
advances).

``min_tokens`` is taken away from vLLM's built-in processor (which counts the
kept outputs only) and enforced by :mod:`vllm_sink.worker.min_tokens` instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from vllm_sink.core.stream_state import StreamState
from vllm_sink.worker.vllm_runner import compact_request


class StreamingInputBatch(InputBatch):
    """``InputBatch`` whose rows are streams' compact views.

    The runner re-classes vLLM's instance (its constructor takes a dozen
    version-specific arguments) and sets :attr:`streams`; nothing else
    differs from the base class.
    """

    streams: Mapping[str, StreamState]
    """The runner's state of each stream."""
    sinks: int

    def add_request(self, request: CachedRequestState) -> int:
        assert request.prompt_token_ids is not None, "streams take token prompts"
        view = self.streams[request.req_id].view(self.sinks)
        return super().add_request(compact_request(request, view, self.token_ids_cpu.shape[1]))
