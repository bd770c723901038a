"""What a request may ask of a streaming engine: how long it generates, and in what form.

vLLM's default for a request without ``max_tokens`` is "up to the length
limit". With streaming and no ``--max-model-len`` the limit is
:data:`~vllm_sink.config.UNLIMITED_STREAM_LEN`, so that default would never
end; such requests get the model's own context instead. A request that names
its ``max_tokens`` keeps it, however large.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_sink.config import UNLIMITED_STREAM_LEN, StreamingSettings
from vllm_sink.frontend.vllm_frontend import prompt_length, request_sampling_params

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.engine import EngineCoreRequest


def trained_positions(config: VllmConfig) -> int:
    """Positions the model's RoPE table covers: its own context."""
    text_config = config.model_config.hf_text_config
    return int(
        getattr(text_config, "max_position_embeddings", 0) or config.model_config.max_model_len
    )


def default_max_tokens(config: VllmConfig) -> int | None:
    """``max_tokens`` for requests that give none; ``None`` where vLLM's default is finite."""
    if StreamingSettings.from_additional_config(config.additional_config) is None:
        return None
    if config.model_config.max_model_len < UNLIMITED_STREAM_LEN:
        return None  # --max-model-len given: vLLM's default stops there
    return trained_positions(config)


def bound_open_ended_request(config: VllmConfig, request: EngineCoreRequest) -> None:
    """Give ``request`` the default ``max_tokens`` if it asks to run to the length limit.

    vLLM has already replaced a missing ``max_tokens`` by ``max_model_len -
    prompt`` (offline and OpenAI server alike), so "unset" and "up to the
    limit" arrive as the same number.
    """
    params = request_sampling_params(request)
    default = default_max_tokens(config)
    if params is None or default is None or params.max_tokens is None:
        return
    if params.max_tokens >= config.model_config.max_model_len - prompt_length(request):
        params.max_tokens = max(default, params.min_tokens)
