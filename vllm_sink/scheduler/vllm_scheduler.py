"""The scheduler side's one door to vLLM's internals: every private name it relies on is here.

vLLM's public hooks (``scheduler_cls``, the KV-spec registry) put our classes
in vLLM's place; what they do not cover is reached from this module only:

* :class:`KVManagerDoor`: vLLM's per-group KV manager, whose calls become the
  hooks a streaming manager implements (:mod:`vllm_sink.scheduler.kv_cache`);
* :class:`SchedulerDoor`: vLLM's scheduler, whose calls become the hooks of
  the streaming scheduler (:mod:`vllm_sink.scheduler.scheduler`);
* functions that read or write a request, the block pool, a step's output.

Every name used here is listed in :mod:`vllm_sink.vllm_internals` and checked
by ``tests/test_vllm_contract.py``; ``tests/test_vllm_doors.py`` checks that no
other module of the scheduler side reaches past this one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

from vllm_sink.core.snapshot_ops import OPS_ATTRIBUTE, SnapshotOp
from vllm_sink.core.snapshots import RESUME_KEY, Snapshot, resume_source

Block = KVCacheBlock
"""One block of the KV block pool (``block_id``, ``is_null``): what a request's row holds."""

Row = tuple[Block, ...]
"""A request's blocks in one KV cache group, null placeholders where freed."""


# ----------------------------------------------------------------- block pool
def free_block_count(block_pool: Any) -> int:
    """Blocks the pool can hand out (free ones, readable or not)."""
    return block_pool.get_num_free_blocks()


def new_blocks(block_pool: Any, num_blocks: int) -> list[Block]:
    return block_pool.get_new_blocks(num_blocks)


def null_block(block_pool: Any) -> Block:
    """The placeholder a row holds where a block was freed."""
    return block_pool.null_block


def hold_blocks(block_pool: Any, blocks: Sequence[Block]) -> None:
    """One more reference to each of ``blocks``: not handed out while it is held."""
    block_pool.touch(blocks)


def free_blocks(block_pool: Any, blocks: Iterable[Block]) -> None:
    """Drop one reference to each of ``blocks``, the first ones to be handed out first."""
    block_pool.free_blocks(blocks)


def free_readable(block_pool: Any, blocks: Iterable[Block], on_reuse: Callable) -> None:
    """Free ``blocks`` behind the pool's other free blocks, readable until handed out.

    ``on_reuse(block)`` runs as one of them is handed out (it must not touch the pool).
    """
    block_pool.unpin_blocks(blocks, on_reuse)


# ------------------------------------------------------------ the KV managers
class KVManagerDoor(SingleTypeKVCacheManager):
    """vLLM's KV manager of one layer group, its calls turned into a streaming manager's hooks.

    vLLM calls the methods of its own names below; a subclass implements the
    hooks they call (:meth:`max_blocks_per_stream`, :meth:`step_starts`,
    :meth:`blocks_allocated`, :meth:`stream_freed`, :meth:`hit_copies`,
    :meth:`take_hit`) and reaches a request's blocks through the accessors.
    vLLM's prefix caching is off for streams: a cache hit is a snapshot the
    scheduler found (:meth:`SchedulerDoor.resume_hit`).
    """

    def __init__(self, kv_cache_spec: Any, *args: Any, **kwargs: Any) -> None:
        """vLLM's arguments, however passed, with admission capped at one stream's bound (a
        prompt of any length is admitted once that bound fits)."""
        arguments = inspect.signature(SingleTypeKVCacheManager.__init__).bind(
            self, kv_cache_spec, *args, **kwargs
        )
        arguments.arguments["max_admission_blocks_per_request"] = self.max_blocks_per_stream(
            kv_cache_spec
        )
        super().__init__(*arguments.args[1:], **arguments.kwargs)

    # ---------------------------------------------------- hooks (subclasses)
    def max_blocks_per_stream(self, spec: Any) -> int:
        """Most blocks one stream holds at once in this group."""
        raise NotImplementedError

    def step_starts(self, request_id: str, num_computed_tokens: int) -> None:
        """A step of the request begins with ``num_computed_tokens`` computed: free what it no
        longer needs."""
        raise NotImplementedError

    def blocks_allocated(self, request_id: str) -> None:
        """The request has just been given new blocks."""

    def stream_freed(self, request_id: str) -> None:
        """The request's blocks have been freed (it finished, was preempted or aborted)."""

    def hit_copies(self, hit: Sequence[Block]) -> int:
        """Fresh blocks a request needs to take over ``hit`` (besides vLLM's count)."""
        return 0

    def take_hit(self, request_id: str, hit: Sequence[Block], num_tokens: int) -> None:
        """Give a request that holds no blocks yet the cache hit ``hit`` of ``num_tokens``
        tokens (:meth:`hold_computed`)."""
        raise NotImplementedError

    # ------------------------------------------------------------- accessors
    def blocks_of(self, request_id: str) -> Sequence[Block]:
        """The request's row of blocks (empty if it holds none)."""
        return self.req_to_blocks.get(request_id, ())

    def hold_computed(self, request_id: str, blocks: Sequence[Block]) -> None:
        """Make ``blocks`` the row of a request that holds none yet, all of them computed."""
        row = self.req_to_blocks[request_id]
        assert not row, "a cache hit goes to a request that holds no blocks yet"
        row.extend(blocks)
        self.num_cached_block[request_id] = len(row)

    def free_row_range(self, request_id: str, first: int, end: int) -> None:
        """Free the request's blocks ``first .. end - 1``; null placeholders take their place."""
        self._remove_blocks_in_range(request_id, first, end)

    def pop_row(self, request_id: str) -> list[Block]:
        """Take the request's row out of this manager, its blocks not freed."""
        return self.pop_blocks_for_free(request_id)

    def free_to_pool(self, blocks: Iterable[Block]) -> None:
        """Free blocks this manager no longer tracks, the first ones to be handed out first."""
        free_blocks(self.block_pool, blocks)

    # -------------------------------------------------------- vLLM's calls
    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        self.step_starts(request_id, processed_computed_tokens)

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[Block]:
        blocks = super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        self.blocks_allocated(request_id)
        return blocks

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self.stream_freed(request_id)

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks, *args, **kwargs
    ) -> int:
        needed = super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, *args, **kwargs
        )
        return needed + self.hit_copies(new_computed_blocks)

    def _has_partial_local_hit(self, new_computed_blocks, num_local_computed_tokens) -> bool:
        # A hit is handed over whole (take_hit), its last block too: nothing to copy on write.
        return False

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[Block],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        self.take_hit(request_id, new_computed_blocks, num_local_computed_tokens)

    @classmethod
    def find_longest_cache_hit(cls, *args, **kwargs):
        """Abstract in vLLM's base class; vLLM calls it only with prefix caching on."""
        raise NotImplementedError("vllm-sink streams run with prefix caching off")


