"""Every private name of vLLM 0.32 that vllm-sink relies on, in one list.

vLLM's public hooks (entry points, ``worker_cls``, the KV-spec registry,
``additional_config``, logits processors) carry most of the plugin; what they
do not cover is reached through the names below. Porting to another vLLM
release, or to the GPU and V2 runners, starts here: ``tests/test_vllm_contract.py``
checks each entry against the installed vLLM without starting an engine, and
fails naming the one that moved.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Internal:
    """``owner.name`` in ``module``: a method (with the parameters we pass), or an attribute."""

    module: str
    owner: str
    name: str
    kind: str
    """``method``, ``attribute`` (set on instances in the owner's code, or a registered
    buffer) or ``field`` (dataclass)."""
    params: tuple[str, ...] = ()
    """Parameter names the method must still take, where we call or override it."""
    used_by: str = ""
    override: str = ""
    """``module:Class`` whose method of this name replaces vLLM's: it must accept every call
    vLLM's signature allows (each positional parameter by position and by name)."""
    call_args: int | None = None
    """Positional arguments we pass where we call it (besides ``self``)."""
    returns: int | None = None
    """Length of the tuple we return in its place (vLLM's annotation must agree)."""


RUNNER = "vllm.v1.worker.gpu_model_runner"
BATCH = "vllm.v1.worker.gpu_input_batch"
SCHED_OUTPUT = "vllm.v1.core.sched.output"
KV_MANAGER = "vllm.v1.core.single_type_kv_cache_manager"

BLOCK_TABLE = "vllm.v1.worker.block_table"
SCHEDULER = "vllm.v1.core.sched.scheduler"
WORKER_ADAPTER = "worker.vllm_runner"
SCHEDULER_DOOR = "scheduler.vllm_scheduler"
OUR_SCHEDULER = "vllm_sink.scheduler.vllm_scheduler:SchedulerDoor"
OUR_KV_MANAGER = "vllm_sink.scheduler.vllm_scheduler:KVManagerDoor"
OUR_RUNNER = "vllm_sink.worker.vllm_runner:V1RunnerDoor"

