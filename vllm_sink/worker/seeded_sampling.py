"""Seeded sampling over chunked prefill on CPU generators.

vLLM samples every scheduled request, then drops the token of a request whose
prompt is not yet complete (a prefill chunk that is not the last). To keep a
seeded request's random stream as if that sample never happened, the V1 runner
rewinds its generator with ``set_offset(get_offset() - 4)``
(``GPUModelRunner._bookkeeping_sync``, vLLM 0.32; upstream PR #10097): a
property of CUDA's Philox generators. A CPU generator (Mersenne Twister) has no
offset, so on vLLM's CPU backend the rewind raises ``RuntimeError: CPU
Generator does not use offset`` and the engine core dies. Streams make prompts
longer than a prefill chunk the normal case, and OpenAI clients send ``seed``.

Instead, the full generator state of each discarded, seeded row is saved
before sampling and put back afterwards, and vLLM's rewind is not run for
those rows. Where the rewind worked, this gives the same result: a seeded
request samples the same tokens whatever the prefill chunking.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from vllm_sink.worker import vllm_runner as runner_api


class SeededChunkedPrefillMixin:
    """Saves and restores the generators of seeded rows whose sample is discarded.

    Implements the sampling hooks of :class:`~vllm_sink.worker.vllm_runner.V1RunnerDoor`.
    """

    _discarded_generator_states: dict[int, torch.Tensor]

    def save_discarded_generators(self) -> None:
        """Before sampling: the state of each seeded generator whose sample is dropped."""
        generators = runner_api.seeded_generators(self)
        self._discarded_generator_states = {
            row: generators[row].get_state()
            for row in (runner_api.discarded_rows(self) if generators else ())
            if row in generators
        }

    @contextmanager
    def generators_kept_from_rewind(self) -> Iterator[None]:
        """Around vLLM's bookkeeping: the saved states put back, and those generators
        hidden from its rewind."""
        saved = getattr(self, "_discarded_generator_states", {})
        self._discarded_generator_states = {}
        generators = runner_api.seeded_generators(self)
        for row, state in saved.items():
            generators[row].set_state(state)
        # Hidden from vLLM's own rewind, which CPU generators cannot do.
        hidden = {row: generators.pop(row) for row in saved}
        try:
            yield
        finally:
            generators.update(hidden)
