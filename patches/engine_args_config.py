"""Patch: apply streaming settings when vLLM builds its engine config.

Target (vLLM 0.32.0, ``vllm/engine/arg_utils.py``):
``EngineArgs.create_engine_config``, the one path from arguments to
``VllmConfig`` for ``vllm serve``, the benchmarks and offline ``LLM``.
When ``additional_config`` asks for streaming, ``vllm_sink.frontend.engine_setup`` sets
the streaming worker (vLLM's own ``worker_cls`` hook), turns prefix caching off
and lifts the length cap before the config is derived, then checks the result
against the model (deriving it once more with smaller prefill chunks when
vLLM's default chunk would carry RoPE positions past the model's range).
With streaming off it calls the original untouched.
Why no hook: a general plugin has no callback between argument parsing and
config creation, and these settings (prefix caching, ``max_model_len``,
``worker_cls``) must be fixed before the config derives from them; refusing a
bad setting here stops start-up before any engine process is spawned.
"""

from __future__ import annotations

import functools


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        from vllm_sink.config import StreamingSettings

        if StreamingSettings.from_additional_config(self.additional_config) is None:
            return original(self, *args, **kwargs)
        from vllm_sink.frontend.engine_setup import create_streaming_engine_config

        return create_streaming_engine_config(self, original, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config
