"""One door per side: only ``scheduler/vllm_scheduler.py``, ``worker/vllm_runner.py`` and
``frontend/vllm_frontend.py`` touch vLLM's internals, and only those listed in
:mod:`vllm_sink.vllm_internals` (:mod:`vllm_sink_dev.doors`; patches live in ``patches/``)."""

from __future__ import annotations

import ast

from vllm_sink_dev.doors import DOORS, modules, outside_the_doors, unlisted_in_the_doors


def test_only_the_doors_touch_vllm_internals():
    touches = outside_the_doors()
    assert not touches, "vLLM internals touched outside the doors:\n" + "\n".join(map(str, touches))


def test_the_doors_touch_only_listed_internals():
    touches = unlisted_in_the_doors()
    assert not touches, "\n".join(map(str, touches))


def test_every_door_exists():
    found = {module for module, _ in modules()}
    assert set(DOORS) <= found


def test_a_module_that_reaches_past_its_door_is_named():
    source = ast.parse(
        "from vllm.v1.core.block_pool import BlockPool\n"
        "from vllm.logger import init_logger\n"
        "def blocks(manager, request_id):\n"
        "    return manager.req_to_blocks[request_id], manager._remove_blocks_in_range\n"
    )
    door = ast.parse("def free(manager):\n    manager._not_listed_anywhere()\n")
    sources = [("scheduler/new.py", source), ("scheduler/vllm_scheduler.py", door)]
    assert [str(t) for t in outside_the_doors(sources)] == [
        "vllm_sink/scheduler/new.py:1: imports vllm.v1.core.block_pool",
        "vllm_sink/scheduler/new.py:4: touches vLLM's _remove_blocks_in_range",
        "vllm_sink/scheduler/new.py:4: touches vLLM's req_to_blocks",
    ]
    assert [str(t) for t in unlisted_in_the_doors(sources)] == [
        "vllm_sink/scheduler/vllm_scheduler.py:2: touches _not_listed_anywhere, "
        "not in vllm_internals"
    ]
