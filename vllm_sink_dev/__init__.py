"""What the tests and benchmarks share, and the library does not ship.

* ``paths``: the checkout's model, text and results;
* ``reference``: an independent StreamingLLM in plain torch (the oracle);
* ``tiny_llama``: a small random-weight Llama checkpoint;
* ``engines``: stopping an in-process vLLM engine so the next can start;
* ``serve``: a real ``vllm serve`` subprocess and its ``/metrics``.

Importable from the checkout's root (``pythonpath`` in pytest's settings;
``benchmarks/common.py`` puts the root on ``sys.path``).
"""
