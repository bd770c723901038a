"""Worker side: evictions in the cache, and each stream kept in its compact view.

A mixin in front of vLLM's V1 model runner and its door
(:class:`~vllm_sink.worker.vllm_runner.V1RunnerDoor`, whose hooks it implements).
vLLM's scheduler counts a stream's tokens from its start; the runner keeps each
stream as its cache holds it (:mod:`vllm_sink.core.stream_view`): sinks, then the
resident window, renumbered without the evicted gap. vLLM's own input preparation
then gives every token its position in the cache, the kernel the compact block row
and the cached length, and every per-request buffer stays as small as the cache:

* before each step (before vLLM applies the scheduler's update, so that a
  row never holds more than the cache), the evictions the policy calls for
  are carried out in the KV cache (see :mod:`vllm_sink.worker.eviction`) and each
  stream's view moves on: block row, token row, computed count and the
  output tokens kept for penalties;
* each token's RoPE position is its index in the view plus the stream's
  offset (:meth:`SinkWindowPolicy.rope_offset`), added to the positions vLLM
  computed, so that most evictions leave the window's keys where they are;
* the persistent batch writes new and re-added requests in their view
  (:class:`~vllm_sink.worker.vllm_runner.StreamingInputBatch`); its rows are
  ``view_width`` tokens wide because the worker's config says so
  (:func:`~vllm_sink.worker.streaming_worker.worker_config`);
* ``min_tokens`` is counted over the whole stream (:mod:`vllm_sink.worker.streams`);
* a request may continue a finished stream (a snapshot, see :meth:`_resume`;
  the step's snapshot ops run first, :mod:`vllm_sink.worker.snapshot_vault`),
  and a streaming-input session (vLLM's ``StreamingInput``) is one stream
  across its inputs: its state stays here while it waits for the next one;
* at start-up, the KV specs, the model and the cache are checked and set up
  (:mod:`vllm_sink.worker.startup`): a stream has one block row per KV cache
  group, all in the same compact layout.

Each stream's state is one :class:`~vllm_sink.core.stream_state.StreamState`,
held by :class:`~vllm_sink.worker.streams.WorkerStreams`; everything read or
written in vLLM's runner, batch and request objects, and every step's update
from the scheduler, goes through :mod:`vllm_sink.worker.vllm_runner`, the one
module a runner of another kind (vLLM's V2 runner) would replace.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.kv_cache_interface import KVCacheSpec

from vllm_sink.config import streaming_policy
from vllm_sink.core.policy import SinkWindowPolicy
from vllm_sink.core.stream_state import StreamState
from vllm_sink.metrics import StreamingBoard, engine_key, open_board
from vllm_sink.worker import startup
from vllm_sink.worker import vllm_runner as runner_api
from vllm_sink.worker.eviction import EvictionPlan, apply_eviction_plan, sink_keys_at_offset_zero
from vllm_sink.worker.kv_pages import KVPages
from vllm_sink.worker.min_tokens import StreamMinTokens
from vllm_sink.worker.snapshot_vault import SnapshotVault
from vllm_sink.worker.streams import WorkerStreams
from vllm_sink.worker.vllm_runner import Rows, ScheduledRequest, StepUpdate

Resumed = list[tuple[str, Rows, int]]
"""New requests that continue a stream: id, block rows, computed tokens."""


class _Update(NamedTuple):
    """What :meth:`StreamingModelRunnerMixin.before_update` leaves for ``after_update``."""

    resumed: Resumed
    moved: bool


class StreamingModelRunnerMixin:
    """Mixed in front of the V1 runner door (see :mod:`vllm_sink.worker.cpu_worker`)."""

    # ------------------------------------------------------------ set-up hooks
    @functools.cached_property
    def sink_policy(self) -> SinkWindowPolicy:
        return streaming_policy(self.vllm_config)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        hybrid = not self.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
        return startup.streaming_specs(super().get_kv_cache_spec(), self.sink_policy, hybrid)

    def check_room_for_a_stream(self, available_bytes: int) -> None:
        specs = self.get_kv_cache_spec()
        needed = sum(spec.max_memory_usage_bytes(self.vllm_config) for spec in specs.values())
        startup.check_room_for_a_stream(
            needed, available_bytes, self.sink_policy, len(specs), self.device.type
        )

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        layers = get_layers_from_vllm_config(self.vllm_config, Attention)
        self._rotary_modules = startup.check_model(layers, self.get_model(), self.device.type)
        self._streaming_ropes = startup.rope_tables(self._rotary_modules, self.device)
        rope_positions = min(len(d.cos) for d in self._streaming_ropes.values())
        self._rebase_period_blocks = self.sink_policy.rebase_period_blocks(rope_positions)
        self._streams = WorkerStreams(self.sink_policy.sinks)

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        policy = self.sink_policy
        width = runner_api.token_row_width(self)
        if width != policy.view_width:
            raise RuntimeError(
                f"vllm-sink: the worker's token rows are {width} wide, not the cache's "
                f"{policy.view_width}: the runner was not built by a streaming worker"
            )
        self._snapshots = SnapshotVault(
            KVPages(runner_api.kv_caches(self), kv_cache_config.num_blocks),
            rank=runner_api.tensor_parallel_rank(),
        )
        runner_api.adopt_input_batch(self, lambda req_id: self._streams[req_id].view(policy.sinks))
        runner_api.add_logits_processor(
            self, StreamMinTokens(lambda: self._streams.rows_below_min_tokens(self._row_of))
        )
        self._figures_board: StreamingBoard | None | bool = False
        """Where the worker's snapshot figures go (``False``: not looked for yet)."""
        self._published_figures: dict[str, int] = {}
        layers = get_layers_from_vllm_config(self.vllm_config, Attention)
        self._layer_groups = startup.layer_groups(
            kv_cache_config, layers, self._streaming_ropes, self._rotary_modules
        )
        (self._sink_group,) = (
            i for i, group in enumerate(self._layer_groups) if group.sliding_window is None
        )
        startup.log_kv_memory(
            kv_cache_config, self._layer_groups, policy, self._rebase_period_blocks
        )

    # -------------------------------------------------------------- every step
    def before_update(self, step: StepUpdate) -> _Update:
        """Finished streams kept or dropped, snapshot ops run, new requests admitted (a
        continued stream's rows compacted) and this step's evictions carried out."""
        streams = self._streams
        for req_id, stream in streams.finish(step.finished):
            self._snapshots.finished(req_id, stream)
        # Before anything reads or writes the blocks these ops copy.
        self._snapshots.apply(step.snapshot_ops, streams.by_id)
        self._publish_snapshot_figures()
        resumed: Resumed = []
        for new in step.added:
            stream, session = streams.admit(new.req_id, new.prompt_len, new.params)
            source = None if session else runner_api.resumed_from(new)
            if session or source is not None:
                if source is not None:
                    self._resume(stream, new.block_rows, *source)
                else:
                    evicted = stream.shift // self.sink_policy.block_size
                    runner_api.drop_evicted_blocks(new.block_rows, evicted)
                resumed.append((new.req_id, new.block_rows, new.computed))
        # Evict before vLLM appends this step's new blocks to the rows: a row
        # then never holds more than the cache.
        return _Update(resumed, self._evict(step.scheduled, resumed))

    def after_update(self, pending: _Update) -> None:
        """vLLM's state and batch rows, which its update wrote from the scheduler's
        absolute counts, put back in each stream's view."""
        streams = self._streams
        for req_id, _, _ in pending.resumed:
            runner_api.project_prompt_count(
                self, req_id, streams[req_id].view(self.sink_policy.sinks)
            )
        runner_api.project_computed_counts(self, streams.by_id)
        if pending.moved:
            # Penalties read prompt tokens from the rows that moved.
            runner_api.refresh_penalty_inputs(self)

    def _publish_snapshot_figures(self) -> None:
        """The worker's snapshot figures on the engine's board (the first worker's), as they
        change (files are written in the background)."""
        figures = self._snapshots.figures
        if figures == self._published_figures:
            return
        self._published_figures = dict(figures)
        if self._figures_board is False:
            config = self.vllm_config
            engine = engine_key(config.instance_id, runner_api.data_parallel_rank(config))
            first = self._snapshots.rank == 0
            self._figures_board = open_board(engine) if first else None
        if self._figures_board is not None:
            self._figures_board.publish(figures)

    def _resume(self, stream: StreamState, rows: Rows, snapshot_id: str, shift: int) -> None:
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

    def rope_offsets(self, req_ids: list[str]) -> np.ndarray:
        """Each row's stream's RoPE offset: its positions are its view indices plus this."""
        policy, period = self.sink_policy, self._rebase_period_blocks
        return np.fromiter(
            (policy.rope_offset(self._streams[r].shift, period) for r in req_ids),
            dtype=np.int64,
            count=len(req_ids),
        )

    def _evict(self, scheduled: list[ScheduledRequest], resumed: Resumed) -> bool:
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

        def plan_eviction(stream: StreamState, rows: Rows, computed: int) -> int:
            shifts = {plan.add(policy, stream, row, computed) for plan, row in zip(plans, rows)}
            (shift,) = shifts  # the same in every group
            return shift

        moved: list[tuple[str, int]] = []
        for request in scheduled:
            req_id = request.req_id
            if request.restarted:
                self._restart_view(req_id, request.history)
                continue
            stream = self._streams[req_id]
            shift = plan_eviction(stream, runner_api.block_rows(self, req_id), request.computed)
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

    def _restart_view(self, req_id: str, history: list[int] | None) -> None:
        """A preempted stream recomputes its whole history into fresh blocks.

        Its kept output list lost the evicted outputs, so the history the
        scheduler resends becomes the worker's prompt for the recomputation.
        """
        if history is None:
            raise RuntimeError(f"vllm-sink: no token history sent for resumed stream {req_id}")
        self._streams[req_id].restart(len(history))
        runner_api.restart_request(self, req_id, history)

    def _row_of(self, req_id: str) -> tuple[int, int] | None:
        """A request's batch row and how many outputs vLLM kept for it."""
        row = runner_api.batch_row(self, req_id)
        if row is None:
            return None
        return row, runner_api.kept_output_count(self, req_id)
