"""The scheduler side's reads of vLLM's private scheduler and request state, in one place.

Every name used here is listed in :mod:`vllm_sink.vllm_internals` and checked
by ``tests/test_vllm_contract.py``.
"""

from __future__ import annotations

from typing import Any

from vllm_sink.core.snapshot_ops import OPS_ATTRIBUTE, SnapshotOp
from vllm_sink.core.snapshots import RESUME_KEY, Snapshot


def single_type_managers(scheduler: Any) -> tuple[Any, ...]:
    """The scheduler's KV cache manager of each KV cache group."""
    return tuple(scheduler.kv_cache_manager.coordinator.single_type_managers)


def kv_bytes_per_block(kv_cache_config: Any) -> int:
    """Bytes of KV cache one block id holds on one worker, over every layer of its group.

    KV cache groups overlay each other's tensors (a block id belongs to one
    group at a time), so a block is as large as the largest group's pages.
    """
    return max(
        group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        for group in kv_cache_config.kv_cache_groups
    )


def sink_key_bytes(kv_cache_config: Any, sinks: int) -> int:
    """Bytes of one worker's copy of a stream's sink keys (every layer of the sink group)."""
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        if getattr(spec, "sliding_window", None) is None:
            key_bytes_per_token = spec.page_size_bytes // (2 * spec.block_size)
            return sinks * key_bytes_per_token * len(group.layer_names)
    return 0


def register_builtin_specs() -> None:
    """Fill vLLM's KV spec registry with vLLM's own specs.

    The registry adds them only while it is empty: a plugin that registers
    first would leave ``FullAttentionSpec`` & co. unregistered.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()


def running_requests(scheduler: Any) -> list[Any]:
    return list(scheduler.running)


def computed_prompt(request: Any) -> bool:
    """Whether the request's prompt is computed, and nothing after it."""
    return request.num_computed_tokens == request.num_prompt_tokens > 0


def resumable(request: Any) -> bool:
    """Whether the request's KV is a function of its token ids (no images or embeddings)."""
    return not request.mm_features and request.prompt_embeds is None


def cuttable(request: Any) -> bool:
    """Whether the request's prompt may be cut (:mod:`vllm_sink.core.uncached_prompts`).

    Not when it asks for its prompt's log-probabilities (one per prompt token
    its client sent), nor for a streaming-input session's (its cache is its own).
    """
    params = request.sampling_params
    return (
        resumable(request)
        and params is not None
        and params.prompt_logprobs is None
        and not request.resumable
    )


def output_tokens(request: Any) -> list[int]:
    return list(request.output_token_ids)


def replace_prompt(request: Any, prompt: list[int]) -> None:
    """Make ``prompt`` the request's prompt in this scheduler, its output kept after it.

    The front end keeps the prompt its client sent (outputs report it); the
    engine core's request gets its own lists.
    """
    outputs = output_tokens(request)
    request.prompt_token_ids = prompt
    request.num_prompt_tokens = len(prompt)
    request._all_token_ids[:] = [*prompt, *outputs]


def request_salt(request: Any) -> str:
    """What besides token ids makes a request's KV its own: its cache salt and LoRA adapter."""
    lora = request.lora_request
    return f"{request.cache_salt or ''}|{lora.lora_int_id if lora is not None else ''}"


def mark_resumed(request: Any, snapshot: Snapshot | None) -> None:
    """Tell the worker which stream ``request`` continues (or that it continues none)."""
    params = request.sampling_params
    if params is None:
        return
    extra = params.extra_args or {}
    if snapshot is None and RESUME_KEY not in extra:
        return
    params = params.clone()  # the request's own copy: an in-process engine may share it
    params.extra_args = {k: v for k, v in extra.items() if k != RESUME_KEY}
    if snapshot is not None:
        params.extra_args[RESUME_KEY] = (snapshot.snapshot_id, snapshot.shift)
    request.sampling_params = params


def attach_snapshot_ops(scheduler_output: Any, ops: list[SnapshotOp]) -> None:
    """Send ``ops`` to the worker with the step (vLLM has no field for a plugin's own)."""
    setattr(scheduler_output, OPS_ATTRIBUTE, ops)
