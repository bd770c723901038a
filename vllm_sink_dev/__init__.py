"""What the tests and benchmarks share, and the library does not ship.

* ``paths``: the checkout's model, text and results;
* ``reference``: an independent StreamingLLM in plain torch (the oracle);
* ``tiny_llama``: a small random-weight Llama checkpoint;
* ``engines``: in-process vLLM engines (stopping one so the next can start, a
  streaming one on the tiny Llama) and their inputs;
* ``stream_checks``: an engine's streams checked against the reference;
* ``eviction_checks``: a stream's evictions in a paged cache, checked key by key;
* ``kv_layouts``: vLLM's GPU backends' KV caches, allocated on CPU tensors;
* ``serve``: a real ``vllm serve`` subprocess and its ``/metrics``;
* ``soak_driver``: a soak of such a server by a mix of clients.

Importable from the checkout's root (``pythonpath`` in pytest's settings;
``benchmarks/common.py`` puts the root on ``sys.path``).
"""
