"""Patch: apply streaming settings when vLLM builds its engine config.

Target (vLLM 0.32.0, ``vllm/engine/arg_utils.py``):
``EngineArgs.create_engine_config``, the one path from arguments to
``VllmConfig`` for ``vllm serve``, the benchmarks and offline ``LLM``.
When ``additional_config`` asks for streaming it sets the streaming worker
(vLLM's own ``worker_cls`` hook), turns prefix caching off and lifts the length
cap before the config is derived, then checks the result against the model
(deriving it once more with smaller prefill chunks when vLLM's default chunk
would carry RoPE positions past the model's range).
With streaming off it calls the original untouched.
Why no hook: a general plugin has no callback between argument parsing and
config creation, and these settings (prefix caching, ``max_model_len``,
``worker_cls``) must be fixed before the config derives from them; refusing a
bad setting here stops start-up before any engine process is spawned.
"""

from __future__ import annotations

import functools

MARKER = "_vllm_sink_config_patched"


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if EngineArgs.__dict__.get(MARKER):
        return
    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        from vllm_sink.config import StreamingSettings

        settings = StreamingSettings.from_additional_config(self.additional_config)
        if settings is None:
            return original(self, *args, **kwargs)
        from vllm_sink import engine_setup

        engine_setup.prepare_engine_args(self, settings)
        chunk_chosen_by_user = self.max_num_batched_tokens is not None
        with engine_setup.long_streams_allowed():
            config = original(self, *args, **kwargs)
        chunk = engine_setup.fitting_chunk_size(config)
        if chunk is not None and not chunk_chosen_by_user:
            # vLLM's default prefill chunk would carry positions past the model's
            # range: derive the config again with chunks that fit.
            engine_setup.logger.info(
                "vllm-sink: prefill chunks limited to %d tokens to keep RoPE positions "
                "within the model's range",
                chunk,
            )
            self.max_num_batched_tokens = chunk
            self.max_num_seqs = min(config.scheduler_config.max_num_seqs, chunk)
            with engine_setup.long_streams_allowed():
                config = original(self, *args, **kwargs)
        engine_setup.check_engine_config(config)
        return config

    EngineArgs.create_engine_config = create_engine_config
    setattr(EngineArgs, MARKER, True)
