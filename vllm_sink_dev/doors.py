"""One door per side: which modules of vllm-sink may touch vLLM's internals, and who does.

vLLM's plugin hooks (``scheduler_cls``, ``worker_cls``, the KV-spec registry,
logits processors, ``additional_config``) are public: any module may use the
modules that define them. What they do not cover goes through one module per
side (:data:`DOORS`), or a patch (``patches/``, each naming its target). A
module elsewhere that touches a vLLM internal is found statically:

* it imports a vLLM module other than :data:`HOOK_MODULES`;
* it names a private name (``_x``) of :data:`vllm_sink.vllm_internals.INTERNALS`;
* it reads or overrides a listed name that vllm-sink's own code does not also
  define (``req_to_blocks``, ``kv_cache_manager``: names only vLLM's objects have).

A door that touches a private vLLM name missing from the list is found too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vllm_sink.vllm_internals import INTERNALS

PACKAGE = Path(__file__).resolve().parent.parent / "vllm_sink"
DOORS = (
    "scheduler/vllm_scheduler.py",
    "worker/vllm_runner.py",
    "frontend/vllm_frontend.py",
)
"""The scheduler side's, the worker side's and the start-up side's door (paths in the package)."""
HOOK_MODULES = (
    "vllm",
    "vllm.config",
    "vllm.distributed",
    "vllm.engine.arg_utils",
    "vllm.envs",
    "vllm.logger",
    "vllm.model_executor.layers.attention",
    "vllm.platforms",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.engine",
    "vllm.v1.kv_cache_interface",
    "vllm.v1.kv_cache_spec_registry",
    "vllm.v1.sample.logits_processor",
    "vllm.v1.worker.cpu_worker",
    "vllm.v1.worker.gpu_worker",
)
"""vLLM modules of public API and plugin hooks: engine arguments, the config, the logger, the
platform, the scheduler and worker classes ``scheduler_cls`` / ``worker_cls`` name, KV cache
specs and their registry, logits processors."""


@dataclass(frozen=True)
class Touch:
    module: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"vllm_sink/{self.module}:{self.line}: {self.what}"


Sources = list[tuple[str, ast.Module]]
"""Modules by their path in the package, parsed."""


def modules() -> Sources:
    return [
        (str(path.relative_to(PACKAGE)), ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def names_touched(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Attribute names read or written, and methods defined, with their lines."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.lineno, node.name


def vllm_imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "vllm" or alias.name.startswith("vllm."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "vllm" or node.module.startswith("vllm."):
                for alias in node.names:
                    private = alias.name.startswith("_")
                    yield node.lineno, f"{node.module}.{alias.name}" if private else node.module


def names_we_define(sources: Sources) -> set[str]:
    """Names vllm-sink's own code outside the doors defines: functions, classes, their
    parameters, annotated fields and keyword arguments."""
    defined: set[str] = set()
    for module, tree in sources:
        if module in DOORS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined.add(node.name)
                if not isinstance(node, ast.ClassDef):
                    defined.update(a.arg for a in node.args.args + node.args.kwonlyargs)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined.add(node.target.id)
            elif isinstance(node, ast.keyword) and node.arg:
                defined.add(node.arg)
    return defined


def outside_the_doors(sources: Sources | None = None) -> list[Touch]:
    """Every touch of a vLLM internal by a module of the package that is not a door."""
    sources = modules() if sources is None else sources
    listed = {internal.name for internal in INTERNALS}
    private = {name for name in listed if name.startswith("_") and not name.startswith("__")}
    only_vllm = listed - private - names_we_define(sources) - {"__init__"}
    touches = []
    for module, tree in sources:
        if module in DOORS:
            continue
        for line, name in vllm_imports(tree):
            if name not in HOOK_MODULES:
                touches.append(Touch(module, line, f"imports {name}"))
        for line, name in names_touched(tree):
            if name in private or name in only_vllm:
                touches.append(Touch(module, line, f"touches vLLM's {name}"))
    return sorted(touches, key=lambda t: (t.module, t.line, t.what))


def unlisted_in_the_doors(sources: Sources | None = None) -> list[Touch]:
    """Private attribute names a door touches that are neither listed nor the door's own."""
    sources = modules() if sources is None else sources
    listed = {internal.name for internal in INTERNALS}
    touches = []
    for module, tree in sources:
        if module not in DOORS:
            continue
        own = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }
        for line, name in names_touched(tree):
            if name.startswith("_") and not name.startswith("__") and name not in listed | own:
                touches.append(Touch(module, line, f"touches {name}, not in vllm_internals"))
    return sorted(touches, key=lambda t: (t.module, t.line, t.what))