INTERNALS: tuple[Internal, ...] = (
    # The V1 runner: its steps overridden by the adapter's door (calling the streaming
    # runner's hooks), its state read and written through the adapter.
    Internal(RUNNER, "GPUModelRunner", "_update_states", "method", ("scheduler_output",),
             WORKER_ADAPTER, override=OUR_RUNNER),
    Internal(RUNNER, "GPUModelRunner", "_prepare_inputs", "method",
             ("scheduler_output", "num_scheduled_tokens"), WORKER_ADAPTER, override=OUR_RUNNER),
    Internal(RUNNER, "GPUModelRunner", "_sample", "method",
             ("logits", "spec_decode_metadata"), WORKER_ADAPTER, override=OUR_RUNNER),
    Internal(RUNNER, "GPUModelRunner", "_bookkeeping_sync", "method",
             ("scheduler_output", "sampler_output"), WORKER_ADAPTER, override=OUR_RUNNER),
    # The runner classes the streaming runners are built on (the CPU one by vLLM's worker).
    Internal(RUNNER, "GPUModelRunner", "__init__", "method", ("vllm_config", "device"),
             WORKER_ADAPTER, call_args=2),
    Internal("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "__init__", "method",
             ("vllm_config", "device"), WORKER_ADAPTER),
    *(
        Internal(RUNNER, "GPUModelRunner", name, "attribute", (), WORKER_ADAPTER)
        for name in ("discard_request_mask", "positions", "requests", "input_batch", "kv_caches")
    ),
    # The persistent batch, re-classed and rewritten row by row.
    Internal(BATCH, "InputBatch", "add_request", "method", ("request",), WORKER_ADAPTER,
             override="vllm_sink.worker.vllm_runner:StreamingInputBatch"),
    Internal(BATCH, "InputBatch", "_make_sampling_metadata", "method", (), WORKER_ADAPTER),
    Internal(BATCH, "InputBatch", "req_ids", "attribute", (), WORKER_ADAPTER),
    *(
        Internal(BATCH, "InputBatch", name, "attribute", (), WORKER_ADAPTER)
        for name in (
            "token_ids_cpu", "is_token_ids", "num_prompt_tokens", "num_tokens_no_spec",
            "num_computed_tokens_cpu", "block_table", "req_id_to_index", "generators",
            "sampling_metadata", "logitsprocs", "num_reqs", "no_penalties",
        )
    ),
    Internal("vllm.v1.sample.logits_processor.state", "LogitsProcessors",
             "non_argmax_invariant", "attribute", (), WORKER_ADAPTER),
    *(
        Internal(BLOCK_TABLE, "BlockTable", name, "attribute", (), WORKER_ADAPTER)
        for name in ("block_table", "num_blocks_per_row")
    ),
    *(
        Internal(BATCH, "CachedRequestState", name, "field", (), WORKER_ADAPTER)
        for name in (
            "req_id", "prompt_token_ids", "output_token_ids",
            "block_ids", "num_computed_tokens", "sampling_params", "prompt_is_token_ids",
        )
    ),
    Internal(BATCH, "CachedRequestState", "num_prompt_tokens", "attribute", (), WORKER_ADAPTER),
    *(
        Internal(SCHED_OUTPUT, "CachedRequestData", name, "field", (), WORKER_ADAPTER)
        for name in ("req_ids", "num_computed_tokens", "resumed_req_ids", "all_token_ids")
    ),
    *(
        Internal(SCHED_OUTPUT, "SchedulerOutput", name, "field", (), WORKER_ADAPTER)
        for name in ("finished_req_ids", "scheduled_new_reqs", "scheduled_cached_reqs")
    ),
    # The scheduler, subclassed (set through the public ``scheduler_cls``) and read.
    Internal(SCHEDULER, "Scheduler", "make_stats", "method", (), SCHEDULER_DOOR,
             override=OUR_SCHEDULER),
    Internal(SCHEDULER, "Scheduler", "finish_requests", "method",
             ("request_ids", "finished_status"), SCHEDULER_DOOR, override=OUR_SCHEDULER),
    *(
        Internal(SCHEDULER, "Scheduler", name, "attribute", (), SCHEDULER_DOOR)
        for name in ("kv_cache_manager", "kv_cache_config", "log_stats", "vllm_config", "running")
    ),
    # The engine's DP rank, which a non-MoE DP engine keeps only here (its board's name).
    *(
        Internal("vllm.config.parallel", "ParallelConfig", "data_parallel_index", "field", (),
                 used_by)
        for used_by in (SCHEDULER_DOOR, WORKER_ADAPTER)
    ),
    # Snapshots: a finished request's blocks kept, and handed over as a cache hit.
    Internal(SCHEDULER, "Scheduler", "_free_request_blocks", "method", ("request",),
             SCHEDULER_DOOR, override=OUR_SCHEDULER),
    Internal(SCHEDULER, "Scheduler", "_request_blocks_can_be_freed", "method", ("request",),
             SCHEDULER_DOOR),
    Internal(SCHEDULER, "Scheduler", "_get_local_prefix_cache_hit", "method", ("request",),
             SCHEDULER_DOOR, override=OUR_SCHEDULER, call_args=1, returns=4),
    Internal(SCHEDULER, "Scheduler", "schedule", "method", (), SCHEDULER_DOOR,
             override=OUR_SCHEDULER),
    *(
        Internal("vllm.v1.request", "Request", name, "attribute", (), SCHEDULER_DOOR)
        for name in (
            "all_token_ids", "num_computed_tokens", "num_tokens", "cache_salt", "lora_request",
            "mm_features", "prompt_embeds", "skip_reading_prefix_cache", "sampling_params",
            "request_id", "is_finished", "num_prompt_tokens", "prompt_token_ids",
            "output_token_ids", "_all_token_ids", "resumable",
        )
    ),
    Internal("vllm.v1.core.kv_cache_manager", "KVCacheManager", "create_kv_cache_blocks",
             "method", ("blocks",), SCHEDULER_DOOR, call_args=1),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "add_local_computed_blocks", "method",
             ("request_id", "new_computed_blocks", "num_local_computed_tokens",
              "num_external_computed_tokens"), SCHEDULER_DOOR, override=OUR_KV_MANAGER),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "_has_partial_local_hit", "method",
             ("new_computed_blocks", "num_local_computed_tokens"), SCHEDULER_DOOR,
             override=OUR_KV_MANAGER),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "pop_blocks_for_free", "method",
             ("request_id",), SCHEDULER_DOOR, call_args=1),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "allocate_new_blocks", "method",
             ("request_id", "num_tokens", "num_tokens_main_model"), SCHEDULER_DOOR,
             override=OUR_KV_MANAGER, call_args=3),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "free", "method", ("request_id",),
             SCHEDULER_DOOR, override=OUR_KV_MANAGER, call_args=1),
    *(
        Internal(KV_MANAGER, "SingleTypeKVCacheManager", name, "attribute", (),
                 SCHEDULER_DOOR)
        for name in ("num_cached_block", "block_pool")
    ),
    Internal("vllm.v1.core.block_pool", "BlockPool", "unpin_blocks", "method",
             ("blocks", "on_reuse"), SCHEDULER_DOOR, call_args=2),
    Internal("vllm.v1.core.block_pool", "BlockPool", "touch", "method", ("blocks",),
             SCHEDULER_DOOR, call_args=1),
    Internal("vllm.v1.core.block_pool", "BlockPool", "get_new_blocks", "method",
             ("num_blocks",), SCHEDULER_DOOR, call_args=1),
    Internal("vllm.v1.core.block_pool", "BlockPool", "get_num_free_blocks", "method", (),
             SCHEDULER_DOOR, call_args=0),
    Internal("vllm.v1.core.block_pool", "BlockPool", "null_block", "attribute", (),
             SCHEDULER_DOOR),
    Internal("vllm.v1.core.block_pool", "BlockPool", "free_blocks", "method",
             ("ordered_blocks",), SCHEDULER_DOOR, call_args=1),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "get_num_blocks_to_allocate", "method",
             ("request_id", "num_tokens", "new_computed_blocks"), SCHEDULER_DOOR,
             override=OUR_KV_MANAGER),
    *(
        Internal(SCHED_OUTPUT, "NewRequestData", name, "field", (), WORKER_ADAPTER)
        for name in ("req_id", "sampling_params", "block_ids", "num_computed_tokens",
                     "prompt_token_ids")
    ),
    *(
        Internal(SCHED_OUTPUT, "NewRequestData", name, "field", (), SCHEDULER_DOOR)
        for name in ("req_id", "prompt_token_ids", "sampling_params", "num_computed_tokens")
    ),
    Internal("vllm.v1.core.kv_cache_manager", "KVCacheManager", "coordinator", "attribute", (),
             SCHEDULER_DOOR),
    Internal("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator", "single_type_managers",
             "attribute", (), SCHEDULER_DOOR),
    Internal("vllm.config.vllm", "VllmConfig", "instance_id", "field", (),
             SCHEDULER_DOOR),
    # The scheduler's per-kind KV manager, subclassed.
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "_remove_blocks_in_range", "method",
             (), SCHEDULER_DOOR, call_args=3),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "remove_skipped_blocks", "method",
             ("request_id", "processed_computed_tokens"), SCHEDULER_DOOR,
             override=OUR_KV_MANAGER),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "__init__", "method",
             ("kv_cache_spec", "max_admission_blocks_per_request"), SCHEDULER_DOOR,
             override=OUR_KV_MANAGER),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "find_longest_cache_hit", "method", (),
             SCHEDULER_DOOR, override=OUR_KV_MANAGER),
    Internal(KV_MANAGER, "SingleTypeKVCacheManager", "req_to_blocks", "attribute", (),
             SCHEDULER_DOOR),
    Internal("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry", "_ensure_registered",
             "method", (), SCHEDULER_DOOR),
    # Elsewhere.
    Internal("vllm.v1.worker.cpu_worker", "CPUWorker", "init_device", "method", (),
             "worker.cpu_worker", override="vllm_sink.worker.cpu_worker:StreamingCPUWorker"),
    Internal("vllm.v1.worker.gpu_worker", "Worker", "_make_model_runner", "method", (),
             WORKER_ADAPTER, override="vllm_sink.worker.vllm_runner:V1GPUWorkerDoor"),
    *(
        Internal(f"vllm.v1.worker.{module}", worker, "determine_available_memory", "method",
                 (), "worker.streaming_worker",
                 override="vllm_sink.worker.streaming_worker:StreamingWorkerMixin")
        for module, worker in (("cpu_worker", "CPUWorker"), ("gpu_worker", "Worker"))
    ),
    Internal("vllm.v1.worker.gpu_worker", "Worker", "use_v2_model_runner", "attribute", (),
             WORKER_ADAPTER),
    *(
        Internal(f"vllm.v1.attention.backends.{module}", impl, "do_kv_cache_update", "method",
                 ("layer", "key", "value", "kv_cache", "slot_mapping"), WORKER_ADAPTER)
        for module, impl in (
            ("cpu_attn", "CPUAttentionBackendImpl"), ("flash_attn", "FlashAttentionImpl"),
            ("triton_attn", "TritonAttentionImpl"), ("flex_attention", "FlexAttentionImpl"),
        )
    ),
    Internal("vllm.v1.engine.input_processor", "InputProcessor", "process_inputs", "method",
             ("request_id", "prompt", "params"), "patches.default_max_tokens"),
    Internal("vllm.v1.engine.async_llm", "AsyncLLM", "shutdown", "method", (),
             "patches.shutdown_ends_streams"),
    Internal("vllm.v1.engine.async_llm", "AsyncLLM", "output_handler", "attribute", (),
             "patches.shutdown_ends_streams"),
    Internal("vllm.v1.engine.async_llm", "AsyncLLM", "output_processor", "attribute", (),
             "patches.shutdown_ends_streams"),
    Internal("vllm.v1.engine.output_processor", "OutputProcessor", "propagate_error", "method",
             ("e",), "patches.shutdown_ends_streams"),
    Internal("vllm.v1.engine.output_processor", "OutputProcessor", "has_unfinished_requests",
             "method", (), "patches.shutdown_ends_streams"),
    Internal("vllm.envs", "", "_is_envs_cache_enabled", "method", (), "frontend.vllm_frontend"),
    *(
        Internal("vllm.v1.engine", "EngineCoreRequest", name, "attribute", (),
                 "frontend.vllm_frontend")
        for name in ("sampling_params", "prompt_token_ids", "prompt_embeds")
    ),
    Internal("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbedding",
             "_compute_cos_sin_cache", "method", (), WORKER_ADAPTER),
    *(
        Internal("vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope",
                 "Phi3LongRoPEScaledRotaryEmbedding", name, "attribute", (), WORKER_ADAPTER)
        for name in ("long_short_cos_sin_cache", "use_long_rope",
                     "original_max_position_embeddings")
    ),
    Internal("vllm._custom_ops", "", "cpu_attn_reshape_and_cache", "method",
             ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa"),
             WORKER_ADAPTER),
)  # fmt: skip
