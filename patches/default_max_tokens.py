"""Patch: a finite default ``max_tokens`` for streams without a length limit.

Target (vLLM 0.32.0, ``vllm/v1/engine/input_processor.py``):
``InputProcessor.process_inputs``, which every request of the offline ``LLM``,
``AsyncLLM`` and the OpenAI server passes through in the front-end process.
vLLM lets a request that gives no ``max_tokens`` generate up to the length
limit: ``max_model_len - prompt`` (set there for ``max_tokens=None``, and by
the OpenAI server's ``get_max_tokens`` before). With streaming and no
``--max-model-len`` there is no limit, so such a request (most chat clients
omit ``max_tokens``) would run until the model emits EOS, forever on a base
model. Here it gets the default of :func:`vllm_sink.frontend.limits.default_max_tokens`
instead: the model's own context.
Why no hook: vLLM's per-server default, ``max_new_tokens`` in
``--override-generation-config``, also caps every request that asks for more,
and streams must be able to ask for any length. The platform's
``validate_request`` belongs to the active platform only.
"""

from __future__ import annotations

import functools


def apply() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        from vllm_sink.frontend.limits import bound_open_ended_request

        request = original(self, *args, **kwargs)
        bound_open_ended_request(self.vllm_config, request)
        return request

    InputProcessor.process_inputs = process_inputs
