"""Declaring machines: states, handlers with declared targets, and the validated spec.

A machine is a class with :class:`State` attributes and handlers attached to ``(state, event)``::

    @attrs.define
    class Echo(Machine):
        reading = State(Line(max_length=8192), initial=True, doc="waiting for a line")

        @reading.on(Frame, to=reading)
        def echo(self, line: bytes) -> None:
            self.send(line + b"\\n")

When the class is created its transition table is compiled into an immutable :class:`Spec`
(``Echo.spec``) and validated; a broken table raises :class:`MachineDefinitionError` naming the
class, the state and the rule, at import time. Diagrams, tracing, counters and coverage are all
read from that one spec.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .events import (
    CloseReason,
    Drained,
    Frame,
    FrameTooLong,
    Message,
    Opened,
    PeerClosed,
    ProtocolError,
    TimedOut,
    TimerFired,
)
from .framing import Framing

if TYPE_CHECKING:
    from .connection import Connection

__all__ = [
    "State",
    "Machine",
    "Spec",
    "Edge",
    "MachineDefinitionError",
    "HandlerError",
    "CLOSED",
    "EVENT_NAMES",
]


class MachineDefinitionError(TypeError):
    """A machine's transition table breaks a rule; raised when the class is created."""


class HandlerError:
    """Marker event type for the implicit edge taken when a handler raises or misbehaves."""


#: Display names of the event types, used in traces, counters and diagrams.
EVENT_NAMES: dict[type, str] = {
    Opened: "opened",
    Frame: "frame",
    PeerClosed: "peer closed",
    TimedOut: "timed out",
    TimerFired: "timer",
    Message: "message",
    Drained: "drained",
    FrameTooLong: "frame too long",
    ProtocolError: "protocol error",
    HandlerError: "handler error",
}

#: Name of the implicit terminal state every implicit edge leads to.
CLOSED = "closed"

#: Implicit edges: event type -> close reason when the state has no handler for it.
IMPLICIT_REASONS: dict[type, CloseReason] = {
    PeerClosed: CloseReason.PEER_CLOSED,
    FrameTooLong: CloseReason.FRAME_TOO_LONG,
    TimedOut: CloseReason.TIMEOUT,
    ProtocolError: CloseReason.PROTOCOL_ERROR,
    HandlerError: CloseReason.HANDLER_ERROR,
}


class _HandlerDecl:
    __slots__ = ("event", "func", "targets")

    def __init__(self, event: type, func: Callable[..., Any], targets: tuple[State | str, ...]):
        self.event = event
        self.func = func
        self.targets = targets


