"""Where an engine step's time goes, phase by phase, timed inside the engine.

py-spy could not place a gap of a few percent between two engines here: it
slowed decode steps by 15-160% and sampled the two engine processes at
different rates. This wraps a fixed set of engine methods with wall-clock
timers instead (some 70 calls a step, a few microseconds each), so that each
run reports the milliseconds per step of each phase for streaming and dense
alike, and a gap shows up in the phase it comes from.

Phases nest: ``attention`` and ``kv_write`` are inside ``model_forward``,
``evictions`` inside ``state_update``, and all of the runner's phases inside
``execute_model``. The engine must run in-process (``LLM`` does).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable


class StepBreakdown:
    """Accumulates time per phase while enabled; wraps the methods once, at construction."""

    def __init__(self, llm) -> None:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention
        from vllm.v1.engine.output_processor import OutputProcessor

        core = llm.llm_engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
        runner_class = type(runner)
        layers = get_layers_from_vllm_config(runner.vllm_config, Attention)
        attention_class = type(next(iter(layers.values())).impl)  # the backend's (CPU_ATTN here)
        scheduler_class = type(core.scheduler)
        phases: dict[str, tuple[type, str]] = {
            "scheduling": (scheduler_class, "schedule"),
            "execute_model": (runner_class, "execute_model"),
            "state_update": (runner_class, "_update_states"),
            "input_preparation": (runner_class, "_prepare_inputs"),
            "attention_metadata": (runner_class, "_build_attention_metadata"),
            "model_forward": (runner_class, "_model_forward"),
            "attention": (attention_class, "forward"),
            "kv_write": (attention_class, "do_kv_cache_update"),
            "sampling": (runner_class, "sample_tokens"),
            "scheduler_update": (scheduler_class, "update_from_output"),
            "output_processing": (OutputProcessor, "process_outputs"),
        }
        if hasattr(runner_class, "_evict"):  # vllm-sink's runner
            phases["evictions"] = (runner_class, "_evict")
        self.seconds: Counter[str] = Counter()
        self.enabled = False
        for phase, (cls, method) in phases.items():
            setattr(cls, method, self._timed(phase, getattr(cls, method)))

    def _timed(self, phase: str, method: Callable) -> Callable:
        def timed(*args, **kwargs):
            if not self.enabled:
                return method(*args, **kwargs)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        return timed

    def start(self) -> None:
        self.seconds.clear()
        self.enabled = True

    def stop(self, steps: int) -> dict[str, float]:
        """Milliseconds per step of each phase since :meth:`start`."""
        self.enabled = False
        return {phase: 1000 * s / steps for phase, s in sorted(self.seconds.items())}
