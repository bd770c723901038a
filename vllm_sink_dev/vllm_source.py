"""vLLM's Python source read without importing it: the contract checked against any release.

A release's wheel needs its own torch and compiled extensions to import; its
Python source does not. :class:`VllmSource` finds each entry of
:data:`vllm_sink.vllm_internals.INTERNALS` in the source with :mod:`ast`
(classes followed through their bases and re-exports), and :func:`check`
holds it to the same rules as the test of the installed vLLM
(:func:`vllm_sink_dev.contract.signature_problems`).
"""

from __future__ import annotations

import ast
import inspect
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from vllm_sink.vllm_internals import INTERNALS, Internal
from vllm_sink_dev.contract import assigned_in, signature_problems


@dataclass(frozen=True)
class Finding:
    internal: Internal
    status: str
    """``same``; ``differs`` (its signature changed from the baseline's, and still fits us);
    ``breaks`` (there, but no longer fits us); ``gone``."""
    detail: str = ""

    @property
    def where(self) -> str:
        i = self.internal
        return f"{i.module}.{i.owner + '.' if i.owner else ''}{i.name}"


class VllmSource:
    """The ``vllm/**.py`` files of one release, by path (``vllm/v1/request.py``)."""

    def __init__(self, files: Mapping[str, str]) -> None:
        self.files = dict(files)
        self._trees: dict[str, ast.Module] = {}

    @classmethod
    def from_wheel(cls, wheel: Path) -> VllmSource:
        with zipfile.ZipFile(wheel) as archive:
            return cls(
                {
                    name: archive.read(name).decode("utf-8", "replace")
                    for name in archive.namelist()
                    if name.startswith("vllm/") and name.endswith(".py")
                }
            )

    @classmethod
    def from_directory(cls, package: Path) -> VllmSource:
        """``package``: the ``vllm`` directory of an installed release."""
        return cls(
            {
                f"vllm/{path.relative_to(package).as_posix()}": path.read_text("utf-8", "replace")
                for path in package.rglob("*.py")
            }
        )

    # ------------------------------------------------------------ modules, classes
    def tree(self, module: str) -> ast.Module | None:
        base = module.replace(".", "/")
        for path in (f"{base}.py", f"{base}/__init__.py"):
            if path in self.files:
                if path not in self._trees:
                    self._trees[path] = ast.parse(self.files[path])
                return self._trees[path]
        return None

    def find_class(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef] | None:
        """The class ``name`` defined in ``module`` or imported there (a re-export)."""
        tree = self.tree(module)
        if tree is None or depth > 5:
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return module, node
        source = self._imported_from(module, tree, name)
        return None if source is None else self.find_class(source, name, depth + 1)

    def class_chain(self, module: str, cls: ast.ClassDef) -> Iterator[tuple[str, ast.ClassDef]]:
        """``cls`` and then its bases, depth first, as far as the source resolves them."""
        seen: set[tuple[str, str]] = set()
        stack = [(module, cls)]
        while stack:
            module, cls = stack.pop(0)
            if (module, cls.name) in seen:
                continue
            seen.add((module, cls.name))
            yield module, cls
            tree = self.tree(module)
            for base in cls.bases:
                if isinstance(base, ast.Subscript):  # Generic[T], Base[T]
                    base = base.value
                found = None
                if isinstance(base, ast.Name):
                    found = self.find_class(module, base.id)
                elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
                    alias = self._module_alias(tree, base.value.id)
                    found = None if alias is None else self.find_class(alias, base.attr)
                if found is not None:
                    stack.append(found)

    def _imported_from(self, module: str, tree: ast.Module, name: str) -> str | None:
        package = module if self._is_package(module) else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(
                (a.asname or a.name) == name and a.name == name for a in node.names
            ):
                if node.level == 0:
                    return node.module
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                return f"{base}.{node.module}" if node.module else base
        return None

    def _module_alias(self, tree: ast.Module | None, alias: str) -> str | None:
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (a.asname or a.name) == alias:
                        return a.name
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                for a in node.names:
                    if (a.asname or a.name) == alias:
                        return f"{node.module}.{a.name}"
        return None

    def _is_package(self, module: str) -> bool:
        return f"{module.replace('.', '/')}/__init__.py" in self.files

    # ------------------------------------------------------------------ lookups
    def function(self, internal: Internal) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        for body in self._bodies(internal):
            for node in body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    if node.name == internal.name:
                        return node
        return None

    def has_field(self, internal: Internal) -> bool:
        return any(
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == internal.name
            for body in self._bodies(internal)
            for node in class_statements(body)
        )

    def has_attribute(self, internal: Internal) -> bool:
        """Set on instances (``self.name = ...``), a buffer, a class attribute or a property."""
        assigned = assigned_in(internal.name)
        for module, cls in self._chain(internal):
            if assigned.search(ast.get_source_segment(self._text(module), cls) or ""):
                return True
            for node in class_statements(cls.body):
                targets = (
                    [node.target]
                    if isinstance(node, ast.AnnAssign)
                    else node.targets
                    if isinstance(node, ast.Assign)
                    else []
                )
                if any(isinstance(t, ast.Name) and t.id == internal.name for t in targets):
                    return True
                if isinstance(node, ast.FunctionDef) and node.name == internal.name:
                    return True
        return False

    def defined_elsewhere(self, internal: Internal) -> list[str]:
        """Modules that define a class (or, for module functions, a function) of the name."""
        name = internal.owner or internal.name
        pattern = re.compile(rf"^\s*(class|def)\s+{re.escape(name)}\b", re.M)
        return sorted(
            path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            for path, text in self.files.items()
            if pattern.search(text)
        )

    def _chain(self, internal: Internal) -> list[tuple[str, ast.ClassDef]]:
        found = self.find_class(internal.module, internal.owner)
        return [] if found is None else list(self.class_chain(*found))

    def _bodies(self, internal: Internal) -> list[list[ast.stmt]]:
        if not internal.owner:
            tree = self.tree(internal.module)
            return [] if tree is None else [tree.body]
        return [cls.body for _, cls in self._chain(internal)]

    def _text(self, module: str) -> str:
        base = module.replace(".", "/")
        return self.files.get(f"{base}.py") or self.files.get(f"{base}/__init__.py", "")


