"""The benchmark result files: each says where its figures come from, and the READMEs agree.

A figure is only as good as what it was measured on: every file under
``benchmarks/results`` records its commit, command, machine, threads and the
vLLM and torch versions; the READMEs link only files that exist, and the
Measured table's commit column is the commit its files record.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from vllm_sink_dev.paths import REPO

RESULTS = REPO / "benchmarks" / "results"
PROVENANCE = ("commit", "command", "machine", "threads", "vllm", "torch")
COMMIT = re.compile(r"^([0-9a-f]{7,40})(-dirty)?$")
RESULT_FILES = sorted(RESULTS.glob("*.json"))


def recorded_commit(path) -> str:
    match = COMMIT.match(json.loads(path.read_text()).get("commit", ""))
    assert match, f"{path.name}: no commit recorded"
    return match.group(1)


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.stem)
def test_every_result_file_records_where_its_figures_come_from(path):
    result = json.loads(path.read_text())
    missing = [key for key in PROVENANCE if not result.get(key)]
    assert not missing, f"{path.name} lacks {missing}"
    commit = recorded_commit(path)
    if git("rev-parse", "--is-shallow-repository").stdout.strip() == "false":
        assert git("cat-file", "-e", f"{commit}^{{commit}}").returncode == 0, (
            f"{path.name}: commit {commit} is not in this repository's history"
        )


def test_every_plot_has_its_result_file():
    orphans = [p.name for p in RESULTS.glob("*.png") if not p.with_suffix(".json").exists()]
    assert not orphans


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md"])
def test_the_readmes_link_only_result_files_that_exist(readme):
    text = (REPO / readme).read_text()
    linked = set(re.findall(r"results/([\w.-]+\.(?:json|png))", text))
    assert linked, f"{readme} links no result file"
    assert not sorted(name for name in linked if not (RESULTS / name).exists())


def measured_rows() -> list[list[str]]:
    """The cells of each row of the README's Measured table."""
    text = (REPO / "README.md").read_text()
    table = text.split("\n## Measured", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split(" | ") for line in table.splitlines()]
    return [cells for cells in rows if len(cells) == 4 and cells[0] != "what"]  # not the header


def test_the_measured_tables_commits_are_those_its_result_files_record():
    checked = 0
    for what, result, command, commit in measured_rows():
        named = set(re.findall(r"results/([\w-]+)\.(?:json|png)", result + command))
        named |= set(re.findall(r"--name ([\w-]+)", command))
        claimed = COMMIT.match(commit.split()[0])
        if not named or not claimed:
            continue
        for stem in named:
            assert recorded_commit(RESULTS / f"{stem}.json") == claimed.group(1), (what, stem)
            checked += 1
    assert checked >= 5