# --------------------------------------------------------------- the scheduler
@dataclass(frozen=True)
class ScheduledRequest:
    """A request a step schedules for the first time, as the worker learns of it."""

    request_id: str
    prompt_tokens: int
    computed_tokens: int
    """Tokens it starts with, computed before (a cache hit, or a session's own cache)."""
    resumes_snapshot: bool
    """Whether the worker is told it continues a snapshot (:func:`mark_resumed`)."""


class SchedulerDoor:
    """vLLM's scheduler (the class after this one), its calls turned into hooks.

    Mixed in front of a vLLM scheduler class; the class in front of it
    implements the hooks (:meth:`streaming_setup`, :meth:`before_schedule`, ...).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.vllm_config
        self.streaming_setup(
            config,
            self.kv_cache_config,
            single_type_managers(self),
            engine=(config.instance_id, config.parallel_config.data_parallel_index)
            if self.log_stats
            else None,
        )

    # ---------------------------------------------------- hooks (subclasses)
    def streaming_setup(
        self,
        config: Any,
        kv_cache_config: Any,
        managers: tuple[Any, ...],
        engine: tuple[str, int] | None,
    ) -> None:
        """vLLM's scheduler is built: ``config`` (vLLM's), its KV cache layout, the KV managers
        of its layer groups, and ``engine`` (instance id, DP rank as vLLM's front end labels
        it) when stats are on."""
        raise NotImplementedError

    def keep_request_blocks(self, request: Any, finished: bool) -> bool:
        """vLLM is about to free the request's blocks: ``True`` if they were kept instead.

        ``finished``: the request finished and no step in flight writes its blocks.
        """
        return False

    def resume_hit(
        self, request: Any, max_tokens: int | None
    ) -> tuple[tuple[Row, ...], int] | None:
        """The request's cache hit (at most ``max_tokens`` tokens, if given): a row of blocks
        per KV cache group and the tokens they hold; ``None`` for vLLM's own (none)."""
        return None

    def before_schedule(self) -> None:
        """A step is about to be scheduled."""

    def step_ops(self) -> list[SnapshotOp]:
        """The snapshot ops the worker carries out before the step just scheduled."""
        return []

    def request_scheduled(self, request: ScheduledRequest) -> None:
        """A step schedules ``request`` for the first time."""

    def figures_changed(self) -> None:
        """Stats were made or requests finished: the streaming figures may be stale."""

    # -------------------------------------------------------- vLLM's calls
    def _free_request_blocks(self, request: Any) -> None:
        finished = request.is_finished() and self._request_blocks_can_be_freed(request)
        if not self.keep_request_blocks(request, finished):
            super()._free_request_blocks(request)

    def _get_local_prefix_cache_hit(self, request: Any, max_cache_hit_length: int | None = None):
        """vLLM's (empty: prefix caching is off) hit, or the one :meth:`resume_hit` finds.

        vLLM 0.33 passes ``max_cache_hit_length``; 0.32 does not.
        """
        limit = () if max_cache_hit_length is None else (max_cache_hit_length,)
        hit = super()._get_local_prefix_cache_hit(request, *limit)
        found = self.resume_hit(request, max_cache_hit_length)
        if found is None:
            return hit
        rows, num_tokens = found
        blocks = self.kv_cache_manager.create_kv_cache_blocks(tuple(list(row) for row in rows))
        return blocks, num_tokens, 0, False

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self.before_schedule()
        output = super().schedule(*args, **kwargs)
        setattr(output, OPS_ATTRIBUTE, self.step_ops())  # vLLM has no field for a plugin's own
        for new in output.scheduled_new_reqs:
            self.request_scheduled(
                ScheduledRequest(
                    new.req_id,
                    len(new.prompt_token_ids or ()),
                    new.num_computed_tokens,
                    resume_source(new.sampling_params) is not None,
                )
            )
        return output

    def make_stats(self, *args: Any, **kwargs: Any) -> Any:
        stats = super().make_stats(*args, **kwargs)
        self.figures_changed()
        return stats

    def finish_requests(self, *args: Any, **kwargs: Any) -> Any:
        finished = super().finish_requests(*args, **kwargs)
        self.figures_changed()
        return finished


