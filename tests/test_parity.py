"""One machine, every model, every family: the same transcript gives the same replies and the
same close reasons under sync, threading, forking and multiplexing servers.

Each stream transcript is first run through the sans-I/O simulator (the reference); then, for
every model and stream family, a real client plays it over a socket. Datagram transcripts do
the same on UDP and Unix datagram sockets. Where a model cannot run a machine, the suite
asserts the refusal instead; where it runs it differently, the difference is the documented
one (docs/models.md, "The model × machine matrix").
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

import statemux
from statemux import (
    CloseReason,
    Datagram,
    Exact,
    Frame,
    FrameTooLong,
    Line,
    Machine,
    Opened,
    ProtocolError,
    State,
    TimedOut,
    TimerFired,
    UnsupportedMachine,
)
from statemux.testing import Simulator, serving

pytestmark = pytest.mark.timeout(20)

MODELS = ["sync", "threading", "forking", "multiplexing"]
PREFIX = {
    "sync": "",
    "threading": "Threading",
    "forking": "Forking",
    "multiplexing": "Multiplexing",
}
STREAM_FAMILIES = ["TCP", "UnixStream"]
DATAGRAM_FAMILIES = ["UDP", "UnixDatagram"]


# -- test machines ---------------------------------------------------------------------------------
@attrs.define
class LineEcho(Machine):
    """Echo lines up to 16 bytes; ``quit`` says bye and closes. Too long: implicit close."""

    reading = State(Line(max_length=16), initial=True)
    done = State(final=True)

    @reading.on(Frame, to=(reading, done))
    def line(self, line: bytes) -> State:
        if line == b"quit":
            self.send(b"bye\n")
            return LineEcho.done
        self.send(line + b"\n")
        return LineEcho.reading


@attrs.define
class Sized(Machine):
    """A decimal length line, then exactly that many bytes (at most 64)."""

    header = State(Line(max_length=16), initial=True)
    body = State(Exact("length", max_size=64))
    done = State(final=True)
    length: int = 0

    @header.on(Frame, to=body)
    def got_header(self, line: bytes) -> None:
        if not line.isdigit():
            raise ProtocolError("bad length", reply=b"ERR bad length\n")
        self.length = int(line)

    @header.on(ProtocolError, to=done)
    def bad_header(self, exc: ProtocolError) -> None:
        self.send(exc.reply or b"ERR\n")

    @body.on(Frame, to=header)
    def got_body(self, data: bytes) -> None:
        self.send(b"%d:%s\n" % (len(data), data))


@attrs.define
class Greeter(Machine):
    """Greets on open, nudges after a named timer, says ``timeout`` when its state times out."""

    waiting = State(Line(max_length=64), initial=True, timeout=0.3)
    done = State(final=True)

    @waiting.on(Opened, to=waiting)
    def opened(self, event: Opened) -> None:
        self.send(b"hello\n")
        self.start_timer("nudge", 0.05)

    @waiting.on(TimerFired, to=waiting)
    def nudge(self, event: TimerFired) -> None:
        self.send(b"%s\n" % event.name.encode())

    @waiting.on(Frame, to=waiting)
    def line(self, line: bytes) -> None:
        self.send(line + b"\n")

    @waiting.on(TimedOut, to=done)
    def timed_out(self, event: TimedOut) -> None:
        self.send(b"timeout\n")


@attrs.define
class Deadline(Machine):
    """Echo, but the state times out with no handler: the implicit TIMEOUT close."""

    reading = State(Line(max_length=64), initial=True, timeout=0.15)

    @reading.on(Frame, to=reading)
    def line(self, line: bytes) -> None:
        self.send(line + b"\n")


@attrs.define
class Raiser(Machine):
    """Echo; ``boom`` raises after sending (the partial output is dropped)."""

    reading = State(Line(max_length=64), initial=True)

    @reading.on(Frame, to=reading)
    def line(self, line: bytes) -> None:
        self.send(b"partial ")
        if line == b"boom":
            raise RuntimeError("boom")
        self.send(line + b"\n")


# datagram machines
@attrs.define
class DgEcho(Machine):
    """Stateless datagram echo; over 32 bytes gets an error reply."""

    echoing = State(Datagram(max_size=32), initial=True)

    @echoing.on(Frame, to=echoing)
    def echo(self, data: bytes) -> None:
        self.send(data)

    @echoing.on(FrameTooLong, to=echoing)
    def too_long(self, exc: FrameTooLong) -> None:
        self.send(b"ERR %s\n" % str(exc).encode())


@attrs.define
class DgRaiser(Machine):
    """Stateless datagram echo that raises on ``boom``."""

    echoing = State(Datagram(max_size=32), initial=True)

    @echoing.on(Frame, to=echoing)
    def echo(self, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("boom")
        self.send(data)


@attrs.define
class DgCounter(Machine):
    """Counts each peer's datagrams: per-peer state (forking datagram servers refuse it)."""

    counting = State(Datagram(max_size=32), initial=True)
    per_peer_state = True
    seen: int = 0

    @counting.on(Frame, to=counting)
    def count(self, data: bytes) -> None:
        self.seen += 1
        self.send(b"%d %s" % (self.seen, data))


