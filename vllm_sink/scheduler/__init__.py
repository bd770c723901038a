"""The engine core's side: the KV cache spec and manager of streaming layers.

Registered in vLLM's ``KVCacheSpecRegistry``; vLLM's own scheduler and block
pool do the rest (``kv_cache``).
"""
