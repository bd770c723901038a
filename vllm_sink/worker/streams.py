"""The streams a worker holds, from a request's first step to the snapshot it leaves.

One :class:`~vllm_sink.core.stream_state.StreamState` per running request (or
streaming-input session between its inputs), by request id, until the request
ends (its stream then goes to the snapshot vault,
:mod:`vllm_sink.worker.snapshot_vault`). ``min_tokens`` is
counted here over the whole stream, kept outputs plus evicted ones: vLLM's
own count sees only the outputs the window still holds
(:mod:`vllm_sink.worker.min_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from vllm_sink.core.stream_state import StreamState

RowOf = Callable[[str], "tuple[int, int] | None"]
"""A request's batch row and its kept output count (``None``: not in the batch)."""


class WorkerStreams:
    def __init__(self, sinks: int) -> None:
        self.sinks = sinks
        self.by_id: dict[str, StreamState] = {}
        self._awaiting_min_tokens: set[str] = set()
        """Streams whose ``min_tokens`` is not reached yet."""

    def __getitem__(self, req_id: str) -> StreamState:
        return self.by_id[req_id]

    def finish(self, req_ids: Iterable[str]) -> Iterator[tuple[str, StreamState]]:
        """The streams of requests that ended, no longer held here."""
        for req_id in req_ids:
            stream = self.by_id.pop(req_id, None)
            if stream is not None:
                yield req_id, stream

    def admit(self, req_id: str, prompt_len: int, params: Any) -> tuple[StreamState, bool]:
        """A new request's stream, and whether it is a streaming-input session's next input
        (its stream stayed here while it waited)."""
        stream = self.by_id.get(req_id)
        session = stream is not None
        if session:
            stream.next_input(prompt_len)
        else:
            stream = self.by_id[req_id] = StreamState(prompt_len)
        if params is not None and params.min_tokens:
            stream.min_tokens = params.min_tokens
            stream.stop_token_ids = params.all_stop_token_ids
            self._awaiting_min_tokens.add(req_id)
        return stream, session

    def rows_below_min_tokens(self, row_of: RowOf) -> list[tuple[int, Collection[int]]]:
        """Batch rows whose stop tokens stay masked, with those tokens."""
        rows = []
        for req_id in list(self._awaiting_min_tokens):
            stream = self.by_id.get(req_id)
            if stream is None:
                self._awaiting_min_tokens.discard(req_id)
                continue
            found = row_of(req_id)
            if found is None:
                continue
            row, kept = found
            if kept + stream.view(self.sinks).dropped_outputs < stream.min_tokens:
                rows.append((row, stream.stop_token_ids))
            else:
                stream.min_tokens = 0
                self._awaiting_min_tokens.discard(req_id)
        return rows