@attrs.define
class DgPatient(Machine):
    """Replies, then says ``bye`` when its session's state times out."""

    waiting = State(Datagram(max_size=32), initial=True, timeout=0.15)
    done = State(final=True)

    @waiting.on(Frame, to=waiting)
    def echo(self, data: bytes) -> None:
        self.send(data)

    @waiting.on(TimedOut, to=done)
    def bye(self, event: TimedOut) -> None:
        self.send(b"bye")


# -- transcripts -----------------------------------------------------------------------------------
@attrs.frozen
class StreamCase:
    name: str
    factory: Callable[[], Machine]
    chunks: tuple[bytes, ...]
    eof: bool
    replies: bytes
    reason: CloseReason
    errors: int = 0
    #: seconds of (fake) time the reference needs for timers to fire
    wait: float = 0.0


STREAM_CASES = [
    StreamCase(
        "echo", LineEcho, (b"hi\n", b"there\n"), True, b"hi\nthere\n", CloseReason.PEER_CLOSED
    ),
    StreamCase(
        "echo-pipelined-quit",
        LineEcho,
        (b"hi\nquit\nnever\n",),
        False,
        b"hi\nbye\n",
        CloseReason.NORMAL,
    ),
    StreamCase("echo-unterminated", LineEcho, (b"hi\nab",), True, b"hi\n", CloseReason.PEER_CLOSED),
    StreamCase(
        "line-too-long",
        LineEcho,
        (b"ok\n", b"x" * 40 + b"\n"),
        False,
        b"ok\n",
        CloseReason.FRAME_TOO_LONG,
    ),
    StreamCase(
        "line-too-long-unterminated", LineEcho, (b"y" * 17,), False, b"", CloseReason.FRAME_TOO_LONG
    ),
    StreamCase(
        "exact-body",
        Sized,
        (b"5\nhel", b"lo3\nabc"),
        True,
        b"5:hello\n3:abc\n",
        CloseReason.PEER_CLOSED,
    ),
    StreamCase(
        "exact-body-too-long", Sized, (b"2\nok100\n",), False, b"2:ok\n", CloseReason.FRAME_TOO_LONG
    ),
    StreamCase(
        "protocol-error-reply", Sized, (b"zz\n",), False, b"ERR bad length\n", CloseReason.NORMAL
    ),
    StreamCase(
        "handler-raises",
        Raiser,
        (b"a\nboom\nb\n",),
        False,
        b"partial a\n",
        CloseReason.HANDLER_ERROR,
        errors=1,
    ),
    StreamCase(
        "timers", Greeter, (), False, b"hello\nnudge\ntimeout\n", CloseReason.NORMAL, wait=1.0
    ),
    StreamCase("state-timeout", Deadline, (b"x\n",), False, b"x\n", CloseReason.TIMEOUT, wait=1.0),
]


@attrs.frozen
class DatagramCase:
    name: str
    factory: Callable[[], Machine]
    #: (datagram, replies it causes)
    exchange: tuple[tuple[bytes, tuple[bytes, ...]], ...]
    #: close reasons once the server has closed; forking: one session per datagram
    reasons: dict[CloseReason, int]
    forking_reasons: dict[CloseReason, int] | None
    errors: int = 0