class _Code(str):
    """A default value as its source text (shown unquoted in a signature)."""

    def __repr__(self) -> str:
        return str(self)


def signature_of(node: ast.FunctionDef | ast.AsyncFunctionDef) -> inspect.Signature:
    """The parameters (names, kinds, whether defaulted) and the return annotation's text."""
    args = node.args
    kind = inspect.Parameter
    params: list[inspect.Parameter] = []
    positional = [*args.posonlyargs, *args.args]
    defaults: list = [inspect.Parameter.empty] * (len(positional) - len(args.defaults))
    defaults += [_Code(ast.unparse(d)) for d in args.defaults]
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        how = kind.POSITIONAL_ONLY if i < len(args.posonlyargs) else kind.POSITIONAL_OR_KEYWORD
        params.append(kind(arg.arg, how, default=default))
    if args.vararg is not None:
        params.append(kind(args.vararg.arg, kind.VAR_POSITIONAL))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params.append(
            kind(
                arg.arg,
                kind.KEYWORD_ONLY,
                default=kind.empty if default is None else _Code(ast.unparse(default)),
            )
        )
    if args.kwarg is not None:
        params.append(kind(args.kwarg.arg, kind.VAR_KEYWORD))
    returns = ast.unparse(node.returns) if node.returns is not None else inspect.Signature.empty
    return inspect.Signature(params, return_annotation=returns)


def check(source: VllmSource, internal: Internal, baseline: VllmSource | None = None) -> Finding:
    """Whether ``internal`` is in ``source`` as vllm-sink relies on it; with a ``baseline``
    (the release vllm-sink runs on), whether a method's signature changed from it."""
    if source.tree(internal.module) is None:
        return Finding(internal, "gone", f"no module {internal.module}" + _hint(source, internal))
    if internal.owner and source.find_class(internal.module, internal.owner) is None:
        return Finding(
            internal, "gone", f"no class {internal.owner} in it" + _hint(source, internal)
        )
    if internal.kind == "field":
        found = source.has_field(internal)
        return Finding(internal, "same") if found else Finding(internal, "gone", "no such field")
    if internal.kind == "attribute":
        if source.has_attribute(internal):
            return Finding(internal, "same")
        return Finding(internal, "gone", "no longer set on instances")
    node = source.function(internal)
    if node is None:
        return Finding(internal, "gone", "no such method" + _hint(source, internal))
    theirs = signature_of(node)
    problems = signature_problems(internal, theirs)
    if problems:
        return Finding(internal, "breaks", "; ".join(problems))
    before = None if baseline is None else baseline.function(internal)
    if before is not None and signature_of(before) != theirs:
        return Finding(internal, "differs", f"was {signature_of(before)}, is {theirs}; ours fits")
    return Finding(internal, "same")


def _hint(source: VllmSource, internal: Internal) -> str:
    elsewhere = [m for m in source.defined_elsewhere(internal) if m != internal.module]
    name = internal.owner or internal.name
    return f" ({name} is defined in {', '.join(elsewhere)})" if elsewhere else ""


def check_all(source: VllmSource, baseline: VllmSource | None = None) -> list[Finding]:
    return [check(source, internal, baseline) for internal in INTERNALS]


def class_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """A class body's statements, those under ``if`` / ``else`` included (``if
    TYPE_CHECKING:`` declares a field's type one way and the runtime another)."""
    statements = []
    for node in body:
        statements.append(node)
        if isinstance(node, ast.If):
            statements += class_statements(node.body) + class_statements(node.orelse)
    return statements
