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
  because the worker's config says so
  (:func:`~vllm_sink.worker.streaming_worker.worker_config`);
* ``min_tokens`` is counted over the whole stream (:mod:`vllm_sink.worker.min_tokens`);
* a request may continue a finished stream (a snapshot, see :meth:`_resume`;
  the step's snapshot ops run first, :mod:`vllm_sink.worker.snapshot_vault`),
  and a streaming-input session (vLLM's ``StreamingInput``) is one stream
  across its inputs: its state stays here while it waits for the next one;
* each full-attention layer's spec becomes a
  :class:`~vllm_sink.scheduler.kv_cache.StreamingSinkSpec`, each sliding-window
  layer's of a hybrid model a :class:`~vllm_sink.scheduler.kv_cache.StreamingSlidingSpec`:
  a stream has one block row per KV cache group, all in the same compact layout.

Each stream's state is one :class:`~vllm_sink.core.stream_state.StreamState`;
everything read or written in vLLM's runner, batch and request objects goes
through :mod:`vllm_sink.worker.vllm_runner`.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.config import get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec

from vllm_sink.config import StreamingConfigError, streaming_policy
from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.core.stream_state import StreamState
from vllm_sink.frontend.platforms import check_attention_backend
from vllm_sink.metrics import StreamingBoard, engine_key, open_board
from vllm_sink.scheduler.kv_cache import StreamingSinkSpec, StreamingSlidingSpec
from vllm_sink.worker import vllm_runner as runner_api
from vllm_sink.worker.cpu_attn_layout import PagedKV, PageLayout
from vllm_sink.worker.eviction import (
    EvictionPlan,
    LayerGroup,
    apply_eviction_plan,
    sink_keys_at_offset_zero,
)
from vllm_sink.worker.gpu_kv_layout import KernelBlockKV
from vllm_sink.worker.input_batch import StreamingInputBatch
from vllm_sink.worker.kv_pages import KVPages
from vllm_sink.worker.min_tokens import StreamMinTokens
from vllm_sink.worker.self_check import CacheCheckError, check_eviction_in_cache
from vllm_sink.worker.snapshot_vault import SnapshotVault

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

logger = init_logger("vllm.vllm_sink")


cpu_attn_layout = functools.cache(PageLayout.probe_cpu_attn)
"""The CPU_ATTN page layout of one (block size, head size, dtype, ISA): probed once."""


def layer_kv(layer: Attention, block_size: int) -> tuple[PagedKV | KernelBlockKV, ...]:
    """A layer's keys and values, read and written as its attention backend lays them out."""
    cache = layer.kv_cache
    if layer.get_attn_backend().get_name() == "CPU_ATTN":
        layout = cpu_attn_layout(block_size, layer.head_size, cache.dtype, layer.isa)
        return PagedKV.keys_of(cache, layout), PagedKV.values_of(cache, layout)
    return (
        KernelBlockKV.keys_of(cache, layer.head_size, block_size),
        KernelBlockKV.values_of(cache, layer.head_size, block_size),
    )


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
    def sink_policy(self) -> SinkWindowPolicy:
        return streaming_policy(self.vllm_config)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        """Every layer streams under one policy.

        A sliding-window layer (Gemma 3's local layers) attends only its own
        window: its attention masks by distance within the stream's view,
        where the window's tokens are contiguous. The streaming window must
        hold that whole window (checked at start-up), so the sinks stay out of
        it. Beside full-attention layers, sliding-window layers get their own
        KV cache groups, which hold only that window (vLLM's hybrid KV cache
        manager); where that manager is off, or full-attention layers
        outnumber them (vLLM would split the full-attention layers over
        several groups), they are kept like full-attention layers.
        """
        specs = super().get_kv_cache_spec()
        policy = self.sink_policy
        windows = {name: getattr(spec, "sliding_window", None) for name, spec in specs.items()}
        num_sliding = sum(window is not None for window in windows.values())
        hybrid = (
            not self.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
            and 0 < len(specs) - num_sliding <= num_sliding
        )
        converted: dict[str, KVCacheSpec] = {}
        for name, spec in specs.items():
            window = windows[name]
            supported = (
                type(spec) in (FullAttentionSpec, SlidingWindowSpec)
                and not getattr(spec, "attention_chunk_size", None)
                and (window is None or window <= policy.window)
            )
            if not supported:
                raise StreamingConfigError(
                    f"vllm-sink streams full-attention layers and sliding-window layers whose "
                    f"window fits the streaming window ({policy.window}); layer {name} has "
                    f"{type(spec).__name__}"
                    + (f" with sliding_window={window}" if window is not None else "")
                )
            if hybrid and isinstance(spec, SlidingWindowSpec):
                converted[name] = StreamingSlidingSpec.from_attention(spec, policy)
            else:
                converted[name] = StreamingSinkSpec.from_attention(spec, policy)
        return converted

    def check_room_for_a_stream(self, available_bytes: int) -> None:
        """Refuse a KV cache that cannot hold one whole stream, saying what to change.

        vLLM's own check asks for room for ``max_model_len`` tokens and, short of
        it, says to lower ``max_model_len``: for streams that is the length
        limit, not what the cache holds.
        """
        specs = self.get_kv_cache_spec()
        needed = sum(spec.max_memory_usage_bytes(self.vllm_config) for spec in specs.values())
        if needed <= available_bytes:
            return
        policy = self.sink_policy
        more_memory = (
            "VLLM_CPU_KVCACHE_SPACE" if self.device.type == "cpu" else "--gpu-memory-utilization"
        )
        raise StreamingConfigError(
            f"vllm-sink: one stream needs {needed / 2**20:.1f} MiB of KV cache ({policy.sinks} "
            f"sinks + a {policy.window}-token window, a block to decode into and a "
            f"{policy.max_chunk_tokens}-token prefill chunk, in {len(specs)} layers), and the "
            f"KV cache has {available_bytes / 2**20:.1f} MiB: raise {more_memory} or "
            "--kv-cache-memory-bytes, or lower --streaming-window or --max-num-batched-tokens"
        )

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        layers = get_layers_from_vllm_config(self.vllm_config, Attention)
        for name, layer in layers.items():
            check_attention_backend(self.device.type, layer.get_attn_backend().get_name(), name)
            if layer.impl.alibi_slopes is not None:
                raise StreamingConfigError("vllm-sink does not support ALiBi models yet")
        rotary = find_rotary_modules(self.get_model(), set(layers))
        self._rotary_modules = rotary
        deltas = {id(m): RopeDeltas.from_rotary_module(m).to(self.device) for m in rotary.values()}
        self._streaming_ropes = {name: deltas[id(m)] for name, m in rotary.items()}
        rope_positions = min(len(d.cos) for d in deltas.values())
        self._rebase_period_blocks = self.sink_policy.rebase_period_blocks(rope_positions)
        self._streams: dict[str, StreamState] = {}
        self._awaiting_min_tokens: set[str] = set()
        """Streams whose ``min_tokens`` is not reached yet."""

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        policy = self.sink_policy
        width = runner_api.token_row_width(self)
        if width != policy.view_width:
            raise RuntimeError(
                f"vllm-sink: the worker's token rows are {width} wide, not the cache's "
                f"{policy.view_width}: the runner was not built by a streaming worker"
            )
        runner_api.adopt_input_batch(
            self, StreamingInputBatch, streams=self._streams, sinks=policy.sinks
        )
        runner_api.add_logits_processor(self, StreamMinTokens(self._rows_below_min_tokens))
        self._snapshots = SnapshotVault(
            KVPages(runner_api.kv_caches(self), kv_cache_config.num_blocks),
            rank=runner_api.tensor_parallel_rank(),
        )
        self._figures_board: StreamingBoard | None | bool = False
        """Where the worker's snapshot figures go (``False``: not looked for yet)."""
        self._published_figures: dict[str, int] = {}
        layers = get_layers_from_vllm_config(self.vllm_config, Attention)
        self._layer_groups: list[LayerGroup] = []
        for group in kv_cache_config.kv_cache_groups:
            spec = group.kv_cache_spec
            kv = [
                (*layer_kv(layers[name], spec.block_size), self._streaming_ropes[name])
                for name in group.layer_names
            ]
            sliding = spec.sliding_window if isinstance(spec, StreamingSlidingSpec) else None
            self._layer_groups.append(LayerGroup(kv, sliding))
            name = group.layer_names[0]
            try:  # any block: none holds a stream yet
                check_eviction_in_cache(
                    layers[name], self._rotary_modules[name], *kv[0], 1, spec.block_size
                )
            except CacheCheckError as error:
                raise StreamingConfigError(
                    f"vllm-sink's start-up check of layer {name}'s KV cache "
                    f"({layers[name].get_attn_backend().get_name()}) failed: {error}; "
                    "streaming would give wrong text with this backend or model"
                ) from error
        (self._sink_group,) = (
            i for i, group in enumerate(self._layer_groups) if group.sliding_window is None
        )
        blocks = [group.max_resident_blocks(policy) for group in self._layer_groups]
        page_bytes = kv_cache_config.kv_cache_groups[0].kv_cache_spec.page_size_bytes
        per_stream = sum(
            n * page_bytes * len(group.layers) for n, group in zip(blocks, self._layer_groups)
        )
        logger.info(
            "vllm-sink: KV memory per stream at most %.1f MiB (%d blocks in %d KV cache "
            "group(s)); the pool of %d blocks holds %d full-size streams at once; a stream's "
            "window keys are re-rotated once every %d evictions",
            per_stream / 2**20,
            sum(blocks),
            len(blocks),
            kv_cache_config.num_blocks,
            (kv_cache_config.num_blocks - 1) // sum(blocks),
            self._rebase_period_blocks,
        )

    # -------------------------------------------------------------- every step
    def _update_states(self, scheduler_output: SchedulerOutput):
        streams = self._streams
        for req_id in scheduler_output.finished_req_ids:
            stream = streams.pop(req_id, None)
            if stream is not None:
                self._snapshots.finished(req_id, stream)
        # Before anything reads or writes the blocks these ops copy.
        self._snapshots.apply(runner_api.snapshot_ops(scheduler_output), streams)
        self._publish_snapshot_figures()
        resumed: list[tuple[str, runner_api.Rows, int]] = []
        for new_req in scheduler_output.scheduled_new_reqs:
            assert new_req.prompt_token_ids is not None, "streams take token prompts"
            req_id, prompt_len = new_req.req_id, len(new_req.prompt_token_ids)
            stream = streams.get(req_id)
            session = stream is not None  # a streaming-input session's next input
            if session:
                stream.next_input(prompt_len)
            else:
                stream = streams[req_id] = StreamState(prompt_len)
            params = new_req.sampling_params
            if params is not None and params.min_tokens:
                stream.min_tokens = params.min_tokens
                stream.stop_token_ids = params.all_stop_token_ids
                self._awaiting_min_tokens.add(req_id)
            source = None if session else runner_api.resumed_from(new_req)
            if session or source is not None:
                rows = runner_api.new_block_rows(new_req)
                if source is not None:
                    self._resume(stream, rows, *source)
                else:
                    evicted = stream.shift // self.sink_policy.block_size
                    runner_api.drop_evicted_blocks(rows, evicted)
                resumed.append((req_id, rows, new_req.num_computed_tokens))
        # Evict before vLLM appends this step's new blocks to the rows: a row
        # then never holds more than the cache.
        moved = self._evict(scheduler_output.scheduled_cached_reqs, resumed)
        result = super()._update_states(scheduler_output)
        for req_id, _, _ in resumed:
            runner_api.project_prompt_count(
                self, req_id, streams[req_id].view(self.sink_policy.sinks)
            )
        runner_api.project_computed_counts(self, streams)
        if moved:
            # Penalties read prompt tokens from the rows that moved.
            runner_api.refresh_penalty_inputs(self)
        return result

    def _publish_snapshot_figures(self) -> None:
        """The worker's snapshot figures on the engine's board (the first worker's), as they
        change (files are written in the background)."""
        figures = self._snapshots.figures
        if figures == self._published_figures:
            return
        self._published_figures = dict(figures)
        if self._figures_board is False:
            config = self.vllm_config
            engine = engine_key(config.instance_id, config.parallel_config.data_parallel_index)
            first = self._snapshots.rank == 0
            self._figures_board = open_board(engine) if first else None
        if self._figures_board is not None:
            self._figures_board.publish(figures)

    def _resume(
        self, stream: StreamState, rows: runner_api.Rows, snapshot_id: str, shift: int
    ) -> None:
        """Give a new request the state of the stream it continues (the scheduler's snapshot).

        ``rows`` are the request's block rows as the scheduler holds them (this
        step's ops copied the snapshot into them), null placeholders where
        blocks were freed; they are compacted into the view.
        """
        policy = self.sink_policy
        stream.shift = shift
        runner_api.drop_evicted_blocks(rows, shift // policy.block_size)
        stream.first_sink_keys = self._snapshots.first_sink_keys(snapshot_id)
        if stream.first_sink_keys is None and shift and policy.sinks:
            # Not held here (the worker never saw the stream end): rotate them back.
            offset = policy.rope_offset(shift, self._rebase_period_blocks)
            sink_group = self._sink_group
            stream.first_sink_keys = sink_keys_at_offset_zero(
                self._layer_groups[sink_group].layers, rows[sink_group][0], policy.sinks, offset
            )

    def _prepare_inputs(self, scheduler_output: SchedulerOutput, num_scheduled_tokens: np.ndarray):
        """vLLM's inputs, with each stream's RoPE offset added to its positions.

        Slot mapping and sequence lengths are computed from the view indices
        inside ``super()``; only the positions the model's RoPE reads move.
        """
        outputs = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        policy, period = self.sink_policy, self._rebase_period_blocks
        req_ids = runner_api.batch_req_ids(self)
        offsets = np.fromiter(
            (policy.rope_offset(self._streams[r].shift, period) for r in req_ids),
            dtype=np.int64,
            count=len(req_ids),
        )
        if offsets.any():
            runner_api.add_to_positions(self, offsets, num_scheduled_tokens)
        return outputs

    def _evict(
        self, cached: CachedRequestData, resumed: list[tuple[str, runner_api.Rows, int]]
    ) -> bool:
        """Carry out this step's evictions and move each stream's view along.

        ``resumed``: new requests that continue a cached stream, a snapshot or
        a streaming-input session's next input (id, block rows, computed
        tokens), not yet in the batch; their rows are compacted here.
        """
        policy = self.sink_policy
        plans = [
            EvictionPlan(self._rebase_period_blocks, group.sliding_window)
            for group in self._layer_groups
        ]

        def plan_eviction(stream: StreamState, rows: runner_api.Rows, computed: int) -> int:
            shifts = {plan.add(policy, stream, row, computed) for plan, row in zip(plans, rows)}
            (shift,) = shifts  # the same in every group
            return shift

        moved: list[tuple[str, int]] = []
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            if req_id in cached.resumed_req_ids:
                self._restart_view(req_id, cached.all_token_ids)
                continue
            stream = self._streams[req_id]
            shift = plan_eviction(stream, runner_api.block_rows(self, req_id), computed)
            if shift != stream.shift:
                moved.append((req_id, shift))
        resumed_shifts = [plan_eviction(self._streams[r], rows, n) for r, rows, n in resumed]
        for plan, group in zip(plans, self._layer_groups):
            if plan:
                apply_eviction_plan(plan, group.layers, policy)
        for (req_id, rows, _), shift in zip(resumed, resumed_shifts):
            stream = self._streams[req_id]
            runner_api.drop_evicted_blocks(rows, (shift - stream.shift) // policy.block_size)
            stream.shift = shift
        for req_id, shift in moved:
            stream = self._streams[req_id]
            before = stream.view(policy.sinks)
            stream.shift = shift
            view = stream.view(policy.sinks)
            runner_api.project_view_move(self, req_id, before, view, policy.block_size)
        return bool(moved)

    def _restart_view(self, req_id: str, all_token_ids: Mapping[str, list[int]]) -> None:
        """A preempted stream recomputes its whole history into fresh blocks.

        Its kept output list lost the evicted outputs, so the history the
        scheduler resends becomes the worker's prompt for the recomputation.
        """
        history = all_token_ids.get(req_id)
        if history is None:
            raise RuntimeError(f"vllm-sink: no token history sent for resumed stream {req_id}")
        self._streams[req_id].restart(len(history))
        runner_api.restart_request(self, req_id, history)

    def _rows_below_min_tokens(self) -> list[tuple[int, Collection[int]]]:
        """Batch rows whose stop tokens stay masked, with those tokens."""
        rows = []
        for req_id in list(self._awaiting_min_tokens):
            stream = self._streams.get(req_id)
            if stream is None:
                self._awaiting_min_tokens.discard(req_id)
                continue
            i = runner_api.batch_row(self, req_id)
            if i is None:
                continue
            kept = len(runner_api.request_state(self, req_id).output_token_ids)
            if kept + stream.view(self.sink_policy.sinks).dropped_outputs < stream.min_tokens:
                rows.append((i, stream.stop_token_ids))
            else:
                stream.min_tokens = 0
                self._awaiting_min_tokens.discard(req_id)
        return rows
