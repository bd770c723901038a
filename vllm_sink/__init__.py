"""vllm-sink: StreamingLLM attention sinks in vLLM's paged KV cache.

This module is imported in every vLLM process (entry point
``vllm.general_plugins``), so it imports nothing heavy; streaming code loads
only when an engine asks for it.
"""

from __future__ import annotations

__version__ = "0.1.0"

SUPPORTED_VLLM = (0, 32)


def register() -> None:
    """vLLM plugin entry point: install the CLI flags and the config hook."""
    from vllm_sink.patches import apply_all

    apply_all()
