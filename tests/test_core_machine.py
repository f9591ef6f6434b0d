"""Declaring machines: the rules checked when a class is created, and the compiled spec."""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs
import pytest

from statemux import (
    Drained,
    Exact,
    Frame,
    FrameTooLong,
    Line,
    Machine,
    MachineDefinitionError,
    Message,
    Opened,
    PeerClosed,
    ProtocolError,
    Raw,
    State,
    TimedOut,
    TimerFired,
)
from statemux.testing import Simulator

pytestmark = pytest.mark.timeout(10)


# -- definition errors: one builder per rule, each error names class, state and rule ---------------
def no_initial() -> type:
    class NoInitial(Machine):
        a = State(Line())

        @a.on(Frame, to=a)
        def f(self, line: bytes) -> None: ...

    return NoInitial


def two_initial() -> type:
    class TwoInitial(Machine):
        a = State(Line(), initial=True)
        b = State(Line(), initial=True)

        @a.on(Frame, to=b)
        def f(self, line: bytes) -> None: ...

        @b.on(Frame, to=a)
        def g(self, line: bytes) -> None: ...

    return TwoInitial


class Foreign(Machine):
    elsewhere = State(Line(), initial=True)

    @elsewhere.on(Frame, to=elsewhere)
    def f(self, line: bytes) -> None: ...


def foreign_target() -> type:
    class ForeignTarget(Machine):
        a = State(Line(), initial=True)

        @a.on(Frame, to=Foreign.elsewhere)
        def jump(self, line: bytes) -> None: ...

    return ForeignTarget


def foreign_target_same_name() -> type:
    # A State object of another class is refused even when a state of this class has its name.
    class SameName(Machine):
        elsewhere = State(Line(), initial=True)

        @elsewhere.on(Frame, to=Foreign.elsewhere)
        def jump(self, line: bytes) -> None: ...

    return SameName


def unknown_name() -> type:
    class UnknownName(Machine):
        a = State(Line(), initial=True)

        @a.on(Frame, to="nowhere")
        def jump(self, line: bytes) -> None: ...

    return UnknownName


def unreachable() -> type:
    class Unreachable(Machine):
        a = State(Line(), initial=True)
        island = State(Line())

        @a.on(Frame, to=a)
        def f(self, line: bytes) -> None: ...

        @island.on(Frame, to=a)
        def g(self, line: bytes) -> None: ...

    return Unreachable


def final_with_handler() -> type:
    class FinalWithHandler(Machine):
        a = State(Line(), initial=True)
        done = State(final=True)

        @a.on(Frame, to=done)
        def f(self, line: bytes) -> None: ...

        @done.on(TimerFired, to=a)
        def g(self, event: TimerFired) -> None: ...

    return FinalWithHandler


def final_with_framing() -> type:
    class FinalReads(Machine):
        a = State(Line(), initial=True)
        done = State(Raw(), final=True)

        @a.on(Frame, to=done)
        def f(self, line: bytes) -> None: ...

    return FinalReads


def duplicate_handler() -> type:
    class Duplicate(Machine):
        a = State(Line(), initial=True)

        @a.on(Frame, to=a)
        def first(self, line: bytes) -> None: ...

        @a.on(Frame, to=a)
        def second(self, line: bytes) -> None: ...

    return Duplicate


def framing_without_frame_handler() -> type:
    class Deaf(Machine):
        a = State(Line(), initial=True)

        @a.on(PeerClosed, to=a)
        def f(self, event: PeerClosed) -> None: ...

    return Deaf


def frame_handler_without_framing() -> type:
    class NoFraming(Machine):
        a = State(initial=True)

        @a.on(Frame, to=a)
        def f(self, frame: bytes) -> None: ...

    return NoFraming


def bad_timeout(value: object) -> Callable[[], type]:
    def build() -> type:
        class BadTimeout(Machine):
            a = State(Line(), initial=True, timeout=value)  # type: ignore[arg-type]

            @a.on(Frame, to=a)
            def f(self, line: bytes) -> None: ...

        return BadTimeout

    build.__name__ = f"bad_timeout_{value!r}"
    return build


