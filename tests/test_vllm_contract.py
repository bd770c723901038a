"""The installed vLLM still has every private name vllm-sink relies on (no engine started).

The list is :data:`vllm_sink.vllm_internals.INTERNALS`; a failure names the
entry that moved and the vllm-sink module that uses it.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from vllm_sink.vllm_internals import INTERNALS, Internal


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
        name = re.escape(internal.name)
        assigned = re.compile(
            rf"self\.{name}\s*(:[^=\n]*)?=[^=]|register_buffer\(\s*[\"']{name}[\"']"
        )
        found = hasattr(owner, internal.name) or assigned.search(inspect.getsource(owner))
        return None if found else f"{where}: no longer set on instances"
    function = getattr(owner, internal.name, None)
    if not callable(function):
        return f"{where}: no such method"
    params = inspect.signature(function).parameters
    missing = [p for p in internal.params if p not in params]
    return f"{where}: parameters {missing} are gone" if missing else None


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
