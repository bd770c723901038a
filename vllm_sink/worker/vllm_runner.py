"""The worker side's one door into vLLM: its V1 model runner, batch, request state and workers.

Everything the streaming worker reads, writes or overrides of vLLM's internals
goes through here: the runner's private per-step methods are overridden by
:class:`V1RunnerDoor`, which hands the streaming runner what the scheduler sent
(:class:`StepUpdate`) and calls its hooks; the persistent batch is re-classed
as :class:`StreamingInputBatch`; the runner classes and the GPU worker's
factory are reached through :func:`v1_runner_class` and
:class:`V1GPUWorkerDoor`; and the functions below read and write
``GPUModelRunner`` (which ``CPUModelRunner`` subclasses), its ``InputBatch``,
its ``CachedRequestState`` objects, the model's rotary modules and the
attention backends' cache writes. Every name they use is listed in
:mod:`vllm_sink.vllm_internals` and checked by ``tests/test_vllm_contract.py``.
Porting to another runner (vLLM's V2 runner) means writing this file's sibling.

It is also the one place where a stream's compact view
(:class:`~vllm_sink.core.stream_view.StreamView`) is projected into vLLM's
objects: :func:`compact_request` for a row the batch (re)adds,
:func:`drop_evicted_blocks` and :func:`project_prompt_count` for a request
that continues a snapshot,
:func:`project_computed_counts` after each scheduler update, and
:func:`project_view_move` when an eviction moves a stream's view.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from vllm_sink.core.rerotation import RopeDeltas
from vllm_sink.core.snapshot_ops import OPS_ATTRIBUTE, SnapshotOp
from vllm_sink.core.snapshots import resume_source
from vllm_sink.core.stream_view import StreamView

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import SchedulerOutput

    from vllm_sink.core.stream_state import StreamState

Runner = Any
"""A ``GPUModelRunner`` (or ``CPUModelRunner``) instance."""

Rows = tuple[list[int], ...]
"""A request's block ids, one row per KV cache group (vLLM's ``block_ids``)."""


# ------------------------------------------------- what the scheduler sent
@dataclass(frozen=True)
class NewRequest:
    """A request the scheduler adds to the runner this step."""

    req_id: str
    prompt_len: int
    params: SamplingParams | None
    block_rows: Rows
    """vLLM's own lists, which its runner will hold: compacting them compacts the runner's."""
    computed: int
    """Tokens the scheduler counts as computed (a snapshot's, for a request continuing one)."""


@dataclass(frozen=True)
class ScheduledRequest:
    """A request the runner already holds, scheduled again this step."""

    req_id: str
    computed: int
    """Tokens computed, counted from the stream's start."""
    restarted: bool
    """Preempted, and now recomputing its whole history."""
    history: list[int] | None
    """A restarted request's whole history, as the scheduler resent it."""


@dataclass(frozen=True)
class StepUpdate:
    """What one step's scheduler output tells the streaming runner, before vLLM applies it."""

    finished: Collection[str]
    snapshot_ops: list[SnapshotOp]
    """Sent by the streaming scheduler with vLLM's output."""
    added: list[NewRequest]
    scheduled: list[ScheduledRequest]


def read_step(scheduler_output: SchedulerOutput) -> StepUpdate:
    cached = scheduler_output.scheduled_cached_reqs
    added = []
    for new_req in scheduler_output.scheduled_new_reqs:
        assert new_req.prompt_token_ids is not None, "streams take token prompts"
        added.append(
            NewRequest(
                new_req.req_id,
                len(new_req.prompt_token_ids),
                new_req.sampling_params,
                new_req.block_ids,
                new_req.num_computed_tokens,
            )
        )
    scheduled = []
    for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
        restarted = req_id in cached.resumed_req_ids
        history = cached.all_token_ids.get(req_id) if restarted else None
        scheduled.append(ScheduledRequest(req_id, computed, restarted, history))
    return StepUpdate(
        scheduler_output.finished_req_ids,
        getattr(scheduler_output, OPS_ATTRIBUTE, None) or [],
        added,
        scheduled,
    )


def resumed_from(request: NewRequest) -> tuple[str, int] | None:
    """``(snapshot id, the stream's shift)`` of a request continuing a snapshot.

    Set by the scheduler (:data:`vllm_sink.core.snapshots.RESUME_KEY`).
    """
    if not request.computed:
        return None
    return resume_source(request.params)


# ------------------------------------------------------- the runner's steps
class V1RunnerDoor:
    """Mixed in right in front of vLLM's V1 runner class: its private per-step methods.

    Each override runs vLLM's own and calls a hook around it; the streaming
    mixins in front of this one implement the hooks (the defaults here leave
    vLLM's behaviour as it is).
    """

    def _update_states(self, scheduler_output: SchedulerOutput):
        pending = self.before_update(read_step(scheduler_output))
        result = super()._update_states(scheduler_output)
        self.after_update(pending)
        return result

    def _prepare_inputs(self, scheduler_output: SchedulerOutput, num_scheduled_tokens: np.ndarray):
        """vLLM's inputs, with :meth:`rope_offsets` added to each row's positions.

        Slot mapping and sequence lengths are computed inside ``super()``; only
        the positions the model's RoPE reads move.
        """
        outputs = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        offsets = self.rope_offsets(batch_req_ids(self))
        if offsets.any():
            add_to_positions(self, offsets, num_scheduled_tokens)
        return outputs

    def _sample(self, *args, **kwargs):
        self.save_discarded_generators()
        return super()._sample(*args, **kwargs)

    def _bookkeeping_sync(self, *args, **kwargs):
        with self.generators_kept_from_rewind():
            return super()._bookkeeping_sync(*args, **kwargs)

    # ------------------------------------------------------------ the hooks
    def before_update(self, step: StepUpdate) -> Any:
        """Before vLLM applies the step's update to its requests and batch; the result is
        passed to :meth:`after_update`."""

    def after_update(self, pending: Any) -> None:
        """After vLLM applied the step's update."""

    def rope_offsets(self, req_ids: list[str]) -> np.ndarray:
        """What to add to the RoPE positions of each batch row's tokens this step."""
        return np.zeros(len(req_ids), dtype=np.int64)

    def save_discarded_generators(self) -> None:
        """Before sampling (:func:`discarded_rows` are known)."""

    def generators_kept_from_rewind(self) -> AbstractContextManager[None]:
        """Around vLLM's bookkeeping after sampling, which rewinds the generators of
        discarded rows."""
        return contextlib.nullcontext()


# -------------------------------------------------------- the persistent batch
class StreamingInputBatch(InputBatch):
    """``InputBatch`` whose rows are streams' compact views.

    vLLM's ``InputBatch.add_request`` copies a request's whole history (prompt
    and outputs) into a token row as wide as ``max_model_len``. A stream's
    history is unbounded, so the streaming runner's rows are only as wide as
    the cache (:attr:`~vllm_sink.core.policy.SinkWindowPolicy.view_width`) and
    this batch writes what the view holds (:func:`compact_request`). The runner
    re-classes vLLM's instance (its constructor takes a dozen version-specific
    arguments, :func:`adopt_input_batch`); nothing else differs.
    """

    view_of: Callable[[str], StreamView]
    """Each stream's view, by request id (the runner's)."""

    def add_request(self, request: CachedRequestState) -> int:
        assert request.prompt_token_ids is not None, "streams take token prompts"
        view = self.view_of(request.req_id)
        return super().add_request(compact_request(request, view, self.token_ids_cpu.shape[1]))


# --------------------------------------------------------------- the workers
def v1_runner_class(device: str) -> type:
    """vLLM's V1 model runner class for ``device`` (``"cpu"`` or ``"cuda"``).

    Imported when asked for: each worker imports only its own platform's runner.
    """
    if device == "cpu":
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        return CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


class V1GPUWorkerDoor:
    """Mixed in front of vLLM's GPU ``Worker``, which builds its runner in
    ``_make_model_runner``: this one builds :meth:`build_model_runner`'s."""

    def _make_model_runner(self):
        return self.build_model_runner()

    def build_model_runner(self) -> Runner:
        raise NotImplementedError


def uses_v2_runner(worker: Any) -> bool:
    """Whether vLLM would build its V2 model runner for ``worker``."""
    return worker.use_v2_model_runner


def data_parallel_rank(vllm_config: VllmConfig) -> int:
    """The engine's DP rank, which a non-MoE DP engine keeps only here."""
    return vllm_config.parallel_config.data_parallel_index


# ------------------------------------------------------------------ reads
def kept_output_count(runner: Runner, req_id: str) -> int:
    """How many of the request's outputs vLLM's state keeps (the resident ones)."""
    return len(runner.requests[req_id].output_token_ids)


def block_rows(runner: Runner, req_id: str) -> Rows:
    """The request's block rows, as the runner holds them."""
    return runner.requests[req_id].block_ids


def batch_req_ids(runner: Runner) -> list[str]:
    """The requests in the persistent batch, in row order."""
    batch = runner.input_batch
    return list(batch.req_ids[: batch.num_reqs])


def batch_row(runner: Runner, req_id: str) -> int | None:
    return runner.input_batch.req_id_to_index.get(req_id)


def token_row_width(runner: Runner) -> int:
    return runner.input_batch.token_ids_cpu.shape[1]


def seeded_generators(runner: Runner) -> dict[int, torch.Generator]:
    """Batch row -> the request's own generator, for requests that set ``seed``."""
    return runner.input_batch.generators


def discarded_rows(runner: Runner) -> list[int]:
    """Batch rows whose sample this step is dropped (prefill chunks that are not the last).

    Valid between ``_prepare_inputs`` (which fills the mask) and the end of the step.
    """
    num_reqs = runner.input_batch.num_reqs
    return [int(i) for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]]


