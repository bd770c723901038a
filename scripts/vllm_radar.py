"""What a vLLM release changes under vllm-sink: ``python scripts/vllm_radar.py 0.34.0``.

Fetches the release's wheel without its dependencies (``pip download --no-deps``,
kept in ``--cache``), reads its Python source without importing it, and checks
every entry of ``vllm_sink/vllm_internals.py`` against it by the rules
``tests/test_vllm_contract.py`` applies to the installed vLLM
(:mod:`vllm_sink_dev.vllm_source`). Prints what changed from the installed vLLM
and which vllm-sink module relies on it; exits 1 when something breaks or is gone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_sink.vllm_internals import INTERNALS  # noqa: E402
from vllm_sink_dev.vllm_source import Finding, VllmSource, check_all  # noqa: E402

CACHE = Path.home() / ".cache" / "vllm-sink-radar"


def wheel(version: str, cache: Path) -> Path:
    folder = cache / version
    found = sorted(folder.glob("vllm-*.whl"))
    if not found:
        print(f"fetching vllm=={version} (its wheel only) into {folder}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--dest", str(folder), f"vllm=={version}"],
            check=True,
        )  # fmt: skip
        found = sorted(folder.glob("vllm-*.whl"))
    return found[-1]


def report(version: str, findings: list[Finding], baseline: str) -> str:
    counts = Counter(f.status for f in findings)
    lines = [
        f"vLLM {version} against vllm-sink's {len(INTERNALS)} vLLM internals "
        f"(baseline: vLLM {baseline}): "
        + ", ".join(f"{counts[s]} {s}" for s in ("same", "differs", "breaks", "gone"))
    ]
    by_user: dict[str, list[Finding]] = defaultdict(list)
    for finding in findings:
        if finding.status != "same":
            by_user[finding.internal.used_by].append(finding)
    for user in sorted(by_user):
        lines.append(f"  vllm_sink.{user}:")
        alike: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
        for f in by_user[user]:  # one line for the names of a class gone for the same reason
            i = f.internal
            alike[f.status, i.module, i.owner, f.detail].append(i.name)
        for (status, module, owner, detail), names in alike.items():
            owner = f"{module}.{owner}." if owner else f"{module}."
            named = names[0] if len(names) == 1 else "{" + ", ".join(names) + "}"
            lines.append(f"    {status:7} {owner}{named}: {detail}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="vLLM releases, e.g. 0.33.0 0.34.0")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where wheels are kept")
    args = parser.parse_args()

    import vllm

    installed = VllmSource.from_directory(Path(vllm.__file__).parent)
    failed = False
    for version in args.versions:
        findings = check_all(VllmSource.from_wheel(wheel(version, args.cache)), installed)
        print(report(version, findings, vllm.__version__))
        failed |= any(f.status in ("breaks", "gone") for f in findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
