"""Diagrams and tables drawn from a machine's spec: Mermaid, Graphviz DOT, Markdown.

Text only (no graphviz dependency). Implicit edges (peer closed, frame too long, timed out,
protocol error, handler error) are drawn dashed to the terminal ``closed`` state, so the
picture is the whole table the runner executes.
"""

from __future__ import annotations

from typing import Any

from .machine import CLOSED, Machine, Spec

__all__ = ["spec_of", "to_mermaid", "to_dot", "to_table", "render", "FORMATS"]


def spec_of(machine: Any) -> Spec:
    """The spec of a machine class, instance or ``functools.partial`` of a class."""
    if isinstance(machine, Spec):
        return machine
    target = getattr(machine, "func", machine)  # functools.partial
    if not isinstance(target, type):
        target = type(target)
    spec = getattr(target, "spec", None)
    if not isinstance(spec, Spec) or not issubclass(target, Machine):
        raise TypeError(f"{machine!r} is not a machine class")
    return spec


def _merged(spec: Spec, implicit: bool) -> dict[tuple[str, str, bool], list[str]]:
    """(source, target, implicit) -> labels, in table order."""
    merged: dict[tuple[str, str, bool], list[str]] = {}
    for e in spec.edges:
        if e.implicit and not implicit:
            continue
        label = e.event if e.implicit or not e.handler else f"{e.event} / {e.handler}"
        merged.setdefault((e.source, e.target, e.implicit), []).append(label)
    return merged


def to_mermaid(machine: Any, *, implicit: bool = True) -> str:
    spec = spec_of(machine)
    lines = ["stateDiagram-v2", f"    [*] --> {spec.initial.name}"]
    for st in spec.states.values():
        desc = (
            st.framing.describe()
            if st.framing is not None
            else ("final" if st.final else "no input")
        )
        if st.timeout is not None:
            desc += f", timeout {st.timeout:g}s"
        lines.append(f"    {st.name} : {st.name} — {desc}")
    has_closed = False
    for (src, dst, _implicit), labels in _merged(spec, implicit).items():
        target = CLOSED if dst == CLOSED else dst
        has_closed |= dst == CLOSED
        lines.append(f"    {src} --> {target} : {', '.join(labels)}")
    for st in spec.states.values():
        if st.final:
            lines.append(f"    {st.name} --> [*]")
    if has_closed:
        lines.append(f"    {CLOSED} --> [*]")
    return "\n".join(lines) + "\n"


def _dot_id(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


def to_dot(machine: Any, *, implicit: bool = True) -> str:
    spec = spec_of(machine)
    lines = [
        f"digraph {_dot_id(spec.name)} {{",
        "    rankdir=LR;",
        "    node [shape=box, style=rounded];",
    ]
    lines.append('    "__start" [shape=point];')
    lines.append(f'    "__start" -> {_dot_id(spec.initial.name)};')
    for st in spec.states.values():
        desc = (
            st.framing.describe()
            if st.framing is not None
            else ("final" if st.final else "no input")
        )
        if st.timeout is not None:
            desc += f"\\ntimeout {st.timeout:g}s"
        shape = ", peripheries=2" if st.final else ""
        lines.append(f'    {_dot_id(st.name)} [label="{st.name}\\n{desc}"{shape}];')
    merged = _merged(spec, implicit)
    if any(dst == CLOSED for _, dst, _ in merged):
        lines.append(f"    {_dot_id(CLOSED)} [shape=doublecircle];")
    for (src, dst, imp), labels in merged.items():
        style = ", style=dashed" if imp else ""
        label = "\\n".join(labels).replace('"', '\\"')
        lines.append(f'    {_dot_id(src)} -> {_dot_id(dst)} [label="{label}"{style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_table(machine: Any, *, implicit: bool = True) -> str:
    spec = spec_of(machine)
    rows = ["| state | event | handler | to |", "| --- | --- | --- | --- |"]
    for e in spec.edges:
        if e.implicit and not implicit:
            continue
        rows.append(f"| {e.source} | {e.event} | {e.handler or '(implicit)'} | {e.target} |")
    states = ["| state | waits for | timeout | notes |", "| --- | --- | --- | --- |"]
    for st in spec.states.values():
        desc = (
            st.framing.describe()
            if st.framing is not None
            else ("— (final)" if st.final else "nothing (not reading)")
        )
        notes = ("initial. " if st.initial else "") + (st.doc or "")
        states.append(
            f"| {st.name} | {desc} | {'' if st.timeout is None else f'{st.timeout:g} s'} | {notes.strip()} |"
        )
    return "\n".join(states) + "\n\n" + "\n".join(rows) + "\n"


FORMATS = {"mermaid": to_mermaid, "dot": to_dot, "table": to_table}


def render(machine: Any, fmt: str = "mermaid") -> str:
    try:
        fn = FORMATS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown diagram format {fmt!r}; choose from {', '.join(FORMATS)}"
        ) from None
    return fn(machine)