def single_type_managers(scheduler: Any) -> tuple[Any, ...]:
    """The scheduler's KV cache manager of each KV cache group."""
    return tuple(scheduler.kv_cache_manager.coordinator.single_type_managers)


def running_requests(scheduler: Any) -> list[Any]:
    return list(scheduler.running)


def kv_bytes_per_block(kv_cache_config: Any) -> int:
    """Bytes of KV cache one block id holds on one worker, over every layer of its group.

    KV cache groups overlay each other's tensors (a block id belongs to one
    group at a time), so a block is as large as the largest group's pages.
    """
    return max(
        group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        for group in kv_cache_config.kv_cache_groups
    )


def sink_key_bytes(kv_cache_config: Any, sinks: int) -> int:
    """Bytes of one worker's copy of a stream's sink keys (every layer of the sink group)."""
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        if getattr(spec, "sliding_window", None) is None:
            key_bytes_per_token = spec.page_size_bytes // (2 * spec.block_size)
            return sinks * key_bytes_per_token * len(group.layer_names)
    return 0


def register_builtin_specs() -> None:
    """Fill vLLM's KV spec registry with vLLM's own specs.

    The registry adds them only while it is empty: a plugin that registers
    first would leave ``FullAttentionSpec`` & co. unregistered.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()


# ------------------------------------------------------------------- requests
def computed_prompt(request: Any) -> bool:
    """Whether the request's prompt is computed, and nothing after it."""
    return request.num_computed_tokens == request.num_prompt_tokens > 0


def num_computed_tokens(request: Any) -> int:
    return request.num_computed_tokens


def resumable(request: Any) -> bool:
    """Whether the request's KV is a function of its token ids (no images or embeddings)."""
    return not request.mm_features and request.prompt_embeds is None


def reads_cache(request: Any) -> bool:
    """Whether the request may start from cached KV (its client did not ask it not to)."""
    return not request.skip_reading_prefix_cache


def cuttable(request: Any) -> bool:
    """Whether the request's prompt may be cut (:mod:`vllm_sink.core.uncached_prompts`).

    Not when it asks for its prompt's log-probabilities (one per prompt token
    its client sent), nor for a streaming-input session's (its cache is its own).
    """
    params = request.sampling_params
    return (
        resumable(request)
        and params is not None
        and params.prompt_logprobs is None
        and not request.resumable
    )


def prompt_tokens(request: Any) -> list[int]:
    """The request's prompt in this scheduler (a cut prompt's, once cut)."""
    return list(request.prompt_token_ids)


def output_tokens(request: Any) -> list[int]:
    return list(request.output_token_ids)


def all_tokens(request: Any) -> Sequence[int]:
    """The request's prompt and output (vLLM's read-only view: not copied)."""
    return request.all_token_ids


def replace_prompt(request: Any, prompt: list[int]) -> None:
    """Make ``prompt`` the request's prompt in this scheduler, its output kept after it.

    The front end keeps the prompt its client sent (outputs report it); the
    engine core's request gets its own lists.
    """
    outputs = output_tokens(request)
    request.prompt_token_ids = prompt
    request.num_prompt_tokens = len(prompt)
    request._all_token_ids[:] = [*prompt, *outputs]


def request_salt(request: Any) -> str:
    """What besides token ids makes a request's KV its own: its cache salt and LoRA adapter."""
    lora = request.lora_request
    return f"{request.cache_salt or ''}|{lora.lora_int_id if lora is not None else ''}"


def mark_resumed(request: Any, snapshot: Snapshot | None) -> None:
    """Tell the worker which stream ``request`` continues (or that it continues none)."""
    params = request.sampling_params
    if params is None:
        return
    extra = params.extra_args or {}
    if snapshot is None and RESUME_KEY not in extra:
        return
    params = params.clone()  # the request's own copy: an in-process engine may share it
    params.extra_args = {k: v for k, v in extra.items() if k != RESUME_KEY}
    if snapshot is not None:
        params.extra_args[RESUME_KEY] = (snapshot.snapshot_id, snapshot.shift)
    request.sampling_params = params