def kv_caches(runner: Runner) -> list[torch.Tensor]:
    """Every layer's KV cache tensor (layers may share one)."""
    return runner.kv_caches


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


# ----------------------------------------------------------------- writes
def adopt_input_batch(runner: Runner, view_of: Callable[[str], StreamView]) -> None:
    """Re-class the runner's persistent batch as a :class:`StreamingInputBatch` (vLLM's
    constructor is version-specific) that writes each stream's ``view_of(req_id)``."""
    batch = runner.input_batch
    batch.__class__ = StreamingInputBatch
    batch.view_of = view_of


def add_logits_processor(runner: Runner, processor: Any) -> None:
    """Apply ``processor`` after vLLM's own, where it applies non-argmax-invariant ones."""
    runner.input_batch.logitsprocs.non_argmax_invariant.append(processor)


def add_to_positions(runner: Runner, per_request: np.ndarray, scheduled: np.ndarray) -> None:
    """Add ``per_request[i]`` to the positions of every token row ``i`` schedules this step.

    Valid right after vLLM's ``_prepare_inputs`` filled ``runner.positions``
    (:meth:`V1RunnerDoor._prepare_inputs`).
    """
    total = int(scheduled.sum())
    per_token = torch.from_numpy(np.repeat(per_request, scheduled))
    runner.positions[:total] += per_token.to(runner.positions.device)


