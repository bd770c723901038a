"""The worker side's reads of vLLM's V1 model runner internals, in one place.

Private names of ``GPUModelRunner`` (which ``CPUModelRunner`` subclasses) that
vllm-sink relies on, each behind a function here, so that porting to another
vLLM release starts by reading this file. ``tests/test_vllm_contract.py``
checks that every name listed in :data:`RUNNER_ATTRIBUTES` still exists.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

RUNNER_METHODS = ("_sample", "_bookkeeping_sync", "_update_states", "_prepare_inputs")
"""Runner methods the streaming runner overrides (``vllm.v1.worker.gpu_model_runner``)."""

RUNNER_ATTRIBUTES = ("discard_request_mask", "input_batch", "requests", "positions")
"""Runner attributes set in ``GPUModelRunner.__init__`` that vllm-sink reads."""

INPUT_BATCH_ATTRIBUTES = ("generators", "num_reqs", "req_ids", "req_id_to_index")
"""``InputBatch`` attributes (``vllm.v1.worker.gpu_input_batch``) that vllm-sink reads."""


def seeded_generators(runner: Any) -> dict[int, torch.Generator]:
    """Batch row -> the request's own generator, for requests that set ``seed``."""
    return runner.input_batch.generators


def discarded_rows(runner: Any) -> list[int]:
    """Batch rows whose sample this step is dropped (prefill chunks that are not the last).

    Valid between ``_prepare_inputs`` (which fills the mask) and the end of the step.
    """
    num_reqs = runner.input_batch.num_reqs
    return [int(i) for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]]
