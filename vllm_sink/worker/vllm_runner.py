"""The worker side's reads of vLLM's V1 model runner internals, in one place.

Reads of private state of ``GPUModelRunner`` (which ``CPUModelRunner``
subclasses), each behind a function here; every name they use is listed in
:mod:`vllm_sink.vllm_internals` and checked by ``tests/test_vllm_contract.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def seeded_generators(runner: Any) -> dict[int, torch.Generator]:
    """Batch row -> the request's own generator, for requests that set ``seed``."""
    return runner.input_batch.generators


def discarded_rows(runner: Any) -> list[int]:
    """Batch rows whose sample this step is dropped (prefill chunks that are not the last).

    Valid between ``_prepare_inputs`` (which fills the mask) and the end of the step.
    """
    num_reqs = runner.input_batch.num_reqs
    return [int(i) for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]]