def not_an_event() -> type:
    class NotAnEvent(Machine):
        a = State(Line(), initial=True)

        @a.on(Frame, to=a)
        def f(self, line: bytes) -> None: ...

        @a.on(int, to=a)
        def g(self, value: int) -> None: ...

    return NotAnEvent


def reserved_closed() -> type:
    class Reserved(Machine):
        closed = State(Line(), initial=True)

        @closed.on(Frame, to=closed)
        def f(self, line: bytes) -> None: ...

    return Reserved


def empty_targets() -> type:
    class EmptyTargets(Machine):
        a = State(Line(), initial=True)

        @a.on(Frame, to=())
        def f(self, line: bytes) -> None: ...

    return EmptyTargets


DEFINITION_ERRORS = [
    (no_initial, "NoInitial: exactly one state must be initial=True; found none"),
    (two_initial, "TwoInitial: exactly one state must be initial=True; found 2: a, b"),
    (
        foreign_target,
        "ForeignTarget: handler jump in state 'a' targets 'elsewhere', "
        "which is not a state of this machine",
    ),
    (
        foreign_target_same_name,
        "SameName: handler jump in state 'elsewhere' targets 'elsewhere', "
        "which is not a state of this machine",
    ),
    (
        unknown_name,
        "UnknownName: handler jump in state 'a' targets 'nowhere', "
        "which is not a state of this machine",
    ),
    (unreachable, "Unreachable: state 'island' is not reachable from initial state 'a'"),
    (final_with_handler, "FinalWithHandler: final state 'done' must have no handlers (it has 1)"),
    (final_with_framing, "FinalReads: final state 'done' must not read (framing=raw bytes)"),
    (duplicate_handler, "Duplicate: state 'a' has two handlers for frame: first and second"),
    (
        framing_without_frame_handler,
        "Deaf: state 'a' reads line ≤ 65536 B but has no Frame handler",
    ),
    (frame_handler_without_framing, "NoFraming: state 'a' has a Frame handler but no framing"),
    (bad_timeout(0), "BadTimeout: state 'a': timeout must be positive, not 0"),
    (bad_timeout(-1.5), "BadTimeout: state 'a': timeout must be positive, not -1.5"),
    (bad_timeout(float("nan")), "BadTimeout: state 'a': timeout must be positive, not nan"),
    (bad_timeout("5"), "BadTimeout: state 'a': timeout must be"),
    (not_an_event, "NotAnEvent: state 'a': <class 'int'> is not an event type"),
    (reserved_closed, "Reserved: 'closed' is reserved for the implicit terminal state"),
    (empty_targets, "EmptyTargets: handler f in state 'a'"),
]


@pytest.mark.parametrize(
    ("build", "message"),
    DEFINITION_ERRORS,
    ids=[build.__name__ for build, _ in DEFINITION_ERRORS],
)
def test_definition_error_names_class_state_and_rule(
    build: Callable[[], type], message: str
) -> None:
    # Classes defined in functions have qualified names ending in the class name.
    with pytest.raises(MachineDefinitionError, match=r"^([\w<>]+\.)*" + re.escape(message)):
        build()


def test_state_framing_must_be_a_framing() -> None:
    with pytest.raises(TypeError, match=r"State framing must be a Framing, not 'line'"):
        State("line")  # type: ignore[arg-type]


def test_several_unreachable_states_are_all_named() -> None:
    with pytest.raises(MachineDefinitionError) as info:

        class Islands(Machine):
            a = State(Line(), initial=True)
            b = State(Line())
            c = State(Line())

            @a.on(Frame, to=a)
            def f(self, line: bytes) -> None: ...

            @b.on(Frame, to=c)
            def g(self, line: bytes) -> None: ...

            @c.on(Frame, to=b)
            def h(self, line: bytes) -> None: ...

    assert str(info.value).endswith(
        ".Islands: state 'b' is not reachable from initial state 'a' (also unreachable: c)"
    )


