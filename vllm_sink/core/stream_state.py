"""What the worker keeps about one stream, beyond vLLM's own request state.

One object per stream, in the stream's own terms (absolute token counts), so
that nothing about a stream lives in parallel dictionaries. The runner
projects it into vLLM's objects (the request state and the batch row, which
hold the compact view) through :meth:`StreamState.view`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from vllm_sink.core.stream_view import StreamView


@dataclass
class StreamState:
    prompt_len: int
    """Absolute prompt length: the prompt, or the whole history after a preemption."""
    shift: int = 0
    """Tokens evicted after the sinks so far (whole blocks)."""
    first_sink_keys: torch.Tensor | None = None
    """The sink keys as first computed, at cache positions ``0 .. S-1``
    (``[layers, heads, S, head_size]``), copied at the stream's first eviction;
    later sink positions are rotated from this copy, so rounding never builds up."""
    min_tokens: int = 0
    """Outputs still to be made before a stop token may be sampled (0: none)."""
    stop_token_ids: Collection[int] = ()
    """The tokens ``min_tokens`` holds back."""

    def view(self, sinks: int) -> StreamView:
        return StreamView(sinks, self.shift, self.prompt_len)

    def next_input(self, prompt_len: int) -> None:
        """A streaming-input session's next input: its history so far is the prompt now.

        The cache and its evictions carry on; outputs kept from the last input
        are prompt tokens from here on, and ``min_tokens`` is the new input's.
        """
        self.prompt_len = prompt_len
        self.min_tokens = 0

    def restart(self, history_len: int) -> None:
        """A preempted stream recomputes its history as a prompt, from an empty cache."""
        self.min_tokens = max(0, self.min_tokens - (history_len - self.prompt_len))
        self.prompt_len = history_len
        self.shift = 0
        self.first_sink_keys = None