DATAGRAM_CASES = [
    DatagramCase(
        "echo-and-oversize",
        DgEcho,
        (
            (b"one", (b"one",)),
            (b"two", (b"two",)),
            (b"x" * 100, (b"ERR datagram longer than 32 bytes\n",)),
        ),
        {CloseReason.SHUTDOWN: 1},
        {CloseReason.NORMAL: 3},
    ),
    DatagramCase(
        "handler-raises",
        DgRaiser,
        ((b"a", (b"a",)), (b"boom", ()), (b"b", (b"b",))),
        {CloseReason.HANDLER_ERROR: 1, CloseReason.SHUTDOWN: 1},
        {CloseReason.HANDLER_ERROR: 1, CloseReason.NORMAL: 2},
        errors=1,
    ),
    DatagramCase(
        "per-peer-state",
        DgCounter,
        ((b"a", (b"1 a",)), (b"b", (b"2 b",))),
        {CloseReason.SHUTDOWN: 1},
        None,
    ),
    DatagramCase(
        "session-timeout", DgPatient, ((b"hi", (b"hi", b"bye")),), {CloseReason.NORMAL: 1}, None
    ),
]


# -- the reference: the sans-I/O simulator ---------------------------------------------------------
def simulate_stream(case: StreamCase) -> tuple[bytes, CloseReason | None, int]:
    sim = Simulator(case.factory)
    conn = sim.connect()
    out = bytearray(conn.received())
    for chunk in case.chunks:
        if conn.closed:
            break
        conn.send(chunk)
        out += conn.received()
    if case.eof and not conn.closed:
        conn.send_eof()
        out += conn.received()
    if case.wait:
        sim.advance(case.wait)
        out += conn.received()
    return bytes(out), conn.close_reason, len(sim.errors)


def simulate_datagrams(case: DatagramCase) -> list[bytes]:
    sim = Simulator(case.factory)
    conn = sim.connect()
    replies = []
    for datagram, expected in case.exchange:
        if conn.closed:
            conn = sim.connect()
        conn.receive_datagram(datagram)
        sim.run_ready()
        if len(expected) > 1:
            sim.advance(1.0)
        data = conn.received()
        # Replies come back concatenated here; split them where the transcript says.
        for reply in expected:
            assert data.startswith(reply)
            replies.append(reply)
            data = data[len(reply) :]
        assert data == b""
    return replies


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c.name)
def test_the_reference_agrees_with_each_stream_transcript(case: StreamCase) -> None:
    assert simulate_stream(case) == (case.replies, case.reason, case.errors)


@pytest.mark.parametrize("case", DATAGRAM_CASES, ids=lambda c: c.name)
def test_the_reference_agrees_with_each_datagram_transcript(case: DatagramCase) -> None:
    assert simulate_datagrams(case) == [r for _, rs in case.exchange for r in rs]


# -- real servers ----------------------------------------------------------------------------------
def server_class(model: str, family: str) -> type:
    return getattr(statemux, f"{PREFIX[model]}{family}Server")  # type: ignore[no-any-return]


