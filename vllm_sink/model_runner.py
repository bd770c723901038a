"""Worker side: evictions in the cache and positions within the cache.

A mixin over vLLM's V1 model runner. It keeps vLLM's own bookkeeping
untouched (absolute token counts, append-only block rows, slot mapping) and
adds three things:

* before each step's inputs are prepared, the evictions the policy calls for
  are carried out in the KV cache (see :mod:`vllm_sink.eviction`);
* after they are prepared, each token's RoPE position is moved from its place
  in the text to its place in the cache;
* each attention layer's backend gets the compacting metadata builder
  (:mod:`vllm_sink.attention`), and each layer's spec becomes a
  :class:`~vllm_sink.kv_cache.StreamingSinkSpec`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.config import get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from vllm_sink.attention import streaming_backend
from vllm_sink.config import policy_from_vllm_config
from vllm_sink.cpu_kv_layout import PagedKV, PageLayout
from vllm_sink.eviction import EvictionPlan, apply_eviction_plan
from vllm_sink.kv_cache import StreamingSinkSpec
from vllm_sink.policy import SinkWindowPolicy
from vllm_sink.rerotation import RopeDeltas

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

logger = init_logger("vllm.vllm_sink")

SUPPORTED_BACKENDS = ("CPU_ATTN",)


class UnsupportedModelError(RuntimeError):
    pass


def find_rotary_modules(
    model: torch.nn.Module, layer_names: set[str]
) -> dict[str, torch.nn.Module]:
    """Map each attention layer to the rotary module its parent applies to K.

    vLLM's decoder layers keep ``rotary_emb`` next to ``attn`` on the same
    attention module (Llama, Mistral, Qwen2, ...); that is what we look for.
    """
    found: dict[str, torch.nn.Module] = {}
    for module in model.modules():
        attn, rotary = getattr(module, "attn", None), getattr(module, "rotary_emb", None)
        if isinstance(attn, Attention) and rotary is not None:
            found[attn.layer_name] = rotary
    missing = sorted(layer_names - found.keys())
    if missing:
        raise UnsupportedModelError(
            f"vllm-sink needs a RoPE model whose attention modules keep `rotary_emb` "
            f"next to `attn`; found no rotary embedding for {missing[:3]}"
        )
    return found


class StreamingModelRunnerMixin:
    """Mixed in front of a V1 model runner class (see :mod:`vllm_sink.worker`)."""

    # ------------------------------------------------------------ set-up hooks
    @functools.cached_property
    def streaming_policy(self) -> SinkWindowPolicy:
        return policy_from_vllm_config(self.vllm_config)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        specs = super().get_kv_cache_spec()
        policy = self.streaming_policy
        converted: dict[str, KVCacheSpec] = {}
        for name, spec in specs.items():
            if (
                type(spec) is not FullAttentionSpec
                or spec.sliding_window
                or spec.attention_chunk_size
            ):
                raise UnsupportedModelError(
                    f"vllm-sink supports models whose every layer is plain full "
                    f"attention; layer {name} has {type(spec).__name__}"
                    + (
                        f" with sliding_window={spec.sliding_window}"
                        if getattr(spec, "sliding_window", None)
                        else ""
                    )
                )
            converted[name] = StreamingSinkSpec.from_full_attention(spec, policy)
        return converted

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        layers = get_layers_from_vllm_config(self.vllm_config, Attention)
        for name, layer in layers.items():
            backend = layer.get_attn_backend()
            if backend.get_name() not in SUPPORTED_BACKENDS:
                raise UnsupportedModelError(
                    f"vllm-sink supports the {SUPPORTED_BACKENDS} attention backends; "
                    f"layer {name} uses {backend.get_name()}"
                )
            if layer.impl.alibi_slopes is not None:
                raise UnsupportedModelError("vllm-sink does not support ALiBi models yet")
            layer.attn_backend = streaming_backend(backend)
        rotary = find_rotary_modules(self.get_model(), set(layers))
        deltas = {id(m): RopeDeltas.from_rotary_module(m) for m in rotary.values()}
        self._streaming_ropes = {name: deltas[id(m)] for name, m in rotary.items()}
        self._streaming_evicted: dict[str, int] = {}

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        layers = get_layers_from_vllm_config(self.vllm_config, Attention)
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        layout = None
        self._streaming_layers: list[tuple[PagedKV, PagedKV, RopeDeltas]] = []
        for name, layer in layers.items():
            kv_cache = layer.kv_cache
            if layout is None:
                layout = PageLayout.probe_cpu_attn(
                    spec.block_size, spec.head_size, kv_cache.dtype, layer.isa
                )
            self._streaming_layers.append(
                (
                    PagedKV.keys_of(kv_cache, layout),
                    PagedKV.values_of(kv_cache, layout),
                    self._streaming_ropes[name],
                )
            )
        policy = self.streaming_policy
        per_stream = policy.max_resident_blocks * spec.page_size_bytes * len(layers)
        logger.info(
            "vllm-sink: KV memory per stream at most %.1f MiB (%d blocks); the pool of %d "
            "blocks holds %d full-size streams at once",
            per_stream / 2**20,
            policy.max_resident_blocks,
            kv_cache_config.num_blocks,
            (kv_cache_config.num_blocks - 1) // policy.max_resident_blocks,
        )

    # -------------------------------------------------------------- every step
    def _update_states(self, scheduler_output: SchedulerOutput):
        evicted = self._streaming_evicted
        for req_id in scheduler_output.finished_req_ids:
            evicted.pop(req_id, None)
        for new_req in scheduler_output.scheduled_new_reqs:
            evicted[new_req.req_id] = 0
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            evicted[req_id] = 0  # a resumed request recomputes into fresh blocks
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output: SchedulerOutput, num_scheduled_tokens: np.ndarray):
        policy = self.streaming_policy
        num_reqs = self.input_batch.num_reqs
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs]
        self._evict(policy, computed)
        shift = policy.evicted_blocks_array(computed.astype(np.int64)) * policy.block_size
        outputs = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if shift.any():
            total = scheduler_output.total_num_scheduled_tokens
            token_shift = shift[self.req_indices.np[:total]]
            self.positions[:total] -= torch.from_numpy(token_shift).to(self.positions.device)
        return outputs

    def _evict(self, policy: SinkWindowPolicy, computed: np.ndarray) -> None:
        plan = EvictionPlan()
        rows = self.input_batch.block_table[0].block_table.np
        evicted = self._streaming_evicted
        for i, req_id in enumerate(self.input_batch.req_ids[: len(computed)]):
            evicted[req_id] = plan.add(policy, rows[i], int(computed[i]), evicted.get(req_id, 0))
        if plan:
            apply_eviction_plan(plan, self._streaming_layers, policy)
