"""The sans-I/O runner: one machine, its receive buffer, its timers and its effects.

:class:`Connection` knows machines but not sockets. A driver (the selectors loop, the blocking
driver, the in-memory test harness) subclasses it, feeds it bytes (:meth:`receive`), EOF
(:meth:`receive_eof`) and messages, and implements the transport hooks:

``_transmit(data)``     hand bytes to the transport (send or buffer)
``_buffered()``         bytes the transport still holds
``_interest_changed()`` whether the runner wants input changed (state, pause, close)
``_closing(abort)``     closing began: flush then close (or drop everything if ``abort``)
``_release()``          the runner is finished: free the transport

It talks to its *host* (the server, or the simulator) for the clock, timers, the hub, the
tracer, counters, limits and error reporting; see :class:`Host`.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

from .events import (
    DRAINED,
    OPENED,
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
    UndeclaredTransition,
)
from .framing import ReceiveBuffer, TruncatedDatagram
from .hub import Hub
from .limits import Limits
from .machine import (
    CLOSED,
    IMPLICIT_REASONS,
    CompiledHandler,
    CompiledState,
    Edge,
    HandlerError,
    Machine,
    Spec,
    attach,
)

__all__ = ["Connection", "Stats", "Host", "Tracer"]

Tracer = Callable[[int, str, str, str], None]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Host(Protocol):
    """What a runner needs from the server (or simulator) that hosts it."""

    limits: Limits
    hub: Hub
    tracer: Tracer | None
    stats: Stats

    def time(self) -> float: ...
    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle: ...
    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Any: ...
    def report_error(self, conn: Connection) -> None: ...


class Stats:
    """Per-server counters: transitions taken per edge, and close reasons."""

    def __init__(self) -> None:
        self._edges: dict[Spec, list[int]] = {}
        self.close_reasons: Counter[CloseReason] = Counter()

    def edge_counts(self, spec: Spec) -> list[int]:
        counts = self._edges.get(spec)
        if counts is None:
            counts = self._edges[spec] = [0] * len(spec.edges)
        return counts

    def merge(self, other: Stats) -> None:
        """Add another server's (or a forked child's) counters to these."""
        for spec, counts in other._edges.items():
            mine = self.edge_counts(spec)
            for i, n in enumerate(counts):
                if n:
                    mine[i] += n
        self.close_reasons.update(other.close_reasons)

    def transitions(self) -> Counter[tuple[str, str, str, str]]:
        """``(machine, from state, event, to state) -> times taken``."""
        out: Counter[tuple[str, str, str, str]] = Counter()
        for spec, counts in self._edges.items():
            for edge, n in zip(spec.edges, counts, strict=True):
                if n:
                    out[(spec.name, edge.source, edge.event, edge.target)] += n
        return out

    def untaken(self, spec: Spec, *, explicit_only: bool = True) -> list[Edge]:
        """Edges of ``spec`` never taken on this server (coverage)."""
        counts = self._edges.get(spec, [0] * len(spec.edges))
        return [
            e
            for e, n in zip(spec.edges, counts, strict=True)
            if not n and not (explicit_only and e.implicit)
        ]


class Connection(ReceiveBuffer):
    """Drives one machine. Drivers subclass it; see the module docstring.

    A connection is its own :class:`ReceiveBuffer` (``conn.rbuf is conn``): one object fewer
    per connection, which matters with tens of thousands of idle ones.
    """

    __slots__ = (
        "host", "machine", "spec", "state", "cid", "peer", "out", "effects", "counts",
        "tracer", "closing", "closed", "eof", "paused", "state_timer", "state_deadline", "timers", "inbox",
        "inbox_scheduled", "resume_scheduled", "drain_scheduled", "topics", "opened_at", "notified",
        "last_active", "idle_timer", "bytes_in", "bytes_out", "__weakref__",
    )  # fmt: skip

    def __init__(self, host: Host, machine: Machine, cid: int, peer: Any) -> None:
        spec = getattr(type(machine), "spec", None)
        if spec is None:
            raise TypeError(f"{type(machine).__qualname__} declares no states; it is not a machine")
        self.host = host
        self.machine = machine
        self.spec: Spec = spec
        self.state: CompiledState = spec.initial
        self.cid = cid
        self.peer = peer
        self.data: bytes | bytearray = b""  # a bytearray only while bytes are buffered
        self.scan = 0
        self.skipping = False
        self.out: list[bytes] = []
        self.effects: list[tuple[str, Any]] | None = None  # created on first use
        self.counts = host.stats.edge_counts(spec)
        self.tracer = host.tracer
        self.closing: CloseReason | None = None
        self.closed = False
        self.notified = False  # on_closed has been called
        self.eof = False
        self.paused = False
        self.state_timer: TimerHandle | None = None
        #: when the state's timeout falls due, for hosts that sweep instead of timing
        self.state_deadline: float | None = None
        self.timers: dict[str, TimerHandle] | None = None
        self.inbox: deque[Message] | None = None
        self.inbox_scheduled = False
        self.resume_scheduled = False
        self.drain_scheduled = False
        self.topics: set[str] | None = None
        self.opened_at = self.last_active = host.time()  # one float object for both
        self.idle_timer: TimerHandle | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        attach(machine, self)

    @property
    def rbuf(self) -> ReceiveBuffer:
        """Bytes received but not yet cut into frames (the connection itself)."""
        return self

    # -- transport hooks (drivers override) -----------------------------------------------------
    def _transmit(self, data: bytes) -> None:
        raise NotImplementedError

    def _buffered(self) -> int:
        return 0

    def _interest_changed(self) -> None:
        pass

    def _closing(self, abort: bool) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    #: stream drivers hand all output of one read to the transport as one piece; datagram
    #: sessions set this False so that each ``send()`` stays one datagram
    joins_output = True

    def idle_limit(self) -> float | None:
        """Seconds without traffic before closing (reason IDLE); drivers may override.

        Hosts whose ``sweeps_timeouts`` is true check idleness and state timeouts themselves
        (the multiplexing server sweeps its table, saving a timer per connection); others
        get timers here."""
        return self.host.limits.idle_timeout

    # -- what drivers call ---------------------------------------------------------------------
    @property
    def wants_input(self) -> bool:
        """True while the runner wants bytes: a reading state, not paused, not closing."""
        return (
            self.closing is None
            and not self.eof
            and not self.paused
            and self.state.framing is not None
        )

    def start(self) -> None:
        """The connection is open: arm timers, deliver ``Opened``, flush."""
        st = self.state
        if st.timeout is not None:
            self._arm_state_timeout(st)
        idle = self.idle_limit()
        if idle is not None and not getattr(self.host, "sweeps_timeouts", False):
            self.idle_timer = self.host.call_later(idle, self._idle_check)
        if Opened in st.handlers:
            self._dispatch(Opened, OPENED)
        if self.state.produces and self.state is st:
            self._schedule_drained()  # an initial producer state starts without being asked
        self._settle()

    def receive(self, data: bytes) -> None:
        """Bytes arrived from the peer."""
        self.bytes_in += len(data)
        self.last_active = self.host.time()
        if self.closing is not None:
            return
        buffered = self.data
        if buffered:
            buffered += data  # type: ignore[operator]  # in place: a non-empty buffer is a bytearray
        else:
            self.data = bytearray(data)
        self._process()

    def receive_eof(self) -> None:
        """The peer will send nothing more."""
        if self.eof:
            return
        self.eof = True
        if self.closing is None:
            self._process()
        self._interest_changed()

    def receive_datagram(self, data: bytes) -> None:
        """One whole datagram: a frame if the state's framing allows its size."""
        self.bytes_in += len(data)
        self.last_active = self.host.time()
        if self.closing is not None:
            return
        framing = self.state.framing
        if framing is None:
            return
        if len(data) > framing.max_size or data.__class__ is TruncatedDatagram:
            self._dispatch(FrameTooLong, FrameTooLong("datagram", framing.max_size, len(data)))
        else:
            self._dispatch(Frame, data)
        self._settle()

    def deliver(self, message: Message) -> None:
        """Queue a hub message; it is handled after the current handler returns."""
        if self.closing is not None:
            return
        if self.inbox is None:
            self.inbox = deque()
        self.inbox.append(message)
        if not self.inbox_scheduled:
            self.inbox_scheduled = True
            self.host.call_soon(self._drain_inbox)

    def writable_again(self) -> None:
        """Drivers call this when buffered output fell to the low-water mark."""
        if self.closing is not None:
            return
        if self.paused:
            self.paused = False
            self._interest_changed()
            if self.data or self.eof:
                self._schedule_resume()
        if self.state.produces:
            self._dispatch(Drained, DRAINED)
            self._settle()

    def peer_reset(self) -> None:
        """The peer reset the connection (or the pipe broke): nothing more can be read or
        sent. The PeerClosed edge is taken all the same — counted, traced, its handler run
        (what that handler sends is dropped); frames still buffered are dropped too."""
        self.eof = True
        if self.closing is not None:
            return
        self.closing = CloseReason.PEER_CLOSED  # first: the handler's sends go nowhere
        self._cancel_timers()
        self._dispatch(PeerClosed, PeerClosed(bytes(self.data)))
        self.out.clear()

    def close(self, reason: CloseReason, *, abort: bool = False) -> None:
        """Begin closing: flush then close, or drop everything when ``abort``."""
        if self.closing is not None:
            if abort and not self.closed:
                # An abort during a graceful close (output passed its limit while flushing)
                # wins: the peer must not take a truncated reply for a complete one.
                self.closing = reason
                self._closing(True)
            return
        self.closing = reason
        self._cancel_timers()
        if self.out and not abort:
            self._hand_over()  # bytes a handler sent are delivered before a graceful close
        self.out.clear()
        if self.closing is reason:  # not overtaken by an abort while transmitting
            self._closing(abort)

    def finish(self) -> None:
        """Drivers call this once the transport is done: counts, hook, release."""
        if self.closed:
            return
        self.closed = True
        if self.closing is None:
            self.closing = CloseReason.PEER_CLOSED
        self._cancel_timers()
        self.host.stats.close_reasons[self.closing] += 1
        self._notify_closed()
        self._release()

    def _notify_closed(self) -> None:
        """Once, when the connection has ended: leave every topic and call ``on_closed``."""
        if self.notified:
            return
        self.notified = True
        hub = self.host.hub
        if self.topics:
            for topic in self.topics:
                hub.unsubscribe(topic, self)
            self.topics = None
        try:
            self.machine.on_closed(self.closing)  # type: ignore[arg-type]
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:
            self.host.report_error(self)
        self.out.clear()  # nothing more can be sent
        if self.effects:
            self._apply_effects()

    # -- the engine -----------------------------------------------------------------------------
    def _process(self) -> None:
        """Cut and handle every buffered frame (within the per-event budget)."""
        budget = self.host.limits.frames_per_event
        rbuf = self
        machine = self.machine
        out = self.out
        counts = self.counts
        tracer = self.tracer
        while True:
            if self.closing is not None or self.paused:
                break
            st = self.state
            framing = st.framing
            if framing is None:
                break
            if not rbuf.data and not framing.cuts_empty:
                frame = None  # nothing to cut: don't ask
            elif not budget:
                self._schedule_resume()
                break
            else:
                try:
                    frame = framing.cut(rbuf, machine)
                except FrameTooLong as exc:
                    self._dispatch(FrameTooLong, exc)
                    if self.closing is not None:
                        break
                    if exc.consumed:
                        continue  # the offending frame is gone; the bytes after it are intact
                    rbuf.data = b""
                    rbuf.scan = 0
                    break
                except ProtocolError as exc:
                    self._dispatch(ProtocolError, exc)
                    break
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # a bug in a cutter: this connection only
                    self._failed(st, Frame, len(out), exc)
                    break
            if frame is None:
                if self.eof:
                    if not budget:
                        self._schedule_resume()
                        break
                    self._dispatch(PeerClosed, PeerClosed(bytes(rbuf.data)))
                    if self.closing is None:
                        self.close(CloseReason.PEER_CLOSED)
                break
            # Inlined _dispatch(Frame, frame): this is the per-frame hot path.
            handler = st.frame_handler
            assert handler is not None
            mark = len(out)
            try:
                ret = handler.func(machine, frame)
                entry = handler.default if ret is None else handler.targets.get(ret)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # raised, or returned something unhashable
                self._failed(st, Frame, mark, exc)
                budget -= 1
                continue
            if entry is not None and entry[0] is st and tracer is None:
                counts[entry[1]] += 1  # staying in the same state: nothing else to do
                if self.effects:
                    self._apply_effects()
            else:
                self._transition(st, handler, ret, mark)
            budget -= 1
        # EOF met in a state that reads nothing (say, while streaming a file) waits until
        # the machine reads again: PeerClosed always comes after every buffered frame.
        if not rbuf.data:
            rbuf.data = b""  # an idle connection holds no buffer object
        self._settle()

    def _dispatch(self, etype: type, event: Any) -> None:
        st = self.state
        handler = st.handlers.get(etype)
        if handler is None:
            idx = st.implicit.get(etype)
            if idx is not None:
                self._take_implicit(st, idx, IMPLICIT_REASONS[etype])
            return
        mark = len(self.out)
        try:
            ret = handler.func(self.machine, event)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            self._failed(st, etype, mark, exc)
            return
        self._transition(st, handler, ret, mark)

    def _transition(self, st: CompiledState, handler: CompiledHandler, ret: Any, mark: int) -> None:
        """Check the handler's answer against its declared targets, count, trace, enter."""
        try:
            entry = handler.default if ret is None else handler.targets.get(ret)
        except TypeError:  # unhashable: certainly not a declared state
            entry = None
        if entry is None:
            names = ", ".join(sorted({cs.name for cs, _ in handler.targets.values()}))
            try:
                raise UndeclaredTransition(
                    f"{self.spec.name}.{handler.name} returned {ret!r} in state '{st.name}'; "
                    f"declared targets: {names}"
                )
            except UndeclaredTransition as exc:
                self._failed(st, handler.event, mark, exc)
            return
        new, idx = entry
        self.counts[idx] += 1
        if self.tracer is not None:
            self._trace(st.name, handler.event_name, new.name)
        if new is not st:
            self._enter(new)
        if self.effects:
            self._apply_effects()

    def _failed(self, st: CompiledState, etype: type, mark: int, exc: Exception) -> None:
        """The error funnel. Called inside ``except``: the handler's effects are dropped,
        earlier output stays; a ProtocolError goes to the state's handler if it has one,
        anything else is reported to ``handle_error``; then only this connection closes."""
        del self.out[mark:]
        self.effects = None
        if isinstance(exc, ProtocolError):
            if etype is not ProtocolError and ProtocolError in st.handlers:
                self._dispatch(ProtocolError, exc)
                return
            if exc.reply:
                self.out.append(exc.reply)  # the hint is the last thing the peer reads
            idx = st.implicit.get(ProtocolError)
            reason = CloseReason.PROTOCOL_ERROR
        else:
            self.host.report_error(self)
            idx = st.implicit.get(HandlerError)
            reason = CloseReason.HANDLER_ERROR
        if idx is not None:
            self._take_implicit(st, idx, reason)
        else:
            self.close(reason)

    def _take_implicit(self, st: CompiledState, idx: int, reason: CloseReason) -> None:
        self.counts[idx] += 1
        if self.tracer is not None:
            self._trace(st.name, self.spec.edges[idx].event, CLOSED)
        self.close(reason)

    def _trace(self, source: str, event: str, target: str) -> None:
        """Call the tracer; a tracer that fails is reported, and the connection goes on."""
        try:
            self.tracer(self.cid, source, event, target)  # type: ignore[misc]
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:
            self.host.report_error(self)

    def _arm_state_timeout(self, st: CompiledState) -> None:
        assert st.timeout is not None
        if getattr(self.host, "sweeps_timeouts", False):
            self.state_deadline = self.host.time() + st.timeout  # the host's sweep checks it
            self.host.note_timeout(st.timeout)  # type: ignore[attr-defined]
        else:
            self.state_timer = self.host.call_later(
                st.timeout, Connection._state_timed_out, self, st
            )

    def _enter(self, new: CompiledState) -> None:
        if self.state_timer is not None:
            self.state_timer.cancel()
            self.state_timer = None
        self.state_deadline = None
        old = self.state
        self.state = new
        if new.final:
            self.close(CloseReason.NORMAL)
            return
        if new.timeout is not None:
            self._arm_state_timeout(new)
        if new.produces:
            self._schedule_drained()  # a producer state gets its first Drained unasked
        if (old.framing is None) != (new.framing is None):
            self._interest_changed()
            # Input buffered while the old state read nothing (pipelined requests behind a
            # streamed response) is cut now, not when more bytes happen to arrive.
            if old.framing is None and (self.data or self.eof):
                self._schedule_resume()

    def record(self, kind: str, arg: Any) -> None:
        """Machines record an effect; it is applied after the handler returns."""
        if self.effects is None:
            self.effects = [(kind, arg)]
        else:
            self.effects.append((kind, arg))

    def _apply_effects(self) -> None:
        effects = self.effects or ()
        self.effects = None
        try:
            self._apply(effects)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # a bad effect is the handler's error: this connection only
            self.host.report_error(self)
            if self.closing is None:
                self.close(CloseReason.HANDLER_ERROR)

    def _apply(self, effects: Any) -> None:
        host = self.host
        for kind, arg in effects:
            if kind == "publish":
                topic, payload, include_self = arg
                host.hub.publish(topic, payload, self, include_self)
            elif self.closed:
                continue
            elif kind == "close":
                self.close(CloseReason.NORMAL)
            elif kind == "abort":
                self.close(CloseReason.ABORTED, abort=True)
            elif kind == "start_timer":
                name, seconds = arg
                if self.closing is not None:
                    continue
                if self.timers is None:
                    self.timers = {}
                old = self.timers.pop(name, None)
                if old is not None:
                    old.cancel()
                self.timers[name] = host.call_later(seconds, self._timer_fired, name)
            elif kind == "cancel_timer":
                if self.timers is not None:
                    old = self.timers.pop(arg, None)
                    if old is not None:
                        old.cancel()
            elif kind == "subscribe":
                if self.closing is not None:
                    continue
                if self.topics is None:
                    self.topics = set()
                self.topics.add(arg)
                host.hub.subscribe(arg, self)
            elif kind == "unsubscribe":
                if self.topics is not None and arg in self.topics:
                    self.topics.discard(arg)
                    host.hub.unsubscribe(arg, self)

    def _settle(self) -> None:
        """After handling: hand queued output to the transport."""
        if self.out and self.closing is None and self._hand_over():
            self.last_active = self.host.time()
            # A producer that just sent a piece gets Drained as soon as the transport can
            # take more; one that sent nothing is not called again (no busy loop).
            if self.state.produces:
                self._schedule_drained()

    def _hand_over(self) -> bool:
        """Give the queued output to the transport: in one piece on a stream, one message
        per ``send()`` (an empty one too) on a datagram session. True if anything went."""
        out = self.out
        if self.joins_output:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not data:
                return False
            self.bytes_out += len(data)
            self._transmit(data)
            return True
        pieces = out[:]
        out.clear()
        for data in pieces:
            self.bytes_out += len(data)
            self._transmit(data)
        return True

    def _schedule_drained(self) -> None:
        if self.closing is None and not self.drain_scheduled:
            self.drain_scheduled = True
            self.host.call_soon(self._deliver_drained)

    def pause(self) -> None:
        """Drivers call this when buffered output passed the high-water mark."""
        if not self.paused:
            self.paused = True
            self._interest_changed()

    # -- scheduled callbacks ------------------------------------------------------------------------
    def _schedule_resume(self) -> None:
        if not self.resume_scheduled:
            self.resume_scheduled = True
            self.host.call_soon(self._resume)

    def _resume(self) -> None:
        self.resume_scheduled = False
        if self.closing is None:
            self._process()

    def _drain_inbox(self) -> None:
        self.inbox_scheduled = False
        inbox = self.inbox
        while inbox and self.closing is None:
            self._dispatch(Message, inbox.popleft())
        if inbox and self.closing is not None:
            inbox.clear()
        self._settle()

    def _deliver_drained(self) -> None:
        self.drain_scheduled = False
        if self.closing is None and self.state.produces:
            if self._buffered() <= self.host.limits.output_low_water:
                self._dispatch(Drained, DRAINED)
                self._settle()

    def _state_timed_out(self, st: CompiledState) -> None:
        self.state_timer = None
        self.state_deadline = None
        if self.closing is None and self.state is st:
            self._dispatch(TimedOut, TimedOut(st.name, st.timeout or 0.0))
            self._settle()

    def _timer_fired(self, name: str) -> None:
        if self.timers is not None:
            self.timers.pop(name, None)
        if self.closing is None:
            self._dispatch(TimerFired, TimerFired(name))
            self._settle()

    def _idle_check(self) -> None:
        self.idle_timer = None
        if self.closing is not None:
            return
        idle = self.idle_limit()
        if idle is None:
            return
        quiet = self.host.time() - self.last_active
        if quiet >= idle:
            self.close(CloseReason.IDLE)
        else:
            self.idle_timer = self.host.call_later(idle - quiet, self._idle_check)

    def _cancel_timers(self) -> None:
        self.state_deadline = None
        if self.state_timer is not None:
            self.state_timer.cancel()
            self.state_timer = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.timers:
            for handle in self.timers.values():
                handle.cancel()
            self.timers = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} #{self.cid} {self.spec.name}:{self.state.name} peer={self.peer!r}>"