def test_a_class_without_states_is_not_a_machine_yet() -> None:
    class Base(Machine):
        pass

    assert "spec" not in vars(Base)
    with pytest.raises(TypeError, match="Base declares no states; it is not a machine"):
        Simulator(Base).connect()


# -- the compiled spec -----------------------------------------------------------------------------
@attrs.define
class Sample(Machine):
    """Every kind of edge: explicit with one and several targets, implicit ones, a final state."""

    length: int = 0

    header = State(Line(max_length=100), timeout=30, initial=True, doc="waiting for a length")
    body = State(Exact("length", max_size=1000), doc="waiting for the body")
    done = State(final=True)

    @header.on(Opened, to=header)
    def greet(self, event: Opened) -> None:
        self.send(b"hi\n")

    @header.on(Frame, to=(header, body, done))
    def read_header(self, line: bytes) -> State:
        if line == b"quit":
            return self.done
        if not line:
            return self.header
        self.length = int(line)
        return self.body

    @body.on(Frame, to="header")
    def read_body(self, data: bytes) -> None:
        self.send(data[::-1] + b"\n")

    @body.on(PeerClosed, to=done)
    def early_eof(self, event: PeerClosed) -> None:
        self.send(b"short body\n")


def test_spec_lists_explicit_edges_with_their_handlers() -> None:
    explicit = [
        (e.source, e.event, e.target, e.handler) for e in Sample.spec.edges if not e.implicit
    ]
    assert explicit == [
        ("header", "opened", "header", "greet"),
        ("header", "frame", "header", "read_header"),
        ("header", "frame", "body", "read_header"),
        ("header", "frame", "done", "read_header"),
        ("body", "frame", "header", "read_body"),
        ("body", "peer closed", "done", "early_eof"),
    ]


def test_spec_lists_implicit_edges_only_where_they_can_happen() -> None:
    implicit = {(e.source, e.event) for e in Sample.spec.edges if e.implicit}
    assert all(e.target == "closed" for e in Sample.spec.edges if e.implicit)
    assert implicit == {
        ("header", "peer closed"),
        ("header", "frame too long"),
        ("header", "timed out"),  # only header has a timeout
        ("header", "protocol error"),
        ("header", "handler error"),
        ("body", "frame too long"),  # body handles peer closed itself
        ("body", "protocol error"),
        ("body", "handler error"),
    }


def test_edges_are_numbered_in_order_and_looked_up_by_name() -> None:
    spec = Sample.spec
    assert [e.index for e in spec.edges] == list(range(len(spec.edges)))
    assert spec.edge("body", "frame", "header").handler == "read_body"
    with pytest.raises(KeyError):
        spec.edge("body", "frame", "done")
    assert spec.initial.name == "header"
    assert list(spec.states) == ["header", "body", "done"]
    assert spec.states["header"].doc == "waiting for a length"


def test_a_handler_may_return_a_state_object_or_its_name() -> None:
    sim = Simulator(Sample)
    conn = sim.connect()
    assert conn.received() == b"hi\n"
    conn.send(b"3\nabc\n\n4\nwxyz")
    assert conn.received() == b"cba\nzyxw\n"
    assert conn.state_name == "header"
    conn.send(b"quit\n")
    assert conn.state_name == "done"


# -- subclassing -----------------------------------------------------------------------------------
@attrs.define
class Greeter(Machine):
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def reply(self, line: bytes) -> None:
        self.send(b"hello " + line + b"\n")


@attrs.define
class LoudGreeter(Greeter):
    def reply(self, line: bytes) -> None:
        self.send(b"HELLO " + line.upper() + b"\n")


