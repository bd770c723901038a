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

import torch

from vllm_sink.worker import vllm_runner as runner_api


class SeededChunkedPrefillMixin:
    """Saves and restores the generators of seeded rows whose sample is discarded."""

    _discarded_generator_states: dict[int, torch.Tensor]

    def _sample(self, *args, **kwargs):
        generators = runner_api.seeded_generators(self)
        self._discarded_generator_states = {
            row: generators[row].get_state()
            for row in (runner_api.discarded_rows(self) if generators else ())
            if row in generators
        }
        return super()._sample(*args, **kwargs)

    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_discarded_generator_states", {})
        self._discarded_generator_states = {}
        generators = runner_api.seeded_generators(self)
        for row, state in saved.items():
            generators[row].set_state(state)
        # Hidden from vLLM's own rewind, which CPU generators cannot do.
        hidden = {row: generators.pop(row) for row in saved}
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            generators.update(hidden)
