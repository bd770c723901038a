"""Checks of vllm-sink's contract with vLLM's internals (:mod:`vllm_sink.vllm_internals`).

Each entry must still be there with the parameter names we use; a method we
override must accept every call vLLM's signature allows (each positional
parameter by position and by name); a method we call must take the positional
arguments we pass; a tuple we return in its place must have the length vLLM's
annotation gives. The checks take vLLM's side as an ``inspect.Signature`` (and
its return annotation), so they run the same on the installed vLLM and on
another version's source read without importing it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re

from vllm_sink.vllm_internals import Internal

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def assigned_in(name: str) -> re.Pattern[str]:
    """Where a class's source sets attribute ``name`` on instances, or registers it as a buffer."""
    name = re.escape(name)
    return re.compile(rf"self\.{name}\s*(:[^=\n]*)?=[^=]|register_buffer\(\s*[\"']{name}[\"']")


def our_method(internal: Internal):
    """The method of ours that replaces vLLM's (``internal.override``)."""
    module, _, owner = internal.override.partition(":")
    return getattr(getattr(importlib.import_module(module), owner), internal.name)


def signature_problems(internal: Internal, theirs: inspect.Signature) -> list[str]:
    """What in vLLM's ``theirs`` our override, our calls or our tuples no longer fit."""
    problems = []
    where = f"{internal.owner}.{internal.name}{theirs}"
    missing = [p for p in internal.params if p not in theirs.parameters]
    if missing:
        problems.append(f"{where}: parameters {missing} are gone")
    if internal.override:
        ours = inspect.signature(our_method(internal))
        positional = [p for p in theirs.parameters.values() if p.kind in POSITIONAL]
        by_name = {
            p.name: None
            for p in list(theirs.parameters.values())[1:]
            if p.kind in (*POSITIONAL[1:], inspect.Parameter.KEYWORD_ONLY)
        }
        for how, call in (
            ("by position", lambda: ours.bind(*[None] * len(positional))),
            ("by name", lambda: ours.bind(None, **by_name)),
        ):
            try:
                call()
            except TypeError as error:
                problems.append(
                    f"{where}: our override {internal.override}.{internal.name}{ours} does "
                    f"not take every argument {how} ({error})"
                )
    if internal.call_args is not None:
        try:
            theirs.bind(None, *[None] * internal.call_args)
        except TypeError as error:
            problems.append(f"{where}: we pass {internal.call_args} arguments ({error})")
    if internal.returns is not None:
        length = tuple_length(theirs.return_annotation)
        if length != internal.returns:
            problems.append(
                f"{where}: we return a {internal.returns}-tuple, vLLM's annotation says "
                f"{theirs.return_annotation}"
            )
    return problems


def tuple_length(annotation) -> int | None:
    """The number of elements of a ``tuple[...]`` annotation (a string or a type)."""
    text = annotation if isinstance(annotation, str) else repr(annotation)
    try:
        node = ast.parse(text.replace("typing.", ""), mode="eval").body
    except SyntaxError:
        return None
    if isinstance(node, ast.Subscript) and getattr(node.value, "id", "") in ("tuple", "Tuple"):
        return len(node.slice.elts) if isinstance(node.slice, ast.Tuple) else 1
    return None
