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

import dataclasses
from collections.abc import Mapping

from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from vllm_sink.core.stream_state import StreamState


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
        room = self.token_ids_cpu.shape[1] - len(request.output_token_ids)
        prompt = view.tokens(request.prompt_token_ids, (), 0, min(view.resident_prompt_len, room))
        # The copy shares the output list (penalties and logits processors
        # keep a reference to it) and the block ids, which the runner keeps
        # compact; only the prompt and the computed count are the view's.
        params = request.sampling_params
        if params is not None and params.min_tokens:
            params = params.clone()
            params.min_tokens = 0  # enforced by vllm_sink.worker.min_tokens
        compact = dataclasses.replace(
            request,
            sampling_params=params,
            prompt_token_ids=prompt,
            num_computed_tokens=request.num_computed_tokens - view.shift,
            prompt_is_token_ids=None,
        )
        return super().add_request(compact)
