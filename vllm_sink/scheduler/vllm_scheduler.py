"""The scheduler side's reads of vLLM's private scheduler state, in one place.

Every name used here is listed in :mod:`vllm_sink.vllm_internals` and checked
by ``tests/test_vllm_contract.py``.
"""

from __future__ import annotations

from typing import Any


def single_type_managers(scheduler: Any) -> tuple[Any, ...]:
    """The scheduler's KV cache manager of each KV cache group."""
    return tuple(scheduler.kv_cache_manager.coordinator.single_type_managers)


def register_builtin_specs() -> None:
    """Fill vLLM's KV spec registry with vLLM's own specs.

    The registry adds them only while it is empty: a plugin that registers
    first would leave ``FullAttentionSpec`` & co. unregistered.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
