"""The sans-I/O runner, driven by the in-memory Simulator and its fake clock: event order,
timeouts and timers, the hub, flow control, run to completion, the error funnel, tracing and
counters."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest

from statemux import (
    CloseReason,
    Drained,
    Exact,
    Frame,
    FrameTooLong,
    Framing,
    Line,
    Machine,
    Message,
    Opened,
    PeerClosed,
    ProtocolError,
    ReceiveBuffer,
    State,
    TimedOut,
    TimerFired,
    UndeclaredTransition,
)
from statemux.testing import Simulator, chunkings, transcript
from statemux.trace import LoggingTracer, RecordingTracer

pytestmark = pytest.mark.timeout(20)


# -- event order -----------------------------------------------------------------------------------
@attrs.define
class Recorder(Machine):
    """Records every event it sees; ``length`` sizes the body after a ``BODY n`` line."""

    log: list[Any] = attrs.field(factory=list)
    length: int = 0

    lines = State(Line(max_length=16), initial=True)
    body = State(Exact("length"))

    @lines.on(Opened, to=lines)
    def opened(self, event: Opened) -> None:
        self.log.append("opened")
        self.send(b"welcome\n")

    @lines.on(Frame, to=(lines, body))
    def line(self, line: bytes) -> State:
        self.log.append(line)
        if line == b"ping":
            self.send(b"pong\n")
        if line.startswith(b"BODY "):
            self.length = int(line[5:])
            return self.body
        return self.lines

    @body.on(Frame, to=lines)
    def got_body(self, data: bytes) -> None:
        self.log.append(("body", data))

    @lines.on(PeerClosed, to=lines)
    def peer_closed(self, event: PeerClosed) -> None:
        self.log.append(("eof", event.unterminated))
        self.send(b"bye\n")
        self.close()

    @body.on(PeerClosed, to=lines)
    def eof_in_body(self, event: PeerClosed) -> None:
        self.log.append(("eof in body", event.unterminated))

    def on_closed(self, reason: CloseReason) -> None:
        self.log.append(("closed", reason))


def test_opened_is_delivered_first_and_its_output_sent_at_once() -> None:
    sim = Simulator(Recorder)
    conn = sim.connect()
    assert conn.machine.log == ["opened"]
    assert conn.received() == b"welcome\n"


@pytest.mark.parametrize("chunks", list(chunkings(b"a\nb\nBODY 3\nxyzrest")), ids=len)
def test_peer_closed_comes_after_every_buffered_frame_with_the_rest(chunks: list[bytes]) -> None:
    out, conn = transcript(Recorder, chunks, eof=True)
    assert conn.machine.log == [
        "opened",
        b"a",
        b"b",
        b"BODY 3",
        ("body", b"xyz"),
        ("eof", b"rest"),
        ("closed", CloseReason.NORMAL),
    ]
    assert out == b"welcome\nbye\n"


def test_peer_closed_in_the_middle_of_a_body_carries_the_partial_body() -> None:
    out, conn = transcript(Recorder, [b"BODY 10\n12345"], eof=True)
    assert conn.machine.log[-2:] == [("eof in body", b"12345"), ("closed", CloseReason.PEER_CLOSED)]


def test_peer_closed_without_a_handler_closes_after_flushing() -> None:
    out, conn = transcript(LineEcho, [b"a\nb\npartial"], eof=True)
    assert out == b"a\nb\n"
    assert conn.close_reason is CloseReason.PEER_CLOSED


def test_peer_closed_is_delivered_after_frames_buffered_while_paused() -> None:
    # Frames that wait in the buffer while output is paused are handled when output drains,
    # and the EOF that arrived meanwhile is delivered after them, whatever the frame budget.
    sim = Simulator(
        Recorder, frames_per_event=2, output_high_water=4, output_low_water=2, output_limit=100
    )
    conn = sim.connect()
    conn.stop_reading()
    conn.send(b"ping\n")  # the unread reply is above high water: reading pauses
    assert conn.paused
    conn.send(b"a\nb\n")
    conn.send_eof()
    assert conn.machine.log == ["opened", b"ping"]
    conn.resume_reading()
    assert conn.machine.log == [
        "opened",
        b"ping",
        b"a",
        b"b",
        ("eof", b""),
        ("closed", CloseReason.NORMAL),
    ]


def test_frames_per_event_bounds_one_pass_and_the_rest_follows() -> None:
    sim = Simulator(LineEcho, frames_per_event=2)
    conn = sim.connect()
    conn.receive(b"1\n2\n3\n4\n5\n")  # the runner entry point, without running queued work
    assert conn.received() == b"1\n2\n"
    sim.run_ready()
    assert conn.received() == b"3\n4\n5\n"


# -- output effects and final states ---------------------------------------------------------------
@attrs.define
class Effects(Machine):
    reading = State(Line(), initial=True)
    done = State(final=True)

    @reading.on(Frame, to=(reading, done))
    def command(self, line: bytes) -> State:
        self.send(b"reply to " + line + b"\n")
        if line == b"close":
            self.close()
        elif line == b"abort":
            self.abort()
        elif line == b"final":
            return self.done
        return self.reading


@pytest.mark.parametrize(
    ("line", "reply", "reason"),
    [
        (b"close", b"reply to close\n", CloseReason.NORMAL),
        (b"final", b"reply to final\n", CloseReason.NORMAL),
        (b"abort", b"", CloseReason.ABORTED),
    ],
)
def test_close_flushes_first_and_abort_drops_output(
    line: bytes, reply: bytes, reason: CloseReason
) -> None:
    sim = Simulator(Effects)
    conn = sim.connect()
    conn.stop_reading()
    conn.send(b"before\n" + line + b"\nafter\n")
    conn.resume_reading()
    expected = b"" if reason is CloseReason.ABORTED else b"reply to before\n" + reply
    assert conn.received() == expected
    assert conn.close_reason is reason
    assert sim.stats.close_reasons == {reason: 1}


# -- timeouts and timers ---------------------------------------------------------------------------
@attrs.define
class Timed(Machine):
    events: list[Any] = attrs.field(factory=list)

    waiting = State(Line(), timeout=10, initial=True)
    other = State(Line(), timeout=3)

    @waiting.on(Frame, to=(waiting, other))
    def on_line(self, line: bytes) -> State:
        self.events.append(line)
        if line == b"go":
            return self.other
        if line.startswith(b"start "):
            _, name, seconds = line.split()
            self.start_timer(name.decode(), float(seconds))
        elif line.startswith(b"cancel "):
            self.cancel_timer(line.split()[1].decode())
        return self.waiting

    @other.on(Frame, to=waiting)
    def back(self, line: bytes) -> None:
        self.events.append(line)

    @waiting.on(TimedOut, to=waiting)
    def timed_out(self, event: TimedOut) -> None:
        self.events.append(event)
        self.send(b"timed out\n")

    @waiting.on(TimerFired, to=waiting)
    def fired(self, event: TimerFired) -> None:
        self.events.append(event)


def test_state_timeout_counts_from_entering_and_self_transitions_do_not_rearm() -> None:
    sim = Simulator(Timed, idle_timeout=None)
    conn = sim.connect()
    sim.advance(6)
    conn.send(b"ping\n")  # stays in `waiting`: the deadline is still 10 s after connecting
    sim.advance(3.9)
    assert conn.machine.events == [b"ping"]
    sim.advance(0.2)
    assert conn.machine.events == [b"ping", TimedOut("waiting", 10)]
    assert conn.received() == b"timed out\n"
    sim.advance(100)  # a timeout fires once per entry into the state
    assert conn.machine.events == [b"ping", TimedOut("waiting", 10)]


def test_leaving_a_state_cancels_its_timeout_and_entering_arms_the_new_one() -> None:
    sim = Simulator(Timed, idle_timeout=None)
    conn = sim.connect()
    sim.advance(9)
    conn.send(b"go\n")
    sim.advance(2.9)
    assert not conn.closed
    conn.send(b"back\n")  # re-entering `waiting` arms a fresh 10 s
    sim.advance(9.9)
    assert conn.machine.events == [b"go", b"back"]
    sim.advance(0.1)
    assert conn.machine.events[-1] == TimedOut("waiting", 10)


def test_a_timeout_without_a_handler_closes_with_reason_timeout() -> None:
    sim = Simulator(Timed, idle_timeout=None)
    conn = sim.connect()
    conn.send(b"go\n")
    sim.advance(3)
    assert conn.close_reason is CloseReason.TIMEOUT
    assert sim.stats.transitions()[("Timed", "other", "timed out", "closed")] == 1


def test_named_timers_start_fire_restart_and_cancel() -> None:
    sim = Simulator(Timed, idle_timeout=None)
    conn = sim.connect()
    conn.send(b"start a 2\nstart b 3\nstart c 4\n")
    sim.advance(1)
    conn.send(b"start a 2.5\ncancel c\n")  # restart `a`: now due 3.5 s after connecting
    sim.advance(1.9)
    fired = [e for e in conn.machine.events if isinstance(e, TimerFired)]
    assert fired == []
    sim.advance(0.1)
    fired = [e for e in conn.machine.events if isinstance(e, TimerFired)]
    assert fired == [TimerFired("b")]
    sim.advance(0.5)
    fired = [e for e in conn.machine.events if isinstance(e, TimerFired)]
    assert fired == [TimerFired("b"), TimerFired("a")]
    sim.advance(5)  # `c` was cancelled; `a` fired once
    fired = [e for e in conn.machine.events if isinstance(e, TimerFired)]
    assert fired == [TimerFired("b"), TimerFired("a")]


def test_timers_die_with_the_connection() -> None:
    sim = Simulator(Timed, idle_timeout=None)
    conn = sim.connect()
    conn.send(b"start a 2\n")
    conn.send_eof()
    assert conn.close_reason is CloseReason.PEER_CLOSED
    sim.advance(5)
    assert conn.machine.events == [b"start a 2"]
    assert len(sim.timers) == 0


@attrs.define
class Ticker(Machine):
    """Sends a tick every 5 s once started, so output alone keeps it from idling."""

    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def start(self, line: bytes) -> None:
        self.start_timer("tick", 5)

    @reading.on(TimerFired, to=reading)
    def tick(self, event: TimerFired) -> None:
        self.send(b"tick\n")
        self.start_timer("tick", 5)


def test_idle_timeout_closes_a_quiet_connection_and_traffic_postpones_it() -> None:
    sim = Simulator(LineEcho, idle_timeout=10)
    conn = sim.connect()
    sim.advance(9.9)
    conn.send(b"x\n")
    sim.advance(9.9)
    assert not conn.closed
    sim.advance(0.1)
    assert conn.close_reason is CloseReason.IDLE


def test_output_counts_as_activity_for_the_idle_timeout() -> None:
    sim = Simulator(Ticker, idle_timeout=8)
    conn = sim.connect()
    conn.send(b"start\n")
    sim.advance(60)
    assert not conn.closed
    assert conn.received() == b"tick\n" * 12


def test_idle_timeout_none_never_closes() -> None:
    sim = Simulator(LineEcho, idle_timeout=None)
    conn = sim.connect()
    sim.advance(1e6)
    assert not conn.closed


# -- the hub ---------------------------------------------------------------------------------------
ORDER: list[str] = []


@attrs.define
class Pub(Machine):
    """``sub T`` subscribes, ``unsub T`` unsubscribes, ``pub T text`` publishes, ``me T text``
    publishes to itself too. Messages are written back as ``T:sender:text``."""

    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def command(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        if verb == b"sub":
            self.subscribe(rest.decode())
        elif verb == b"unsub":
            self.unsubscribe(rest.decode())
        elif verb in (b"pub", b"me"):
            topic, _, text = rest.partition(b" ")
            ORDER.append(f"publishing {text.decode()}")
            self.publish(topic.decode(), text, include_self=verb == b"me")
            ORDER.append(f"published {text.decode()}")
            self.send(b"ok\n")

    @reading.on(Message, to=reading)
    def message(self, msg: Message) -> None:
        text = msg.payload.decode()  # type: ignore[attr-defined]
        ORDER.append(f"received {text} on #{self.connection_id}")
        self.send(b"%s:%d:%s\n" % (msg.topic.encode(), msg.sender or 0, msg.payload))


def test_subscribers_receive_published_messages_in_order() -> None:
    sim = Simulator(Pub)
    alice, bob, carol = sim.connect(), sim.connect(), sim.connect()
    alice.send(b"sub news\n")
    bob.send(b"sub news\n")
    carol.send(b"pub news 1\npub news 2\n")
    alice.send(b"pub news 3\n")
    bob.send(b"pub other x\n")
    assert alice.received() == b"news:%d:1\nnews:%d:2\nok\n" % (carol.cid, carol.cid)
    assert bob.received() == b"news:%d:1\nnews:%d:2\nnews:%d:3\nok\n" % (
        carol.cid,
        carol.cid,
        alice.cid,
    )
    assert carol.received() == b"ok\nok\n"
    assert sim.hub.subscribers("news") == 2


def test_publish_is_handled_after_the_publishers_handler_returned() -> None:
    ORDER.clear()
    sim = Simulator(Pub)
    sub = sim.connect()
    pub = sim.connect()
    sub.send(b"sub t\n")
    pub.send(b"sub t\n")
    pub.send(b"me t hello\n")
    assert ORDER == [
        "publishing hello",
        "published hello",
        f"received hello on #{sub.cid}",
        f"received hello on #{pub.cid}",
    ]
    assert pub.received() == b"ok\nt:%d:hello\n" % pub.cid


def test_unsubscribe_and_close_leave_the_topic() -> None:
    sim = Simulator(Pub)
    a, b = sim.connect(), sim.connect()
    a.send(b"sub t\n")
    b.send(b"sub t\n")
    a.send(b"unsub t\n")
    assert sim.hub.subscribers("t") == 1
    b.send_eof()
    assert b.closed
    assert sim.hub.subscribers("t") == 0
    assert sim.hub.topics() == []


# -- flow control ----------------------------------------------------------------------------------
@attrs.define
class Producer(Machine):
    """``n`` sends n pieces of 1000 bytes, one per Drained event."""

    left: int = 0
    drained: int = 0

    waiting = State(Line(), initial=True)
    sending = State(doc="streaming; not reading")

    @waiting.on(Frame, to=sending)
    def start(self, line: bytes) -> None:
        self.left = int(line)

    @sending.on(Drained, to=(sending, waiting))
    def next_piece(self, event: Drained) -> State:
        self.drained += 1
        if not self.left:
            return self.waiting
        self.left -= 1
        self.send(b"x" * 1000)
        return self.sending


def test_drained_pulls_the_next_piece_only_while_output_is_at_low_water() -> None:
    sim = Simulator(Producer)
    low = sim.limits.output_low_water
    conn = sim.connect()
    conn.stop_reading()
    conn.send(b"100\n")
    # Pieces stop once output passes low water; nothing is buffered without bound.
    assert low < conn.buffered <= low + 1000
    stalled = conn.machine.drained
    sim.advance(10)
    assert conn.machine.drained == stalled
    conn.resume_reading()
    assert len(conn.received()) == 100 * 1000
    assert conn.state_name == "waiting"


@attrs.define
class Lazy(Machine):
    """A Drained handler with nothing to send: it must not be called in a loop."""

    calls: int = 0

    a = State(Line(), initial=True)
    b = State(Line())

    @a.on(Frame, to=a)
    def f(self, line: bytes) -> None:
        self.send(b"x\n")

    @a.on(Drained, to=(a, b))
    def nothing_to_send(self, event: Drained) -> State:
        self.calls += 1
        return self.b if self.calls >= 1000 else self.a  # a bound so a failing test ends

    @b.on(Frame, to=b)
    def g(self, line: bytes) -> None: ...


def test_a_drained_handler_that_sends_nothing_is_not_called_again_and_again() -> None:
    sim = Simulator(Lazy)
    conn = sim.connect()
    conn.send(b"x\n")
    # Output never passed low water, and the handler sent nothing: a busy loop would call
    # it again at once, forever (on a real loop: 100 % CPU).
    assert conn.machine.calls <= 2
    assert conn.state_name == "a"


def test_reading_pauses_above_high_water_and_resumes_at_low_water() -> None:
    sim = Simulator(LineEcho, output_high_water=100, output_low_water=50, output_limit=10_000)
    conn = sim.connect()
    conn.stop_reading()
    conn.send(b"y" * 60 + b"\n" + b"z" * 60 + b"\n")  # 122 bytes out: above high water
    assert conn.paused
    conn.send(b"later\n")
    assert bytes(conn.rbuf.data) == b"later\n"  # kept, not handled while paused
    conn.resume_reading()
    assert not conn.paused
    assert conn.received().endswith(b"later\n")


def test_a_flood_beyond_output_limit_closes_a_slow_consumer() -> None:
    sim = Simulator(LineEcho, output_high_water=100, output_low_water=50, output_limit=1000)
    conn = sim.connect()
    conn.stop_reading()
    conn.send(b"y" * 2000 + b"\n")
    assert conn.close_reason is CloseReason.SLOW_CONSUMER
    assert conn.aborted


# -- the error funnel ------------------------------------------------------------------------------
@attrs.define
class Fragile(Machine):
    closed_with: list[CloseReason] = attrs.field(factory=list)

    reading = State(Line(), initial=True)
    other = State(Line())

    @reading.on(Frame, to=(reading, other))
    def command(self, line: bytes) -> Any:
        if line == b"boom":
            self.send(b"lost\n")
            self.start_timer("t", 1)
            self.subscribe("news")
            self.publish("news", b"lost")
            self.close()
            raise ValueError("boom")
        if line == b"nowhere":
            return "nowhere"
        if line == b"none":
            return None
        if line == b"kbd":
            raise KeyboardInterrupt
        if line == b"exit":
            raise SystemExit(3)
        self.send(b"ok " + line + b"\n")
        return self.reading

    @other.on(Frame, to=other)
    def g(self, line: bytes) -> None: ...

    @reading.on(TimerFired, to=reading)
    def fired(self, event: TimerFired) -> None:
        self.send(b"timer\n")

    def on_closed(self, reason: CloseReason) -> None:
        self.closed_with.append(reason)


def test_a_raising_handler_loses_its_effects_keeps_earlier_output_and_closes_only_itself() -> None:
    sim = Simulator(Pub)
    listener = sim.connect()
    listener.send(b"sub news\n")
    sim.factory = Fragile
    conn = sim.connect()
    bystander = sim.connect()
    conn.send(b"one\nboom\ntwo\n")
    assert conn.received() == b"ok one\n"
    assert conn.close_reason is CloseReason.HANDLER_ERROR
    assert conn.machine.closed_with == [CloseReason.HANDLER_ERROR]
    [(failed, exc)] = sim.errors
    assert failed is conn and isinstance(exc, ValueError) and str(exc) == "boom"
    assert sim.hub.subscribers("news") == 1  # the subscribe effect was dropped
    sim.advance(5)
    assert listener.received() == b""  # the publish effect was dropped
    bystander.send(b"still here\n")
    assert bystander.received() == b"ok still here\n"
    assert sim.stats.transitions()[("Fragile", "reading", "handler error", "closed")] == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            b"nowhere",
            "Fragile.command returned 'nowhere' in state 'reading'; "
            "declared targets: other, reading",
        ),
        (
            b"none",
            "Fragile.command returned None in state 'reading'; declared targets: other, reading",
        ),
    ],
)
def test_returning_an_undeclared_state_is_a_handler_error(line: bytes, message: str) -> None:
    sim = Simulator(Fragile)
    conn = sim.connect()
    conn.send(b"ok\n" + line + b"\n")
    assert conn.received() == b"ok ok\n"
    assert conn.close_reason is CloseReason.HANDLER_ERROR
    [(_, exc)] = sim.errors
    assert isinstance(exc, UndeclaredTransition)
    assert str(exc) == message


@pytest.mark.parametrize(("line", "exc_type"), [(b"kbd", KeyboardInterrupt), (b"exit", SystemExit)])
def test_keyboard_interrupt_and_system_exit_propagate_from_handlers(
    line: bytes, exc_type: type[BaseException]
) -> None:
    sim = Simulator(Fragile)
    conn = sim.connect()
    with pytest.raises(exc_type):
        conn.send(line + b"\n")
    assert sim.errors == []


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_propagate_from_on_closed_and_timers(
    exc_type: type[BaseException],
) -> None:
    @attrs.define
    class Raiser(Machine):
        a = State(Line(), initial=True)

        @a.on(Frame, to=a)
        def f(self, line: bytes) -> None:
            self.start_timer("t", 1)

        @a.on(TimerFired, to=a)
        def fired(self, event: TimerFired) -> None:
            raise exc_type()

        def on_closed(self, reason: CloseReason) -> None:
            raise exc_type()

    sim = Simulator(Raiser)
    conn = sim.connect()
    conn.send(b"x\n")
    with pytest.raises(exc_type):
        sim.advance(1)
    conn2 = sim.connect()
    with pytest.raises(exc_type):
        conn2.send_eof()


class Exploding(Framing):
    """A cutter with a bug: it raises something other than FrameTooLong/ProtocolError."""

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> bytes | None:
        if b"!" in buffer.data:
            raise RuntimeError("cutter bug")
        return Line().cut(buffer, machine)


@attrs.define
class ExplodingMachine(Machine):
    reading = State(Exploding(), initial=True)

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")


def test_an_exception_in_a_custom_cutter_closes_only_that_connection() -> None:
    sim = Simulator(ExplodingMachine)
    conn = sim.connect()
    other = sim.connect()
    conn.send(b"fine\n")
    conn.send(b"bad!\n")  # must not escape to the driver: a server would die with it
    assert conn.close_reason is CloseReason.HANDLER_ERROR
    assert [type(exc) for _, exc in sim.errors] == [RuntimeError]
    other.send(b"ok\n")
    assert other.received() == b"ok\n"


def test_an_exception_in_on_closed_is_reported_and_closes_cleanly() -> None:
    @attrs.define
    class BadHook(Machine):
        a = State(Line(), initial=True)

        @a.on(Frame, to=a)
        def f(self, line: bytes) -> None: ...

        def on_closed(self, reason: CloseReason) -> None:
            raise LookupError("hook")

    sim = Simulator(BadHook)
    conn = sim.connect()
    conn.send_eof()
    assert conn.close_reason is CloseReason.PEER_CLOSED
    assert [str(exc) for _, exc in sim.errors] == ["hook"]
    assert sim.connections == []


def test_protocol_error_without_a_handler_closes_with_reason_protocol_error() -> None:
    sim = Simulator(StrictOnly)
    conn = sim.connect()
    conn.send(b"1\nx\n2\n")
    # with no handler, the error's reply hint is the last thing the peer reads
    assert conn.received() == b"1\nERR number\n"
    assert conn.close_reason is CloseReason.PROTOCOL_ERROR
    assert sim.errors == []  # the peer's fault is not a server error
    assert sim.stats.transitions()[("StrictOnly", "reading", "protocol error", "closed")] == 1


def test_protocol_error_with_a_handler_replies_and_goes_on() -> None:
    sim = Simulator(Tolerant)
    conn = sim.connect()
    conn.send(b"1\nx\n2\n")
    assert conn.received() == b"1\nERR number\n2\n"
    assert not conn.closed
    assert sim.stats.transitions()[("Tolerant", "reading", "protocol error", "reading")] == 1


@attrs.define
class StrictOnly(Machine):
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def number(self, line: bytes) -> None:
        if not line.isdigit():
            self.send(b"lost\n")
            raise ProtocolError(f"not a number: {line!r}", reply=b"ERR number\n")
        self.send(line + b"\n")


@attrs.define
class Tolerant(Machine):
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def number(self, line: bytes) -> None:
        if not line.isdigit():
            self.send(b"lost\n")
            raise ProtocolError(f"not a number: {line!r}", reply=b"ERR number\n")
        self.send(line + b"\n")

    @reading.on(ProtocolError, to=reading)
    def complain(self, exc: ProtocolError) -> None:
        self.send(exc.reply or b"?\n")


def test_a_protocol_error_raised_by_the_protocol_error_handler_closes() -> None:
    @attrs.define
    class Stubborn(Machine):
        reading = State(Line(), initial=True)

        @reading.on(Frame, to=reading)
        def f(self, line: bytes) -> None:
            raise ProtocolError("bad")

        @reading.on(ProtocolError, to=reading)
        def complain(self, exc: ProtocolError) -> None:
            self.send(b"lost\n")
            raise ProtocolError("worse")

    sim = Simulator(Stubborn)
    conn = sim.connect()
    conn.send(b"x\n")
    assert conn.received() == b""
    assert conn.close_reason is CloseReason.PROTOCOL_ERROR


@attrs.define
class Forgiving(Machine):
    """Replies to an over-long line and keeps reading."""

    reading = State(Line(max_length=8), initial=True)

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")

    @reading.on(FrameTooLong, to=reading)
    def too_long(self, exc: FrameTooLong) -> None:
        self.send(b"ERR " + str(exc).encode() + b"\n")


def test_frame_too_long_with_a_handler_replies_once_and_skips_only_that_line() -> None:
    # The tail of an over-long line must not be taken for a line of its own, and the lines
    # pipelined after it must not be lost, however the input is split.
    data = b"ok\n" + b"x" * 20 + b"TAIL\nnext\n"
    for chunks in chunkings(data):
        out, conn = transcript(Forgiving, chunks)
        assert out == b"ok\nERR line longer than 8 bytes\nnext\n", chunks
        assert not conn.closed


def test_frame_too_long_without_a_handler_closes_with_its_reason() -> None:
    out, conn = transcript(LineEcho8, [b"ok\n", b"x" * 9 + b"\n"])
    assert out == b"ok\n"
    assert conn.close_reason is CloseReason.FRAME_TOO_LONG


# -- tracing and counters --------------------------------------------------------------------------
@attrs.define
class LineEcho(Machine):
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")


@attrs.define
class LineEcho8(Machine):
    reading = State(Line(max_length=8), initial=True)

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")


def test_the_tracer_sees_every_transition_explicit_and_implicit() -> None:
    tracer = RecordingTracer()
    sim = Simulator(Recorder, tracer=tracer)
    a = sim.connect()
    b = sim.connect()
    a.send(b"hi\nBODY 2\nxy")
    b.send(b"x" * 17 + b"\n")  # too long: the implicit edge
    a.send_eof()
    assert tracer.transitions == [
        (a.cid, "lines", "opened", "lines"),
        (b.cid, "lines", "opened", "lines"),
        (a.cid, "lines", "frame", "lines"),
        (a.cid, "lines", "frame", "body"),
        (a.cid, "body", "frame", "lines"),
        (b.cid, "lines", "frame too long", "closed"),
        (a.cid, "lines", "peer closed", "lines"),
    ]


def test_logging_tracer_logs_on_statemux_trace(caplog: pytest.LogCaptureFixture) -> None:
    sim = Simulator(LineEcho8, tracer=LoggingTracer())
    with caplog.at_level(logging.INFO, logger="statemux.trace"):
        conn = sim.connect()
        conn.send(b"a\n")
        conn.send(b"b" * 9 + b"\n")
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert records == [
        ("statemux.trace", logging.INFO, f"#{conn.cid} reading --frame--> reading"),
        ("statemux.trace", logging.INFO, f"#{conn.cid} reading --frame too long--> closed"),
    ]


def test_logging_tracer_is_silent_below_its_level(caplog: pytest.LogCaptureFixture) -> None:
    sim = Simulator(LineEcho, tracer=LoggingTracer(level=logging.DEBUG))
    with caplog.at_level(logging.INFO, logger="statemux.trace"):
        sim.connect().send(b"a\n")
    assert caplog.records == []


def test_stats_count_transitions_close_reasons_and_untaken_edges() -> None:
    sim = Simulator(Recorder)
    for _ in range(3):
        conn = sim.connect()
        conn.send(b"a\nb\n")
        conn.send_eof()
    conn = sim.connect()
    conn.send(b"x" * 17)
    transitions = sim.stats.transitions()
    assert transitions == {
        ("Recorder", "lines", "opened", "lines"): 4,
        ("Recorder", "lines", "frame", "lines"): 6,
        ("Recorder", "lines", "peer closed", "lines"): 3,
        ("Recorder", "lines", "frame too long", "closed"): 1,
    }
    assert sim.stats.close_reasons == {CloseReason.NORMAL: 3, CloseReason.FRAME_TOO_LONG: 1}
    untaken = [(e.source, e.event, e.target) for e in sim.stats.untaken(Recorder.spec)]
    assert untaken == [
        ("lines", "frame", "body"),
        ("body", "frame", "lines"),
        ("body", "peer closed", "lines"),
    ]
    every = sim.stats.untaken(Recorder.spec, explicit_only=False)
    assert ("body", "frame too long", "closed") in {(e.source, e.event, e.target) for e in every}
    assert ("lines", "frame too long", "closed") not in {
        (e.source, e.event, e.target) for e in every
    }


def test_untaken_lists_every_explicit_edge_of_an_unused_machine() -> None:
    sim = Simulator(Recorder)
    assert len(sim.stats.untaken(Recorder.spec)) == sum(not e.implicit for e in Recorder.spec.edges)
