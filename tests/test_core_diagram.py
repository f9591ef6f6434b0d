"""Diagrams drawn from a machine's spec contain every edge, explicit and implicit, and no other."""

from __future__ import annotations

import functools
import re

import attrs
import pytest

from statemux import (
    Exact,
    Frame,
    FrameTooLong,
    Line,
    Machine,
    Opened,
    PeerClosed,
    State,
    TimedOut,
    TimerFired,
)
from statemux.diagram import render, spec_of, to_dot, to_mermaid, to_table

pytestmark = pytest.mark.timeout(10)


@attrs.define
class Door(Machine):
    """A sample with self-loops, several targets, a timeout, a final state and a state that
    does not read."""

    size: int = 0

    idle = State(Line(max_length=80), initial=True, timeout=60, doc="waiting for a command")
    payload = State(Exact("size", max_size=4096), timeout=5)
    pausing = State(doc="waiting for a timer")
    gone = State(final=True)

    @idle.on(Opened, to=idle)
    def hello(self, event: Opened) -> None: ...

    @idle.on(Frame, to=(idle, payload, pausing, gone))
    def command(self, line: bytes) -> str:
        return "idle"

    @idle.on(TimedOut, to=gone)
    def bored(self, event: TimedOut) -> None: ...

    @payload.on(Frame, to=idle)
    def body(self, data: bytes) -> None: ...

    @payload.on(FrameTooLong, to=idle)
    def too_big(self, exc: FrameTooLong) -> None: ...

    @pausing.on(TimerFired, to=(idle, pausing))
    def resume(self, event: TimerFired) -> str:
        return "idle"

    @pausing.on(PeerClosed, to=gone)
    def left(self, event: PeerClosed) -> None: ...


def expected_edges(machine: type[Machine]) -> set[tuple[str, str, str, bool]]:
    """(source, target, label, implicit) for every edge of the spec."""
    return {
        (e.source, e.target, e.event if e.implicit else f"{e.event} / {e.handler}", e.implicit)
        for e in machine.spec.edges
    }


MERMAID_EDGE = re.compile(r"^    (\w+) --> (\w+) : (.+)$")
DOT_EDGE = re.compile(r'^    "(\w+)" -> "(\w+)" \[label="(.*?)"(, style=dashed)?\];$')


def mermaid_edges(text: str) -> set[tuple[str, str, str]]:
    found = set()
    for line in text.splitlines():
        m = MERMAID_EDGE.match(line)
        if m:
            for label in m.group(3).split(", "):
                found.add((m.group(1), m.group(2), label))
    return found


def dot_edges(text: str) -> set[tuple[str, str, str, bool]]:
    found = set()
    for line in text.splitlines():
        m = DOT_EDGE.match(line)
        if m:
            for label in m.group(3).split("\\n"):
                found.add((m.group(1), m.group(2), label, m.group(4) is not None))
    return found


def test_the_sample_has_edges_of_every_kind() -> None:
    edges = expected_edges(Door)
    assert ("idle", "idle", "frame / command", False) in edges
    assert ("idle", "gone", "timed out / bored", False) in edges
    assert ("payload", "closed", "timed out", True) in edges
    assert ("pausing", "closed", "handler error", True) in edges
    assert not any(s == "pausing" and lbl == "frame too long" for s, _, lbl, _ in edges)
    assert len(edges) == len(Door.spec.edges)


def test_mermaid_contains_every_edge_and_no_other() -> None:
    text = to_mermaid(Door)
    assert text.startswith("stateDiagram-v2\n    [*] --> idle\n")
    assert mermaid_edges(text) == {(s, t, lbl) for s, t, lbl, _ in expected_edges(Door)}
    assert "    gone --> [*]" in text.splitlines()
    assert "    closed --> [*]" in text.splitlines()
    for name in Door.spec.states:
        assert any(line.startswith(f"    {name} : {name}") for line in text.splitlines())


def test_mermaid_without_implicit_edges() -> None:
    text = to_mermaid(Door, implicit=False)
    explicit = {(s, t, lbl) for s, t, lbl, imp in expected_edges(Door) if not imp}
    assert mermaid_edges(text) == explicit
    assert "--> closed" not in text and "closed --> [*]" not in text


def test_dot_contains_every_edge_implicit_ones_dashed() -> None:
    text = to_dot(Door)
    assert text.startswith('digraph "Door" {\n')
    assert text.rstrip().endswith("}")
    assert dot_edges(text) == expected_edges(Door)
    assert '    "__start" -> "idle";' in text.splitlines()
    assert '    "closed" [shape=doublecircle];' in text.splitlines()
    assert any(
        line.startswith('    "gone" [') and "peripheries=2" in line for line in text.splitlines()
    )


def test_dot_without_implicit_edges() -> None:
    text = to_dot(Door, implicit=False)
    assert dot_edges(text) == {e for e in expected_edges(Door) if not e[3]}
    assert '"closed"' not in text


def test_state_descriptions_show_framing_and_timeout() -> None:
    mermaid = to_mermaid(Door)
    assert "    idle : idle — line ≤ 80 B, timeout 60s" in mermaid.splitlines()
    assert "    payload : payload — exactly size B (≤ 4096), timeout 5s" in mermaid.splitlines()
    assert "    pausing : pausing — no input" in mermaid.splitlines()
    assert "    gone : gone — final" in mermaid.splitlines()


def test_the_markdown_table_lists_every_edge() -> None:
    text = to_table(Door)
    rows = {
        tuple(cell.strip() for cell in line.strip("|").split("|"))
        for line in text.splitlines()
        if line.startswith("| ") and line.count("|") == 5
    }
    for e in Door.spec.edges:
        assert (e.source, e.event, e.handler or "(implicit)", e.target) in rows
    assert "| idle | line ≤ 80 B | 60 s | initial. waiting for a command |" in text


def test_render_dispatches_by_format_and_names_the_choices() -> None:
    assert render(Door, "mermaid") == to_mermaid(Door)
    assert render(Door, "dot") == to_dot(Door)
    assert render(Door, "table") == to_table(Door)
    with pytest.raises(
        ValueError, match="^unknown diagram format 'svg'; choose from mermaid, dot, table$"
    ):
        render(Door, "svg")


def test_spec_of_accepts_classes_instances_and_partials() -> None:
    assert spec_of(Door) is Door.spec
    assert spec_of(Door()) is Door.spec
    assert spec_of(functools.partial(Door, size=3)) is Door.spec
    assert spec_of(Door.spec) is Door.spec
    with pytest.raises(TypeError, match="is not a machine class"):
        spec_of(int)
