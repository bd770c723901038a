"""The compatibility radar's reading of vLLM's source (no import) agrees with the installed
vLLM, and names what another release breaks (``scripts/vllm_radar.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vllm_sink.vllm_internals import INTERNALS
from vllm_sink_dev.vllm_source import VllmSource, check_all

SCHEDULER = "vllm/v1/core/sched/scheduler.py"


@pytest.fixture(scope="module")
def installed() -> VllmSource:
    import vllm

    return VllmSource.from_directory(Path(vllm.__file__).parent)


def test_the_installed_vllm_read_as_source_fits_every_internal(installed):
    findings = check_all(installed, installed)
    assert len(findings) == len(INTERNALS)
    assert [f"{f.where}: {f.detail}" for f in findings if f.status != "same"] == []


def test_a_release_that_changes_what_we_rely_on_is_named(installed):
    files = dict(installed.files)
    # A new positional parameter our override does not take; a module deleted; a field dropped.
    files[SCHEDULER], n = re.subn(
        r"def _get_local_prefix_cache_hit\(\s*self,\s*request: Request",
        "def _get_local_prefix_cache_hit(self, request: Request, budget: int, more: int",
        files[SCHEDULER],
    )
    assert n == 1
    block_table = files.pop("vllm/v1/worker/block_table.py")
    files["vllm/v1/worker/tables.py"] = block_table
    output = "vllm/v1/core/sched/output.py"
    files[output] = files[output].replace("resumed_req_ids:", "resumed_ids:")
    findings = {f.where: f for f in check_all(VllmSource(files), installed)}

    hit = findings["vllm.v1.core.sched.scheduler.Scheduler._get_local_prefix_cache_hit"]
    assert hit.status == "breaks" and "does not take every argument by position" in hit.detail
    table = findings["vllm.v1.worker.block_table.BlockTable.block_table"]
    assert table.status == "gone" and "vllm.v1.worker.tables" in table.detail
    resumed = findings["vllm.v1.core.sched.output.CachedRequestData.resumed_req_ids"]
    assert resumed.status == "gone"
    changed = {w for w, f in findings.items() if f.status != "same"}
    assert changed == {hit.where, resumed.where} | {
        w for w in findings if w.startswith("vllm.v1.worker.block_table.")
    }


def test_a_field_declared_under_type_checking_is_still_there(installed):
    """vLLM 0.34 declares ``EngineCoreRequest.prompt_token_ids`` in ``if TYPE_CHECKING:`` /
    ``else:`` (one type for checkers, another at run time): the field is there."""
    files = dict(installed.files)
    engine = "vllm/v1/engine/__init__.py"
    files[engine], n = re.subn(
        r"\n    prompt_token_ids: list\[int\] \| None\n",
        "\n    if TYPE_CHECKING:\n        prompt_token_ids: list[int] | None\n"
        "    else:\n        prompt_token_ids: object\n",
        files[engine],
        count=1,
    )
    assert n == 1
    findings = {f.where: f for f in check_all(VllmSource(files), installed)}
    assert findings["vllm.v1.engine.EngineCoreRequest.prompt_token_ids"].status == "same"