def test_a_subclass_overrides_a_handler_by_name() -> None:
    for cls, expected in ((Greeter, b"hello bob\n"), (LoudGreeter, b"HELLO BOB\n")):
        sim = Simulator(cls)
        conn = sim.connect()
        conn.send(b"bob\n")
        assert conn.received() == expected
    assert LoudGreeter.spec is not Greeter.spec
    assert [e.handler for e in LoudGreeter.spec.edges] == [e.handler for e in Greeter.spec.edges]


def test_a_subclass_override_may_call_the_parent_handler() -> None:
    @attrs.define
    class Twice(Greeter):
        def reply(self, line: bytes) -> None:
            super().reply(line)
            super().reply(line)

    sim = Simulator(Twice)
    conn = sim.connect()
    conn.send(b"x\n")
    assert conn.received() == b"hello x\nhello x\n"


def test_handlers_added_by_one_subclass_do_not_leak_into_its_siblings() -> None:
    # A subclass that adds a handler to an inherited state must not change the parent's
    # State object: the parent and every other subclass keep their own table.
    @attrs.define
    class Base(Machine):
        reading = State(Line(), initial=True)

        @reading.on(Frame, to=reading)
        def reply(self, line: bytes) -> None:
            self.send(line + b"\n")

    @attrs.define
    class WithGoodbye(Base):
        @Base.reading.on(PeerClosed, to=Base.reading)
        def goodbye(self, event: PeerClosed) -> None:
            self.send(b"bye\n")

    @attrs.define
    class Sibling(Base):
        pass

    assert ("reading", "peer closed", "reading") in {
        (e.source, e.event, e.target) for e in WithGoodbye.spec.edges
    }
    sibling_edges = {(e.source, e.event, e.target) for e in Sibling.spec.edges}
    assert ("reading", "peer closed", "reading") not in sibling_edges
    assert ("reading", "peer closed", "closed") in sibling_edges


def test_every_event_type_can_be_handled() -> None:
    @attrs.define
    class All(Machine):
        a = State(Line(), initial=True, timeout=5)

        @a.on(Opened, to=a)
        def h1(self, e: Opened) -> None: ...

        @a.on(Frame, to=a)
        def h2(self, e: bytes) -> None: ...

        @a.on(PeerClosed, to=a)
        def h3(self, e: PeerClosed) -> None: ...

        @a.on(TimedOut, to=a)
        def h4(self, e: TimedOut) -> None: ...

        @a.on(TimerFired, to=a)
        def h5(self, e: TimerFired) -> None: ...

        @a.on(Message, to=a)
        def h6(self, e: Message) -> None: ...

        @a.on(Drained, to=a)
        def h7(self, e: Drained) -> None: ...

        @a.on(FrameTooLong, to=a)
        def h8(self, e: FrameTooLong) -> None: ...

        @a.on(ProtocolError, to=a)
        def h9(self, e: ProtocolError) -> None: ...

    events = [e.event for e in All.spec.edges if not e.implicit]
    assert events == [
        "opened",
        "frame",
        "peer closed",
        "timed out",
        "timer",
        "message",
        "drained",
        "frame too long",
        "protocol error",
    ]
    # Only "handler error" stays implicit: no handler can take it.
    assert [e.event for e in All.spec.edges if e.implicit] == ["handler error"]


def test_machine_context_is_readable_from_handlers() -> None:
    seen: list[tuple[str, object, int, float]] = []

    @attrs.define
    class Introspect(Machine):
        a = State(Line(), initial=True)

        @a.on(Frame, to=a)
        def f(self, line: bytes) -> None:
            seen.append((self.state, self.peer, self.connection_id, self.now()))

    sim = Simulator(Introspect)
    conn = sim.connect(peer=("10.0.0.1", 1234))
    sim.advance(2.5)
    conn.send(b"x\n")
    assert seen == [("a", ("10.0.0.1", 1234), conn.cid, sim.clock.now)]
    assert sim.clock.now == 1002.5


def test_exact_length_field_is_read_from_the_machine() -> None:
    assert isinstance(Sample.spec.states["body"].framing, Exact)
    assert Sample.spec.states["body"].framing.n == "length"
