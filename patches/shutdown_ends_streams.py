"""Patch: on shutdown, end every response that is still open.

Target (vLLM 0.32.0, ``vllm/v1/engine/async_llm.py``): ``AsyncLLM.shutdown``.
On SIGTERM, ``vllm serve`` stops its engine client (by default aborting: the
engine core is killed at once), then waits for its HTTP connections to close.
``AsyncLLM.shutdown`` cancels the task that hands engine outputs to requests;
when that happens before the task has seen the engine die, no request hears of
it, so every open response (an SSE stream included) stays open and silent and
the server lives on until its clients hang up. Streams make responses that
last hours the normal case, so a restart would wait on them. After vLLM's own
shutdown, every request still open gets ``EngineDeadError``, as it does when
the task sees the engine die: each response ends with an error event.
Why no hook: shutdown has no callback; the race is between vLLM's own tasks.
"""

from __future__ import annotations

import functools


def apply() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.shutdown

    @functools.wraps(original)
    def shutdown(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from vllm_sink.config import StreamingSettings

        config = getattr(self, "vllm_config", None)
        if config is None or not StreamingSettings.from_additional_config(config.additional_config):
            return
        end_open_requests(self)

    AsyncLLM.shutdown = shutdown


def end_open_requests(engine) -> None:
    """Fail every request the engine client still serves, on the client's event loop."""
    from vllm.v1.engine.exceptions import EngineDeadError

    handler = getattr(engine, "output_handler", None)
    processor = getattr(engine, "output_processor", None)
    if handler is None or processor is None or not processor.has_unfinished_requests():
        return
    loop = handler.get_loop()
    if not loop.is_closed():
        loop.call_soon_threadsafe(processor.propagate_error, EngineDeadError())
