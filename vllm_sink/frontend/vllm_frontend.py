"""The start-up side's one door into vLLM: what the front end reads beyond vLLM's public API.

Every name used here is listed in :mod:`vllm_sink.vllm_internals` and checked by
``tests/test_vllm_contract.py``; the front end's other modules use vLLM's public
configuration and engine arguments only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.v1.engine import EngineCoreRequest


def reread_vllm_envs() -> None:
    """Make ``vllm.envs`` see the environment as it is now (it may cache its reads)."""
    import vllm.envs as envs

    if envs._is_envs_cache_enabled():
        envs.__getattr__.cache_clear()


def request_sampling_params(request: EngineCoreRequest) -> Any:
    """The request's sampling parameters (``None`` for a pooling request)."""
    return request.sampling_params


def prompt_length(request: EngineCoreRequest) -> int:
    """Tokens in the request's prompt, given as token ids or as embeddings."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return len(request.prompt_embeds)
