"""The engine core's side: the scheduler and the KV cache of streaming layers.

* ``kv_cache``: the KV cache spec and manager of a streaming layer group,
  registered in vLLM's ``KVCacheSpecRegistry``; vLLM's block pool does the rest;
* ``scheduler``: vLLM's scheduler, set through ``scheduler_cls``, publishing
  the streaming figures for ``/metrics`` once per step;
* ``vllm_scheduler``: the side's one door to vLLM's internals: the base classes
  that turn vLLM's calls into our hooks, and reads of its private state (see
  ``vllm_internals``).
"""