def refresh_penalty_inputs(runner: Runner) -> None:
    """Rebuild the sampling metadata, whose penalties read the batch's token rows."""
    batch = runner.input_batch
    if not batch.no_penalties:
        batch.sampling_metadata = batch._make_sampling_metadata()


def restart_request(runner: Runner, req_id: str, history: list[int]) -> None:
    """Make a preempted request's whole history its prompt, with no outputs kept."""
    state = runner.requests[req_id]
    state.prompt_token_ids = list(history)
    state.num_prompt_tokens = len(history)
    state.output_token_ids.clear()


# ------------------------------------------------- the view, projected
def compact_request(
    request: CachedRequestState, view: StreamView, width: int
) -> CachedRequestState:
    """The request as a batch row of ``width`` tokens holds it: its view.

    The resident prompt (as much as fits beside the outputs; the runner
    refills the row as the stream advances) and the view's computed count.
    The copy shares the output list (penalties and logits processors keep a
    reference to it) and the block ids, which the runner keeps compact.
    ``min_tokens`` is left to :mod:`vllm_sink.worker.min_tokens`.
    """
    room = width - len(request.output_token_ids)
    prompt = view.tokens(request.prompt_token_ids, (), 0, min(view.resident_prompt_len, room))
    params = request.sampling_params
    if params is not None and params.min_tokens:
        params = params.clone()
        params.min_tokens = 0
    return dataclasses.replace(
        request,
        sampling_params=params,
        prompt_token_ids=prompt,
        num_computed_tokens=request.num_computed_tokens - view.shift,
        prompt_is_token_ids=None,
    )


def project_computed_counts(runner: Runner, streams: Mapping[str, StreamState]) -> None:
    """Each batch row's computed count in its view (vLLM's update wrote the absolute one)."""
    for i, req_id in enumerate(batch_req_ids(runner)):
        computed = runner.requests[req_id].num_computed_tokens
        runner.input_batch.num_computed_tokens_cpu[i] = computed - streams[req_id].shift


