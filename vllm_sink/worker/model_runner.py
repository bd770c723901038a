"""Worker side: evictions in the cache, and each stream kept in its compact view.

A mixin over vLLM's V1 model runner. vLLM's scheduler counts a stream's tokens
from its start; the runner keeps each stream as its cache holds it
(:mod:`vllm_sink.core.stream_view`): sinks, then the resident window, renumbered
without the evicted gap. vLLM's own input preparation then gives every token
its position in the cache, the kernel the compact block row and the cached
length, and every per-request buffer stays as small as the cache:

* before each step (before vLLM applies the scheduler's update, so that a
  row never holds more than the cache), the evictions the policy calls for
  are carried out in the KV cache (see :mod:`vllm_sink.worker.eviction`) and each
  stream's view moves on: block row, token row, computed count and the
  output tokens kept for penalties;
* each token's RoPE position is its index in the view plus the stream's
  offset (:meth:`SinkWindowPolicy.rope_offset`), added to the positions vLLM
  computed, so that most evictions leave the window's keys where they are;
* the persistent batch writes new and re-added requests in their view
  (:mod:`vllm_sink.worker.input_batch`); its rows are ``view_width`` tokens wide
  because the worker's config says so (:mod:`vllm_sink.worker.cpu_worker`);
* ``min_tokens`` is counted over the whole stream (:mod:`vllm_sink.worker.min_tokens`);
* each layer's spec becomes a :class:`~vllm_sink.scheduler.kv_cache.StreamingSinkSpec`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.config import get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from vllm_sink.config import StreamingConfigError, policy_from_vllm_config
from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.core.stream_state import StreamState
from vllm_sink.core.stream_view import StreamView
from vllm_sink.scheduler.kv_cache import StreamingSinkSpec
from vllm_sink.worker.cpu_attn_layout import PagedKV, PageLayout
from vllm_sink.worker.eviction import EvictionPlan, apply_eviction_plan
from vllm_sink.worker.input_batch import StreamingInputBatch
from vllm_sink.worker.min_tokens import StreamMinTokens

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

logger = init_logger("vllm.vllm_sink")

SUPPORTED_BACKENDS = ("CPU_ATTN",)


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
        raise StreamingConfigError(
            f"vllm-sink needs a RoPE model whose attention modules keep `rotary_emb` "
            f"next to `attn`; found no rotary embedding for {missing[:3]}"
        )
    return found


class StreamingModelRunnerMixin:
    """Mixed in front of a V1 model runner class (see :mod:`vllm_sink.worker.cpu_worker`)."""

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
                raise StreamingConfigError(
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
                raise StreamingConfigError(
                    f"vllm-sink supports the {SUPPORTED_BACKENDS} attention backends; "
                    f"layer {name} uses {backend.get_name()}"
                )
            if layer.impl.alibi_slopes is not None:
                raise StreamingConfigError("vllm-sink does not support ALiBi models yet")
        rotary = find_rotary_modules(self.get_model(), set(layers))
        deltas = {id(m): RopeDeltas.from_rotary_module(m) for m in rotary.values()}
        self._streaming_ropes = {name: deltas[id(m)] for name, m in rotary.items()}
        rope_positions = min(len(d.cos) for d in deltas.values())
        self._rebase_period_blocks = self.streaming_policy.rebase_period_blocks(rope_positions)
        self._streams: dict[str, StreamState] = {}

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        policy = self.streaming_policy
        width = self.input_batch.token_ids_cpu.shape[1]
        if width != policy.view_width:
            raise RuntimeError(
                f"vllm-sink: the worker's token rows are {width} wide, not the cache's "
                f"{policy.view_width}: the runner was not built by StreamingCPUWorker"
            )
        self.input_batch.__class__ = StreamingInputBatch
        self.input_batch.streams = self._streams
        self.input_batch.sinks = policy.sinks
        self.input_batch.logitsprocs.non_argmax_invariant.append(
            StreamMinTokens(self._rows_below_min_tokens)
        )
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
        per_stream = policy.max_resident_blocks * spec.page_size_bytes * len(layers)
        logger.info(
            "vllm-sink: KV memory per stream at most %.1f MiB (%d blocks); the pool of %d "
            "blocks holds %d full-size streams at once; a stream's window keys are "
            "re-rotated once every %d evictions",
            per_stream / 2**20,
            policy.max_resident_blocks,
            kv_cache_config.num_blocks,
            (kv_cache_config.num_blocks - 1) // policy.max_resident_blocks,
            self._rebase_period_blocks,
        )

    # -------------------------------------------------------------- every step
    def _update_states(self, scheduler_output: SchedulerOutput):
        streams = self._streams
        for req_id in scheduler_output.finished_req_ids:
            streams.pop(req_id, None)
        for new_req in scheduler_output.scheduled_new_reqs:
            assert new_req.prompt_token_ids is not None, "streams take token prompts"
            stream = streams[new_req.req_id] = StreamState(len(new_req.prompt_token_ids))
            params = new_req.sampling_params
            if params is not None and params.min_tokens:
                stream.min_tokens = params.min_tokens
                stream.stop_token_ids = params.all_stop_token_ids
        # Evict before vLLM appends this step's new blocks to the rows: a row
        # then never holds more than the cache.
        moved = self._evict(scheduler_output.scheduled_cached_reqs)
        result = super()._update_states(scheduler_output)
        batch = self.input_batch
        for i, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
            computed = self.requests[req_id].num_computed_tokens
            batch.num_computed_tokens_cpu[i] = computed - streams[req_id].shift
        if moved and not batch.no_penalties:
            # Penalties read prompt tokens from the rows that moved.
            batch.sampling_metadata = batch._make_sampling_metadata()
        return result

    def _prepare_inputs(self, scheduler_output: SchedulerOutput, num_scheduled_tokens: np.ndarray):
        """vLLM's inputs, with each stream's RoPE offset added to its positions.

        Slot mapping and sequence lengths are computed from the view indices
        inside ``super()``; only the positions the model's RoPE reads move.
        """
        outputs = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        batch, policy, period = self.input_batch, self.streaming_policy, self._rebase_period_blocks
        offsets = np.fromiter(
            (policy.rope_offset(self._streams[r].shift, period) for r in batch.req_ids),
            dtype=np.int64,
            count=batch.num_reqs,
        )
        if offsets.any():
            total = scheduler_output.total_num_scheduled_tokens
            per_token = torch.from_numpy(np.repeat(offsets, num_scheduled_tokens))
            self.positions[:total] += per_token.to(self.positions.device)
        return outputs

    def _evict(self, cached: CachedRequestData) -> bool:
        """Carry out this step's evictions and move each stream's view along."""
        policy = self.streaming_policy
        plan = EvictionPlan(self._rebase_period_blocks)
        moved: list[tuple[str, int, int]] = []
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            if req_id in cached.resumed_req_ids:
                self._restart_view(req_id, cached.all_token_ids)
                continue
            stream = self._streams[req_id]
            shift = plan.add(policy, stream, self.requests[req_id].block_ids[0], computed)
            if shift != stream.shift:
                moved.append((req_id, stream.shift, shift))
        if plan:
            apply_eviction_plan(plan, self._streaming_layers, policy)
        for req_id, before, after in moved:
            self._streams[req_id].shift = after
            self._move_view(req_id, before)
        return bool(moved)

    def _restart_view(self, req_id: str, all_token_ids: Mapping[str, list[int]]) -> None:
        """A preempted stream recomputes its whole history into fresh blocks.

        Its kept output list lost the evicted outputs, so the history the
        scheduler resends becomes the worker's prompt for the recomputation.
        """
        history = all_token_ids.get(req_id)
        if history is None:
            raise RuntimeError(f"vllm-sink: no token history sent for resumed stream {req_id}")
        state = self.requests[req_id]
        self._streams[req_id].restart(len(history))
        state.prompt_token_ids = list(history)
        state.num_prompt_tokens = len(history)
        state.output_token_ids.clear()

    def _move_view(self, req_id: str, shift_before: int) -> None:
        """Drop the evicted blocks and tokens from the stream's state and batch row."""
        policy, batch, state = self.streaming_policy, self.input_batch, self.requests[req_id]
        view = self._view(req_id)
        before = dataclasses.replace(view, shift=shift_before)

        dropped_blocks = (view.shift - before.shift) // policy.block_size
        del state.block_ids[0][1 : 1 + dropped_blocks]
        newly_dropped = view.dropped_outputs - before.dropped_outputs
        first = view.first_droppable_output
        del state.output_token_ids[first : first + newly_dropped]
        state.num_prompt_tokens = view.resident_prompt_len

        i = batch.req_id_to_index.get(req_id)
        if i is None:
            return  # not in the batch: it is added back from ``state``
        blocks = batch.block_table[0]
        held_blocks = len(state.block_ids[0])
        blocks.block_table.np[i, :held_blocks] = state.block_ids[0]
        blocks.block_table.np[i, held_blocks : blocks.num_blocks_per_row[i]] = 0
        blocks.num_blocks_per_row[i] = held_blocks

        width = batch.token_ids_cpu.shape[1]
        held = min(view.resident_prompt_len + len(state.output_token_ids), width)
        tokens = view.tokens(state.prompt_token_ids, state.output_token_ids, view.sinks, held)
        batch.token_ids_cpu[i, view.sinks : held] = tokens
        batch.is_token_ids[i, :held] = True
        batch.num_prompt_tokens[i] = min(view.resident_prompt_len, width)
        batch.num_tokens_no_spec[i] = held

    def _view(self, req_id: str) -> StreamView:
        return self._streams[req_id].view(self.streaming_policy.sinks)

    def _rows_below_min_tokens(self) -> list[tuple[int, Collection[int]]]:
        """Batch rows whose stop tokens stay masked, with those tokens."""
        rows = []
        for req_id, stream in self._streams.items():
            if not stream.min_tokens:
                continue
            i = self.input_batch.req_id_to_index.get(req_id)
            if i is None:
                continue
            outputs = self.requests[req_id].output_token_ids
            if len(outputs) + self._view(req_id).dropped_outputs < stream.min_tokens:
                rows.append((i, stream.stop_token_ids))
            else:
                stream.min_tokens = 0
        return rows
