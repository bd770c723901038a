"""The worker's compact view of a stream: only its resident tokens, renumbered.

The scheduler counts a stream's tokens from its start (``a = 0, 1, ...``). The
worker keeps each stream in the shape its KV cache has: the ``S`` sinks, then
the resident window, numbered ``0, 1, ...`` without the evicted gap. With
``shift`` tokens evicted (a whole number of blocks, see
:mod:`vllm_sink.core.policy`), absolute token ``a`` is at view index

* ``a`` if ``a < S`` (a sink), else
* ``a - shift`` (resident only when ``a >= S + shift``).

vLLM's own bookkeeping then works unchanged on the view: positions are cache
positions, the block-table row is the compact cache ``[head, window...]`` and
sequence lengths are what the kernel attends. Every per-request buffer of the
worker (token row, block-table row, output tokens kept for penalties) is
bounded by the cache, not by the stream.

Pure arithmetic on token lists, so it can be tested without vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamView:
    """One stream seen through its cache: ``shift`` tokens after the sinks are gone."""

    sinks: int
    shift: int
    prompt_len: int
    """Absolute prompt length ``P`` (output tokens start at ``a = P``)."""

    def evicted_between(self, lo: int, hi: int | None = None) -> int:
        """How many absolute tokens in ``[lo, hi)`` are evicted (``hi=None``: no end)."""
        gap_end = self.sinks + self.shift
        end = gap_end if hi is None else min(hi, gap_end)
        return max(0, end - max(lo, self.sinks))

    @property
    def resident_prompt_len(self) -> int:
        """Prompt tokens still in the view (all of them until they are evicted)."""
        return self.prompt_len - self.evicted_between(0, self.prompt_len)

    @property
    def dropped_outputs(self) -> int:
        """Output tokens evicted so far (they come after any output sinks)."""
        return self.evicted_between(self.prompt_len)

    @property
    def first_droppable_output(self) -> int:
        """Index, in the output list, of the first output token that eviction removes."""
        return max(0, self.sinks - self.prompt_len)

    def absolute(self, index: int) -> int:
        """Absolute token number of view index ``index``."""
        return index if index < self.sinks else index + self.shift

    def tokens(
        self, prompt: Sequence[int], kept_outputs: Sequence[int], start: int, stop: int
    ) -> list[int]:
        """View tokens ``[start, stop)``.

        ``kept_outputs`` is the output list with :attr:`dropped_outputs` tokens
        already removed (the worker trims it as the stream advances).
        """
        out: list[int] = []
        for lo, hi in self._absolute_runs(start, stop):
            if lo < self.prompt_len:
                out.extend(prompt[lo : min(hi, self.prompt_len)])
                lo = self.prompt_len
            if lo < hi:
                skip = self.prompt_len + (self.dropped_outputs if lo >= self.sinks else 0)
                out.extend(kept_outputs[lo - skip : hi - skip])
        return out

    def _absolute_runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        """View range ``[start, stop)`` as contiguous absolute ranges."""
        runs = []
        if start < min(stop, self.sinks):
            runs.append((start, min(stop, self.sinks)))
        lo = max(start, self.sinks)
        if lo < stop:
            runs.append((lo + self.shift, stop + self.shift))
        return runs