def drop_evicted_blocks(rows: Rows, count: int) -> None:
    """Take ``count`` evicted blocks out of each block row, right after its head block."""
    for row in rows:
        del row[1 : 1 + count]


def project_prompt_count(runner: Runner, req_id: str, view: StreamView) -> None:
    """The request's state counts the prompt tokens its view holds.

    After an eviction, and for a request that continues a snapshot once it is
    added (its batch row was written from the view by :func:`compact_request`).
    """
    runner.requests[req_id].num_prompt_tokens = view.resident_prompt_len


def project_view_move(
    runner: Runner, req_id: str, before: StreamView, view: StreamView, block_size: int
) -> None:
    """Drop what an eviction removed from the request's state and its batch row.

    The state loses the evicted blocks and output tokens; a row in the batch
    gets the compact block row and its tokens from the sinks on, as far as
    the row holds them. A request not in the batch is added back from its
    state (:func:`compact_request`).
    """
    state = runner.requests[req_id]
    drop_evicted_blocks(state.block_ids, (view.shift - before.shift) // block_size)
    newly_dropped = view.dropped_outputs - before.dropped_outputs
    first = view.first_droppable_output
    del state.output_token_ids[first : first + newly_dropped]
    project_prompt_count(runner, req_id, view)

    batch = runner.input_batch
    i = batch_row(runner, req_id)
    if i is None:
        return
    for group, row in enumerate(state.block_ids):
        blocks = batch.block_table[group]
        blocks.block_table.np[i, : len(row)] = row
        blocks.block_table.np[i, len(row) : blocks.num_blocks_per_row[i]] = 0
        blocks.num_blocks_per_row[i] = len(row)

    width = batch.token_ids_cpu.shape[1]
    held = min(view.resident_prompt_len + len(state.output_token_ids), width)
    tokens = view.tokens(state.prompt_token_ids, state.output_token_ids, view.sinks, held)
    batch.token_ids_cpu[i, view.sinks : held] = tokens
    batch.is_token_ids[i, :held] = True
    batch.num_prompt_tokens[i] = min(view.resident_prompt_len, width)
    batch.num_tokens_no_spec[i] = held


# ------------------------------------------ the model's layers and kernels
def rope_deltas(rotary: torch.nn.Module) -> RopeDeltas:
    """A vLLM rotary module's re-rotation table, from the table it rotates by."""
    return RopeDeltas.from_position_table(
        rope_position_table(rotary),
        int(rotary.rotary_dim),
        # LongRoPE takes neox style only, and does not say so.
        is_neox_style=bool(getattr(rotary, "is_neox_style", True)),
        source=type(rotary).__name__,
    )


def rope_position_table(rotary: torch.nn.Module) -> torch.Tensor:
    """``[positions, rotary_dim]`` cos|sin of the positions the module rotates by.

    LongRoPE (Phi-3) keeps a short-factor and a long-factor table and uses one
    for the whole engine, picked by the length limit it was built under: the
    worker's, which is the streaming cache's span. Positions within the cache
    never leave that span, so a cache that fits the original context gets the
    short factors the model was trained with there; a longer one gets the long
    factors, as vLLM would give a plain engine with that limit.
    """
    long_short = getattr(rotary, "long_short_cos_sin_cache", None)
    if long_short is None:
        return rotary._compute_cos_sin_cache()
    # [short (original context rows) | long] tables, one of them in use.
    short_rows = int(rotary.original_max_position_embeddings)
    return long_short[short_rows:] if rotary.use_long_rope else long_short[:short_rows]


def alibi_slopes(layer: Any) -> torch.Tensor | None:
    """An attention layer's ALiBi slopes (``None`` without ALiBi)."""
    return layer.impl.alibi_slopes


def isa(layer: Any) -> str:
    """The instruction set the CPU attention layer's kernels were built for."""
    return layer.isa


def write_kv_as_forward(
    layer: Any, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write keys and values into ``layer``'s cache as a forward pass does: through its
    attention backend's own cache update."""
    layer.impl.do_kv_cache_update(layer, key, value, layer.kv_cache, slot_mapping)


def write_cpu_attn_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    isa: str,
) -> None:
    """CPU_ATTN's cache-write op, unquantised (``kv_cache_dtype="auto"``)."""
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        isa,
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype="auto",
    )