class ErrorPipe:
    """Counts handle_error calls across processes (a forked child reports through the pipe)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)

    def count(self) -> int:
        try:
            return len(os.read(self.r, 4096))
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def errors() -> Iterator[ErrorPipe]:
    pipe = ErrorPipe()
    yield pipe
    pipe.close()


def counting_errors(cls: type, pipe: ErrorPipe) -> type:
    class Counted(cls):  # type: ignore[misc,valid-type]
        def handle_error(self, request: Any, client_address: Any) -> None:
            os.write(pipe.w, b"E")

    Counted.__name__ = cls.__name__
    return Counted


def address_for(family: str, tmp: str) -> Any:
    if family in ("TCP", "UDP"):
        return ("127.0.0.1", 0)
    return os.path.join(tmp, "srv.sock")


class Client(socket.socket):
    """A client socket that hangs up with shutdown() before close(): a forked child holds a
    copy of every descriptor of this process, clients' too, and close() alone would leave
    the connection open in that copy (the server would wait out its linger_timeout)."""

    def close(self) -> None:
        if self.fileno() >= 0:
            with contextlib.suppress(OSError):
                self.shutdown(socket.SHUT_RDWR)
        super().close()


def play_stream(address: Any, family: str, chunks: tuple[bytes, ...], eof: bool) -> bytes:
    af = socket.AF_INET if family == "TCP" else socket.AF_UNIX
    with Client(af, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(address)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            if eof:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = bytearray()
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
        return bytes(out)


@pytest.mark.parametrize("family", STREAM_FAMILIES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c.name)
def test_stream_transcripts_match_under_every_model(
    case: StreamCase, model: str, family: str, short_tmp: str, errors: ErrorPipe
) -> None:
    cls = counting_errors(server_class(model, family), errors)
    with cls(address_for(family, short_tmp), case.factory) as srv:
        with serving(srv) as address:
            replies = play_stream(address, family, case.chunks, case.eof)
    assert replies == case.replies
    assert srv.stats.close_reasons == Counter({case.reason: 1})
    assert errors.count() == case.errors


def play_datagrams(address: Any, family: str, case: DatagramCase, tmp: str) -> list[bytes]:
    af = socket.AF_INET if family == "UDP" else socket.AF_UNIX
    with socket.socket(af, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.bind(("127.0.0.1", 0) if family == "UDP" else os.path.join(tmp, "client.sock"))
        replies = []
        for datagram, expected in case.exchange:
            sock.sendto(datagram, address)
            for _ in expected:
                replies.append(sock.recv(65536))
        return replies


@pytest.mark.parametrize("family", DATAGRAM_FAMILIES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", DATAGRAM_CASES, ids=lambda c: c.name)
def test_datagram_transcripts_match_under_every_model(
    case: DatagramCase, model: str, family: str, short_tmp: str, errors: ErrorPipe
) -> None:
    cls = counting_errors(server_class(model, family), errors)
    address = address_for(family, short_tmp)
    if model == "forking" and case.forking_reasons is None:
        with pytest.raises(UnsupportedMachine, match="keeps per-peer state across datagrams"):
            cls(address, case.factory)
        assert not os.path.exists(os.path.join(short_tmp, "srv.sock"))
        return
    with cls(address, case.factory) as srv:
        with serving(srv) as bound:
            replies = play_datagrams(bound, family, case, short_tmp)
    assert replies == [r for _, rs in case.exchange for r in rs]
    expected = case.forking_reasons if model == "forking" else case.reasons
    assert srv.stats.close_reasons == Counter(expected)
    assert errors.count() == case.errors
    assert srv.datagrams_dropped == 0


@pytest.mark.parametrize("model", MODELS)
def test_an_unbound_unix_sender_is_served_but_gets_no_reply(
    model: str, short_tmp: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="statemux")
    cls = server_class(model, "UnixDatagram")
    with cls(address_for("UnixDatagram", short_tmp), DgEcho) as srv:
        with serving(srv) as address:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound:
                unbound.sendto(b"ping", address)
            # A bound peer's exchange afterwards shows the server went on (and is in order).
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bound:
                bound.settimeout(5)
                bound.bind(os.path.join(short_tmp, "c"))
                bound.sendto(b"pong", address)
                assert bound.recv(100) == b"pong"
    assert srv.replies_unroutable == 1
    if model != "forking":  # there the warning is logged by the child
        assert "reply of 4 bytes dropped: the peer sent from an unbound socket" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    edge = DgEcho.spec.edge("echoing", "frame", "echoing")
    assert srv.stats.edge_counts(DgEcho.spec)[edge.index] == 2  # both datagrams were handled


@pytest.mark.parametrize("model", MODELS)
def test_transition_counts_are_the_same_under_every_model(model: str) -> None:
    factory = functools.partial(Sized)
    with server_class(model, "TCP")(("127.0.0.1", 0), factory) as srv:
        with serving(srv) as address:
            for _ in range(3):
                assert play_stream(address, "TCP", (b"1\na2\nbc",), True) == b"1:a\n2:bc\n"
    taken = srv.stats.transitions()
    assert taken[("Sized", "header", "frame", "body")] == 6
    assert taken[("Sized", "body", "frame", "header")] == 6
    assert taken[("Sized", "header", "peer closed", "closed")] == 3