class State:
    """A named state: what the connection waits for, and what it may do next.

    ``framing``: how frames are cut in this state (``None``: nothing is read in this state).
    ``timeout``: seconds the connection may stay in this state (counted from entering it;
    self-transitions do not restart it) before a :class:`TimedOut` event.
    ``initial``: exactly one state per machine is initial. ``final``: entering it closes the
    connection after flushing output; a final state has no handlers.
    """

    def __init__(
        self,
        framing: Framing | None = None,
        *,
        timeout: float | None = None,
        initial: bool = False,
        final: bool = False,
        doc: str = "",
    ) -> None:
        if framing is not None and not isinstance(framing, Framing):
            raise TypeError(f"State framing must be a Framing, not {framing!r}")
        self.framing = framing
        self.timeout = timeout
        self.initial = initial
        self.final = final
        self.doc = doc
        self.name = "?"
        self.decls: list[_HandlerDecl] = []
        #: how many handlers the owning class declared; more later means a subclass added
        #: handlers to a state it shares with its base and its siblings
        self.sealed: int | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<State {self.name}>"

    def on(
        self, event: type, *, to: State | str | Iterable[State | str]
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Attach the decorated method as the handler of ``event`` in this state.

        ``to`` is the state (or states) the handler may go to. With one target the handler may
        return ``None``; with several it must return one of them.
        """
        if isinstance(to, (State, str)):
            targets: tuple[State | str, ...] = (to,)
        else:
            targets = tuple(to)  # an empty one is refused with the class's name by build_spec

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            self.decls.append(_HandlerDecl(event, func, targets))
            return func

        return decorate


class CompiledHandler:
    """A handler as the runner sees it: function, its targets, and their edge indexes."""

    __slots__ = ("event", "event_name", "func", "name", "targets", "default")

    def __init__(self, event: type, func: Callable[..., Any], name: str) -> None:
        self.event = event
        self.event_name = EVENT_NAMES[event]
        self.func = func
        self.name = name
        #: returned value (State object or name) -> (CompiledState, edge index)
        self.targets: dict[Any, tuple[CompiledState, int]] = {}
        #: where a ``None`` return goes: the single target, else None (must return one)
        self.default: tuple[CompiledState, int] | None = None


class CompiledState:
    """One state of a spec, with its handlers keyed by event type."""

    __slots__ = (
        "name", "framing", "timeout", "initial", "final", "doc", "handlers", "implicit",
        "frame_handler", "produces",
    )  # fmt: skip

    def __init__(self, decl: State) -> None:
        self.name = decl.name
        self.framing = decl.framing
        self.timeout = decl.timeout
        self.initial = decl.initial
        self.final = decl.final
        self.doc = decl.doc
        self.handlers: dict[type, CompiledHandler] = {}
        #: event type -> edge index of the implicit edge to ``closed``
        self.implicit: dict[type, int] = {}
        #: ``handlers[Frame]``, kept apart for the runner's per-frame fast path
        self.frame_handler: CompiledHandler | None = None
        #: the state handles ``Drained`` (a producer), kept apart for the same reason
        self.produces = False

    def __repr__(self) -> str:
        return f"<CompiledState {self.name}>"


@attrs.frozen
class Edge:
    """One edge of the transition table. ``implicit`` edges lead to ``closed``."""

    index: int
    source: str
    event: str
    target: str
    handler: str | None = None
    implicit: bool = False


@attrs.frozen(eq=False)
class Spec:
    """The complete, immutable transition table of a machine class."""

    name: str
    states: dict[str, CompiledState]
    initial: CompiledState
    edges: tuple[Edge, ...]

    def edge(self, source: str, event: str, target: str) -> Edge:
        for e in self.edges:
            if (e.source, e.event, e.target) == (source, event, target):
                return e
        raise KeyError((source, event, target))


def _collect_states(cls: type) -> dict[str, State]:
    states: dict[str, State] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, State):
                states[name] = value
    return states


def build_spec(cls: type) -> Spec | None:
    """Compile and validate the transition table of ``cls``; ``None`` if it has no states."""
    decls = _collect_states(cls)
    if not decls:
        return None
    where = cls.__qualname__

    def fail(msg: str) -> None:
        raise MachineDefinitionError(f"{where}: {msg}")

    # A subclass may add handlers to a state it inherits (``@Base.reading.on(...)``). The State
    # object is shared with the base and its other subclasses, so such handlers are moved off
    # it into this class, and each class's table gets only its own line's additions.
    added: dict[str, list[_HandlerDecl]] = {}
    for name, decl in decls.items():
        if decl.sealed is not None and name not in vars(cls) and len(decl.decls) > decl.sealed:
            added[name] = decl.decls[decl.sealed :]
            del decl.decls[decl.sealed :]
    if added:
        cls._statemux_added_handlers = added  # type: ignore[attr-defined]
    handler_decls = {name: list(decl.decls) for name, decl in decls.items()}
    for klass in reversed(cls.__mro__):
        for name, extra in vars(klass).get("_statemux_added_handlers", {}).items():
            handler_decls[name].extend(extra)

    initials = [n for n, s in decls.items() if s.initial]
    if len(initials) != 1:
        fail(
            "exactly one state must be initial=True; "
            + (f"found {len(initials)}: {', '.join(initials)}" if initials else "found none")
        )
    if CLOSED in decls:
        fail(f"'{CLOSED}' is reserved for the implicit terminal state")

    compiled = {name: CompiledState(s) for name, s in decls.items()}
    by_decl = {id(s): compiled[n] for n, s in decls.items()}
    edges: list[Edge] = []
    adjacency: dict[str, set[str]] = {n: set() for n in compiled}

    for name, decl in decls.items():
        cs = compiled[name]
        if decl.final and handler_decls[name]:
            fail(f"final state '{name}' must have no handlers (it has {len(handler_decls[name])})")
        if decl.final and decl.framing is not None:
            fail(f"final state '{name}' must not read (framing={decl.framing.describe()})")
        for hd in handler_decls[name]:
            if hd.event not in EVENT_NAMES or hd.event is HandlerError:
                fail(f"state '{name}': {hd.event!r} is not an event type a handler can take")
            if hd.event in cs.handlers:
                fail(
                    f"state '{name}' has two handlers for {EVENT_NAMES[hd.event]}: "
                    f"{cs.handlers[hd.event].name} and {hd.func.__name__}"
                )
            fname = hd.func.__name__
            if not hd.targets:
                fail(f"handler {fname} in state '{name}' declares no target state (empty to=)")
            # Look the handler up by name so a subclass may override it.
            func = getattr(cls, fname, hd.func)
            if not callable(func):
                func = hd.func
            ch = CompiledHandler(hd.event, func, fname)
            for target in hd.targets:
                if isinstance(target, State):
                    tcs = by_decl.get(id(target))
                    tname = target.name
                else:
                    tname = str(target)
                    tcs = compiled.get(tname)
                if tcs is None:
                    fail(
                        f"handler {fname} in state '{name}' targets '{tname}', "
                        "which is not a state of this machine"
                    )
                assert tcs is not None
                edge = Edge(len(edges), name, ch.event_name, tcs.name, fname)
                edges.append(edge)
                entry = (tcs, edge.index)
                ch.targets[tcs.name] = entry
                if isinstance(target, State):
                    ch.targets[target] = entry
                ch.targets[tcs] = entry
                adjacency[name].add(tcs.name)
            if len(hd.targets) == 1:
                ch.default = next(iter(ch.targets.values()))
            cs.handlers[hd.event] = ch
            if hd.event is Frame:
                cs.frame_handler = ch
            elif hd.event is Drained:
                cs.produces = True
        if decl.framing is not None and Frame not in cs.handlers:
            fail(f"state '{name}' reads {decl.framing.describe()} but has no Frame handler")
        if decl.framing is None and Frame in cs.handlers:
            fail(f"state '{name}' has a Frame handler but no framing to cut frames")
        if decl.timeout is not None and not (
            isinstance(decl.timeout, (int, float))
            and not isinstance(decl.timeout, bool)
            and math.isfinite(decl.timeout)
            and decl.timeout > 0
        ):
            fail(f"state '{name}': timeout must be positive, not {decl.timeout!r}")

    # Implicit edges to the terminal pseudo-state, so the table is complete data.
    for name, cs in compiled.items():
        if cs.final:
            continue
        for etype in IMPLICIT_REASONS:
            if etype in cs.handlers:
                continue
            if etype is FrameTooLong and cs.framing is None:
                continue
            if etype is TimedOut and cs.timeout is None:
                continue
            edge = Edge(len(edges), name, EVENT_NAMES[etype], CLOSED, None, implicit=True)
            edges.append(edge)
            cs.implicit[etype] = edge.index

    for name, decl in decls.items():
        if name in vars(cls):
            decl.sealed = len(decl.decls)

    initial = compiled[initials[0]]
    seen = {initial.name}
    todo = [initial.name]
    while todo:
        for nxt in adjacency[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    unreachable = [n for n in compiled if n not in seen]
    if unreachable:
        fail(
            f"state '{unreachable[0]}' is not reachable from initial state '{initial.name}'"
            + (f" (also unreachable: {', '.join(unreachable[1:])})" if unreachable[1:] else "")
        )
    return Spec(cls.__name__, compiled, initial, tuple(edges))


class Machine:
    """Base class of per-connection state machines.

    Subclasses declare :class:`State` attributes and handlers; data are usually attrs fields
    (``@attrs.define``). Shared services (a store, a room registry) are constructor arguments,
    so a server takes any zero-argument factory such as ``functools.partial(KV, store=s)``.

    Handlers record effects with :meth:`send`, :meth:`close`, :meth:`abort`,
    :meth:`start_timer`, :meth:`cancel_timer`, :meth:`publish`, :meth:`subscribe` and
    :meth:`unsubscribe`; the driver applies them after the handler returns. Subclasses may
    override :meth:`on_closed`.

    Class attributes a subclass may set:

    ``shares_memory``: connections share memory (a store, a room); forking servers refuse it.
    ``waits_for_peers``: a connection needs other connections to make progress (a chat);
    the synchronous server, which serves one connection at a time, refuses it.
    ``refusal``: bytes sent to a client refused because ``max_connections`` was reached.
    ``per_peer_state``: a datagram machine keeps state across one peer's datagrams, so forking
    datagram servers (a new child per datagram) refuse it; ``None`` lets the servers judge
    from the table (see ``docs/models.md``).
    """

    __slots__ = ("_out", "_conn")

    spec: ClassVar[Spec]
    shares_memory: ClassVar[bool] = False
    waits_for_peers: ClassVar[bool] = False
    refusal: ClassVar[bytes | None] = None
    per_peer_state: ClassVar[bool | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = build_spec(cls)
        if spec is not None:
            cls.spec = spec

    # -- effects (callable from handlers) -------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue ``data`` for the peer. Everything sent while handling one read goes out in
        one system call where possible."""
        self._out.append(data)

    def close(self) -> None:
        """Close after every queued byte is delivered (reason ``NORMAL``)."""
        self._conn.record("close", None)

    def abort(self) -> None:
        """Close at once, dropping queued output (reason ``ABORTED``)."""
        self._conn.record("abort", None)

    def start_timer(self, name: str, seconds: float) -> None:
        """(Re)start the named timer; a :class:`TimerFired` event follows after ``seconds``."""
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not (math.isfinite(seconds) and seconds >= 0)
        ):
            raise ValueError(
                f"timer {name!r}: seconds must be a non-negative number, not {seconds!r}"
            )
        hash(name)
        self._conn.record("start_timer", (name, seconds))

    def cancel_timer(self, name: str) -> None:
        self._conn.record("cancel_timer", name)

    def publish(self, topic: str, payload: object, *, include_self: bool = False) -> None:
        """Deliver a :class:`Message` to every subscriber of ``topic`` on this server."""
        hash(topic)  # an unusable topic fails here, inside the handler
        self._conn.record("publish", (topic, payload, include_self))

    def subscribe(self, topic: str) -> None:
        hash(topic)
        self._conn.record("subscribe", topic)

    def unsubscribe(self, topic: str) -> None:
        self._conn.record("unsubscribe", topic)

    # -- read-only context -----------------------------------------------------------------
    @property
    def state(self) -> str:
        """Name of the current state."""
        return self._conn.state.name

    @property
    def peer(self) -> Any:
        """The peer's address as the socket reported it."""
        return self._conn.peer

    @property
    def connection_id(self) -> int:
        return self._conn.cid

    def now(self) -> float:
        """The driver's monotonic clock (a fake clock under ``statemux.testing``)."""
        conn = getattr(self, "_conn", None)
        return conn.host.time() if conn is not None else time.monotonic()

    # -- hook --------------------------------------------------------------------------------
    def on_closed(self, reason: CloseReason) -> None:
        """Called once when the connection has ended, whatever the reason (after its last
        bytes were delivered, or given up on). Override it to release shared resources;
        :meth:`publish` still works here, :meth:`send` does not."""


def attach(machine: Machine, conn: Connection) -> None:
    """Bind a machine to the runner driving it (drivers call this)."""
    machine._out = conn.out
    machine._conn = conn
