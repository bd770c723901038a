"""The worker side's one door into vLLM's V1 model runner, its batch and request state.

Everything the streaming runner reads or writes of ``GPUModelRunner`` (which
``CPUModelRunner`` subclasses), its persistent ``InputBatch`` and its
``CachedRequestState`` objects goes through a function here; every name they
use is listed in :mod:`vllm_sink.vllm_internals` and checked by
``tests/test_vllm_contract.py``. Porting to another runner (the GPU or V2
runner) means reading this file.

It is also the one place where a stream's compact view
(:class:`~vllm_sink.core.stream_view.StreamView`) is projected into vLLM's
objects: :func:`compact_request` for a row the batch (re)adds,
:func:`drop_evicted_blocks` and :func:`project_prompt_count` for a request
that continues a snapshot,
:func:`project_computed_counts` after each scheduler update, and
:func:`project_view_move` when an eviction moves a stream's view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm_sink.core.snapshot_ops import OPS_ATTRIBUTE, SnapshotOp
from vllm_sink.core.snapshots import resume_source
from vllm_sink.core.stream_view import StreamView

if TYPE_CHECKING:
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    from vllm_sink.core.stream_state import StreamState

Runner = Any
"""A ``GPUModelRunner`` (or ``CPUModelRunner``) instance."""

Rows = tuple[list[int], ...]
"""A request's block ids, one row per KV cache group (vLLM's ``block_ids``)."""


# ------------------------------------------------------------------ reads
def request_state(runner: Runner, req_id: str) -> CachedRequestState:
    return runner.requests[req_id]


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


def alibi_slopes(layer: Any) -> torch.Tensor | None:
    """An attention layer's ALiBi slopes (``None`` without ALiBi)."""
    return layer.impl.alibi_slopes


def isa(layer: Any) -> str:
    """The instruction set the CPU attention layer's kernels were built for."""
    return layer.isa


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def snapshot_ops(scheduler_output: Any) -> list[SnapshotOp]:
    """The step's snapshot ops, sent by the streaming scheduler with vLLM's output."""
    return getattr(scheduler_output, OPS_ATTRIBUTE, None) or []


def resumed_from(new_request: Any) -> tuple[str, int] | None:
    """``(snapshot id, the stream's shift)`` of a request continuing a snapshot.

    Set by the scheduler (:data:`vllm_sink.core.snapshots.RESUME_KEY`).
    """
    if not new_request.num_computed_tokens:
        return None
    return resume_source(new_request.sampling_params)


def new_block_rows(new_request: Any) -> Rows:
    """A new request's block rows, the lists vLLM's runner will hold."""
    return new_request.block_ids


# ----------------------------------------------------------------- writes
def adopt_input_batch(runner: Runner, batch_class: type, **attributes: Any) -> None:
    """Re-class the runner's persistent batch (its constructor is version-specific)."""
    batch = runner.input_batch
    batch.__class__ = batch_class
    for name, value in attributes.items():
        setattr(batch, name, value)


def add_logits_processor(runner: Runner, processor: Any) -> None:
    """Apply ``processor`` after vLLM's own, where it applies non-argmax-invariant ones."""
    runner.input_batch.logitsprocs.non_argmax_invariant.append(processor)


def add_to_positions(runner: Runner, per_request: np.ndarray, scheduled: np.ndarray) -> None:
    """Add ``per_request[i]`` to the positions of every token row ``i`` schedules this step.

    Valid right after vLLM's ``_prepare_inputs`` filled ``runner.positions``.
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
