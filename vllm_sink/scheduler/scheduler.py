"""The streaming engine's scheduler: vLLM's own, with snapshots and the streaming figures.

* A finished stream's blocks are kept as a snapshot instead of freed, and a new
  request whose prompt begins with a snapshot's tokens gets a copy of it as its
  cache hit (vLLM's own prefix-hit path, which
  :class:`~vllm_sink.scheduler.vllm_scheduler.SchedulerDoor` turns into
  :meth:`StreamingSchedulerMixin.resume_hit`), prefilling only the rest
  (:mod:`vllm_sink.core.snapshots`). The worker
  learns which stream it continues from the request's ``extra_args``
  (:data:`~vllm_sink.core.snapshots.RESUME_KEY`), and what to copy from
  the ops each step carries (:mod:`vllm_sink.core.snapshot_ops`).
* With ``--streaming-uncached-prompts window``, a long prompt that no snapshot
  resumes far enough is cut to its sinks and last window before it is
  scheduled (:mod:`vllm_sink.core.uncached_prompts`).
* vLLM makes its scheduler stats once per step (``make_stats``) when stats are
  on; the streaming figures are made at the same moment from the streaming KV
  manager and written to this engine core's board (:mod:`vllm_sink.metrics`),
  which the API server reads for ``/metrics``.

Set through vLLM's ``scheduler_cls`` by :mod:`vllm_sink.frontend.engine_setup`. What it
reads or overrides of vLLM's scheduler goes through
:class:`~vllm_sink.scheduler.vllm_scheduler.SchedulerDoor`, whose hooks it implements.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_sink.config import GIB, StreamingSettings, streaming_policy, streaming_settings
from vllm_sink.core.uncached_prompts import CutPrompt, cut_tokens, tokens_to_cut
from vllm_sink.metrics import StreamingBoard, engine_key
from vllm_sink.scheduler.kv_cache import StreamingManagers
from vllm_sink.scheduler.snapshot_directory import open_snapshot_directory
from vllm_sink.scheduler.snapshot_keeper import TierSizes
from vllm_sink.scheduler.vllm_scheduler import (
    Row,
    ScheduledRequest,
    SchedulerDoor,
    all_tokens,
    computed_prompt,
    cuttable,
    kv_bytes_per_block,
    mark_resumed,
    num_computed_tokens,
    output_tokens,
    prompt_tokens,
    reads_cache,
    replace_prompt,
    request_salt,
    resumable,
    running_requests,
    sink_key_bytes,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from vllm_sink.core.snapshot_ops import SnapshotOp

logger = init_logger("vllm.vllm_sink")

PUBLISH_INTERVAL_S = 0.5
"""How often a busy scheduler refreshes the figures (they cost O(streams) to make)."""


class StreamingSchedulerMixin(SchedulerDoor):
    """Mixed in front of a vLLM scheduler class: the hooks its door calls."""

    def streaming_setup(
        self,
        config: VllmConfig,
        kv_cache_config: KVCacheConfig,
        managers: tuple[Any, ...],
        engine: tuple[str, int] | None,
    ) -> None:
        # The worker gives every layer a streaming spec (or refuses the model).
        self.streaming = StreamingManagers(managers)
        settings = streaming_settings(config)
        self.sink_policy = streaming_policy(config)
        self.cut_uncached = settings.uncached_prompts == "window"
        self._enable_snapshots(config, kv_cache_config, settings)
        self.snapshot_hits = self.snapshot_misses = self.snapshot_tokens_skipped = 0
        self.tier_hits: Counter[str] = Counter()
        """Resumes, by the tier their snapshot was found in."""
        self._resumed_from_tier: dict[str, str] = {}
        self._prompts_kept: set[str] = set()
        """Running requests whose computed prompt has been kept (:meth:`_keep_computed_prompts`)."""
        self._cut_prompts: dict[str, CutPrompt] = {}
        """Requests whose prompt is cut, by id."""
        self.prompts_cut = self.prompt_tokens_cut = 0
        self._board: StreamingBoard | None = None
        self._published_at = 0.0
        if engine is not None:
            self._board = StreamingBoard.create(engine_key(*engine))
            self.publish_streaming_figures()

    # ---------------------------------------------------------------- snapshots
    def _enable_snapshots(
        self, config: VllmConfig, kv_cache_config: KVCacheConfig, settings: StreamingSettings
    ) -> None:
        policy = self.sink_policy
        ranks = config.parallel_config.tensor_parallel_size
        sizes = TierSizes(
            pool_snapshots=settings.snapshots,
            host_bytes=int(settings.host_size * GIB / ranks),
            disk_bytes=int(settings.dir_size * GIB) if settings.directory else 0,
            bytes_per_block=kv_bytes_per_block(kv_cache_config),
            sink_key_bytes=sink_key_bytes(kv_cache_config, policy.sinks),
            ranks=ranks,
        )
        salt, disk = engine_salt(config.model_config.model, policy), None
        if settings.directory and settings.snapshots and sizes.disk_bytes:
            disk = open_snapshot_directory(settings.directory, config, kv_cache_config, policy)
        elif settings.directory:
            logger.warning(
                "vllm-sink: snapshots are not kept on disk: --streaming-snapshot-dir-size is 0"
            )
        if disk is not None:
            salt = bytes.fromhex(disk.engine)  # the same keys in every engine sharing it
        self.streaming.enable_snapshots(sizes, salt, disk)
        if disk is not None:
            logger.info(
                "vllm-sink: snapshots also kept in %s (at most %.1f GiB); %d found there",
                disk.path,
                settings.dir_size,
                self.streaming.snapshots.tier_figures()["disk"][0],
            )

    def _keep_computed_prompts(self) -> None:
        """A snapshot of each prompt just computed, copied before the request goes on.

        A client sends a reply back as text, and a reply may come back as other
        tokens (merged or split differently, special tokens dropped): the next
        turn then parts from the reply's snapshot, at worst before its last
        eviction, where that snapshot cannot resume it. It resumes this one,
        and a regenerated answer resumes it with one token left to compute.
        Before vLLM's schedule, which frees what the step evicts.
        """
        for request in running_requests(self):
            request_id = request.request_id
            if computed_prompt(request) and request_id not in self._prompts_kept:
                self._prompts_kept.add(request_id)
                if resumable(request):
                    self._keep_snapshot(request, running=True)

    def _keep_snapshot(self, request, running: bool = False) -> bool:
        """Keep the request's stream as the snapshot of its computed tokens, as its client
        sent them (a cut prompt whole)."""
        cut = self._cut_prompts.get(request.request_id)
        skipped = cut.cut if cut else 0
        tokens = self._whole_tokens(request)[: num_computed_tokens(request) + skipped]
        return self.streaming.keep_snapshot(
            request.request_id, tokens, request_salt(request), running=running, cut=skipped
        )

    def _whole_tokens(self, request) -> Sequence[int]:
        cut = self._cut_prompts.get(request.request_id)
        return cut.whole_tokens(output_tokens(request)) if cut else all_tokens(request)

    def _cut_prompt(self, request, cut: int) -> None:
        """Leave out ``cut`` tokens after the sinks of the request's whole prompt (0: none)."""
        request_id = request.request_id
        previous = self._cut_prompts.pop(request_id, None)
        if previous is None and not cut:
            return
        whole = previous.whole_prompt if previous else tuple(prompt_tokens(request))
        replace_prompt(request, cut_tokens(whole, self.sink_policy.sinks, cut))
        if cut:
            self._cut_prompts[request_id] = CutPrompt(whole, cut)

    def keep_request_blocks(self, request, finished: bool) -> bool:
        """A finished stream's blocks are kept as its snapshot (if it has one to keep)."""
        self._resumed_from_tier.pop(request.request_id, None)
        self._prompts_kept.discard(request.request_id)
        kept = finished and resumable(request) and self._keep_snapshot(request)
        self._cut_prompts.pop(request.request_id, None)
        return kept

    def resume_hit(self, request, max_tokens: int | None) -> tuple[tuple[Row, ...], int] | None:
        """The snapshot that resumes the most of the request's prompt, its copy to be the
        cache hit; or ``None``, the prompt cut if it is long and cuttable."""
        snapshots = self.streaming.snapshots
        tokens = self._whole_tokens(request)
        whole_prompt = len(tokens) - len(output_tokens(request))
        cut = 0
        if request.request_id in self._cut_prompts:  # preempted: its prompt stays as it was cut
            cut = self._cut_prompts[request.request_id].cut
        elif self.cut_uncached and cuttable(request):
            cut = tokens_to_cut(self.sink_policy, len(tokens), whole_prompt)
        found = None
        if len(snapshots) and resumable(request) and reads_cache(request):
            # At least the last prompt token is computed again, for its logits.
            last = len(tokens) - 1
            if max_tokens is not None:
                last = min(last, max_tokens)
            # Worth resuming only if it leaves no more to compute than a cut prompt.
            found = snapshots.resume(tokens, request_salt(request), last, min_tokens=max(cut, 1))
            if found and found[0].skipped > whole_prompt - self.sink_policy.sinks - 1:
                found = None  # its cut reaches past this request's prompt
        mark_resumed(request, found[0] if found else None)
        if found is None:
            self._cut_prompt(request, cut)
            return None
        snapshot, length, rows, tier = found
        self._cut_prompt(request, snapshot.skipped)
        self._resumed_from_tier[request.request_id] = tier
        return rows, snapshot.stream_length(length)

    def before_schedule(self) -> None:
        self.streaming.snapshots.maybe_scan()
        self._keep_computed_prompts()

    def step_ops(self) -> list[SnapshotOp]:
        return self.streaming.snapshots.take_ops()

    def request_scheduled(self, request: ScheduledRequest) -> None:
        """Count a new request's resume (or miss), by the tier its snapshot came from."""
        tier = self._resumed_from_tier.pop(request.request_id, None)
        if not request.computed_tokens:
            self.snapshot_misses += 1
            if request.request_id in self._cut_prompts:
                self.prompts_cut += 1
                self.prompt_tokens_cut += self._cut_prompts[request.request_id].cut
        elif request.resumes_snapshot:
            self.snapshot_hits += 1
            self.tier_hits[tier] += 1
            self.snapshot_tokens_skipped += request.computed_tokens
        else:
            return  # a streaming-input session's next input, its own cache kept
        logger.debug(
            "vllm-sink: request %s: %d prompt tokens, %d resumed from a snapshot (%s)",
            request.request_id,
            request.prompt_tokens,
            request.computed_tokens,
            tier or "none",
        )

    # ------------------------------------------------------------------ metrics
    def figures_changed(self) -> None:
        self.publish_streaming_figures(when_due=True)

    def streaming_figures(self) -> dict[str, int]:
        streaming, snapshots = self.streaming, self.streaming.snapshots
        tiers = snapshots.tier_figures()
        return {
            **streaming.figures(),
            "snapshots": len(snapshots),
            "snapshot_blocks": snapshots.num_blocks,
            "snapshot_hits": self.snapshot_hits,
            "snapshot_misses": self.snapshot_misses,
            "snapshot_tokens_skipped": self.snapshot_tokens_skipped,
            "prompts_cut": self.prompts_cut,
            "prompt_tokens_cut": self.prompt_tokens_cut,
            "snapshot_spills": snapshots.spills,
            "snapshot_disk_read_us": int(snapshots.disk_read_seconds * 1e6),
            **{f"snapshot_count_{tier}": count for tier, (count, _) in tiers.items()},
            **{f"snapshot_bytes_{tier}": size for tier, (_, size) in tiers.items()},
            **{f"snapshot_hits_{tier}": self.tier_hits[tier] for tier in tiers},
        }

    def publish_streaming_figures(self, when_due: bool = False) -> None:
        """Write the figures to the board; with ``when_due``, only if they may be stale.

        Once no stream is left they are written at once: an idle engine takes
        no more steps (aborts arrive between steps).
        """
        if self._board is None:
            return
        now = time.monotonic()
        idle = not self.streaming.has_streams
        if when_due and not idle and now - self._published_at < PUBLISH_INTERVAL_S:
            return
        self._published_at = now
        self._board.publish(self.streaming_figures())


class StreamingScheduler(StreamingSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler (the CPU platform turns async scheduling off)."""


def engine_salt(model: str, policy) -> bytes:
    """Snapshot keys are valid only under the model and policy that built the cache."""
    settings = (model, policy.sinks, policy.window, policy.block_size, policy.max_chunk_tokens)
    return hashlib.sha256(repr(settings).encode()).digest()
