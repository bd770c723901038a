"""The patches vllm-sink applies to vLLM internals, one module per target.

Every patch here exists because vLLM 0.32 has no hook for it; each module says
which code it targets and why. ``apply_all`` is called from the plugin entry
point in every vLLM process (vLLM may load general plugins more than once) and
applies each patch once; a patch changes nothing unless streaming is asked
for. Installed as ``vllm_sink.patches``.
"""

from __future__ import annotations

from importlib import import_module

PATCHES = (
    "engine_args_cli",
    "engine_args_config",
    "default_max_tokens",
    "shutdown_ends_streams",
)
"""Module names, applied in this order."""

APPLIED: dict[str, bool] = {}
"""Which patches are in place in this process (inspectable, for support)."""


def apply_all() -> None:
    for name in PATCHES:
        if not APPLIED.get(name):
            import_module(f"{__name__}.{name}").apply()
            APPLIED[name] = True
