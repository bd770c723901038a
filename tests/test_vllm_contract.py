"""The installed vLLM still has every private name vllm-sink relies on (no engine started).

The list is :data:`vllm_sink.vllm_internals.INTERNALS`; a failure names the
entry that moved and the vllm-sink module that uses it. Besides names: our
overrides accept every call vLLM's signatures allow, our calls fit them, and
the tuples we return have the length vLLM's annotations give
(:mod:`vllm_sink_dev.contract`).
"""

from __future__ import annotations

import importlib
import inspect

import pytest

from vllm_sink.vllm_internals import INTERNALS, Internal
from vllm_sink_dev.contract import assigned_in, signature_problems


def what_moved(internal: Internal) -> str | None:
    """Why ``internal`` is not in the installed vLLM as listed, or ``None`` if it is."""
    where = f"{internal.module}.{internal.owner + '.' if internal.owner else ''}{internal.name}"
    try:
        module = importlib.import_module(internal.module)
    except ImportError as error:
        return f"{where}: module does not import ({error})"
    owner = getattr(module, internal.owner, None) if internal.owner else module
    if owner is None:
        return f"{where}: {internal.owner} is gone from {internal.module}"
    if internal.kind == "field":
        fields = getattr(owner, "__dataclass_fields__", {})
        return None if internal.name in fields else f"{where}: no such dataclass field"
    if internal.kind == "attribute":
        assigned = assigned_in(internal.name)
        found = hasattr(owner, internal.name) or assigned.search(inspect.getsource(owner))
        return None if found else f"{where}: no longer set on instances"
    function = getattr(owner, internal.name, None)
    if not callable(function):
        return f"{where}: no such method"
    problems = signature_problems(internal, inspect.signature(function))
    return "; ".join(problems) if problems else None


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: f"{i.owner}.{i.name}")
def test_vllm_still_has(internal):
    moved = what_moved(internal)
    assert moved is None, f"vLLM changed what vllm_sink.{internal.used_by} relies on: {moved}"


def test_a_renamed_internal_is_named(monkeypatch):
    """The check can fail, and says which name moved."""
    from vllm.v1.worker.gpu_input_batch import InputBatch

    internal = next(i for i in INTERNALS if i.name == "_make_sampling_metadata")
    monkeypatch.delattr(InputBatch, "_make_sampling_metadata")
    assert what_moved(internal) == (
        "vllm.v1.worker.gpu_input_batch.InputBatch._make_sampling_metadata: no such method"
    )
    renamed = Internal(internal.module, "InputBatch", "token_ids_cpu_renamed", "attribute")
    assert "no longer set on instances" in what_moved(renamed)


def test_vllm_033s_new_parameter_fails_an_override_that_lacks_it():
    """vLLM 0.33 calls ``_get_local_prefix_cache_hit(request, max_cache_hit_length)``."""

    class Scheduler:  # vLLM 0.33's signature
        def _get_local_prefix_cache_hit(
            self, request, max_cache_hit_length: int | None = None
        ) -> tuple[KVCacheBlocks, int, int, bool]: ...  # noqa: F821

    class OurOldOverride:
        def _get_local_prefix_cache_hit(self, request): ...

    internal = next(i for i in INTERNALS if i.name == "_get_local_prefix_cache_hit")
    theirs = inspect.signature(Scheduler._get_local_prefix_cache_hit)
    assert signature_problems(internal, theirs) == []  # ours takes it
    old = Internal(**{**internal.__dict__, "override": f"{__name__}:OurOldOverride"})
    globals()["OurOldOverride"] = OurOldOverride
    problems = signature_problems(old, theirs)
    assert len(problems) == 2 and all("does not take every argument" in p for p in problems)
    five = Internal(**{**internal.__dict__, "returns": 5})
    assert "we return a 5-tuple" in signature_problems(five, theirs)[0]
