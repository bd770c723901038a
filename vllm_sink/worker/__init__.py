"""The worker's side: the streaming worker and model runner, set through ``worker_cls``.

* ``cpu_worker``, ``gpu_worker``: the workers vLLM starts (CPU; CUDA, experimental);
  ``streaming_worker``: what both add to vLLM's (the config they see, start-up checks);
* ``model_runner``: evictions and each stream's compact view, around vLLM's V1 runner;
  ``startup``: what it checks and builds once (KV specs, the model, the cache);
  ``streams``: the streams it holds, and ``min_tokens`` over each whole stream;
* ``snapshot_vault``, ``kv_pages``, ``snapshot_writer``: snapshots' blocks copied,
  spilled to host memory and written to disk;
* ``min_tokens``, ``seeded_sampling``: the runner's pieces that replace one piece of
  vLLM's behaviour each;
* ``eviction``: carrying out an eviction in the paged cache, backend-independent;
* ``cpu_attn_layout``: where the CPU_ATTN backend keeps each key and value;
  ``gpu_kv_layout``: the same for the GPU backends (their one logical view, any
  ``KVCacheLayout``, scheduler blocks over several kernel blocks);
* ``self_check``: the start-up check that a re-rotation in the cache is right;
* ``vllm_runner``: the worker side's one door to vLLM's internals (the V1 runner's
  steps, its batch and request state, the workers' runner classes, the model's rotary
  tables and cache writes), and the one place a stream's view is written into them
  (see ``vllm_internals``).
"""
