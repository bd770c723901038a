"""``min_tokens`` counted over the whole stream.

vLLM's built-in min-tokens logits processor masks stop tokens while a
request's output list is shorter than ``min_tokens``; the streaming worker
keeps only resident outputs in that list, so for ``min_tokens`` past the
window it would mask them forever. The runner takes ``min_tokens`` away from
the built-in processor (see :func:`vllm_sink.worker.vllm_runner.compact_request`) and adds this one,
which asks the runner which rows still need the mask: the runner knows each
stream's true output count (kept outputs plus evicted ones).

Applied where vLLM applies logits processors, after the raw log-probabilities
are taken, so what a request sees is exactly vLLM's behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

RowsToMask = Callable[[], Sequence[tuple[int, Collection[int]]]]


class StreamMinTokens(LogitsProcessor):
    """Masks the stop tokens of the batch rows that ``rows_to_mask`` names."""

    def __init__(self, rows_to_mask: RowsToMask) -> None:  # noqa: D107 (not vLLM's signature: built by the runner)
        self.rows_to_mask = rows_to_mask

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        return  # the runner's state is the source of truth

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, stop_token_ids in self.rows_to_mask():
            logits[row, list(stop_token_ids)] = float("-inf")
        return logits
