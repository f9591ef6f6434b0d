"""Named limits: their defaults, their validation, and what a peer sees when each one bites
(those not already exercised by the runner and server suites)."""

from __future__ import annotations

import functools
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from statemux import (
    CloseReason,
    Datagram,
    Frame,
    Limits,
    Line,
    Machine,
    MultiplexingTCPServer,
    MultiplexingUDPServer,
    Raw,
    State,
)
from statemux.testing import Simulator, serving

pytestmark = pytest.mark.timeout(20)

WAIT = 5.0

DEFAULTS = {
    "output_high_water": 64 * 1024,
    "output_low_water": 16 * 1024,
    "output_limit": 4 * 1024 * 1024,
    "frames_per_event": 64,
    "read_size": 64 * 1024,
    "max_connections": 10_000,
    "idle_timeout": 300.0,
    "drain_timeout": 5.0,
    "flush_timeout": 30.0,
    "linger_timeout": 2.0,
    "linger_bytes": 1024 * 1024,
    "accepts_per_event": 64,
    "accept_retry_delay": 0.5,
    "session_timeout": 60.0,
    "datagram_queue": 1024,
}


def test_every_limit_has_its_documented_default() -> None:
    assert attrs.asdict(Limits()) == DEFAULTS


BAD_LIMITS = [
    ({"output_limit": 0}, ValueError, "output_limit must be positive, not 0"),
    ({"read_size": -1}, ValueError, "read_size must be positive, not -1"),
    ({"idle_timeout": 0.0}, ValueError, "idle_timeout must be positive, not 0.0"),
    ({"idle_timeout": math.nan}, ValueError, "idle_timeout must be positive, not nan"),
    ({"max_connections": 0}, ValueError, "max_connections must be positive, not 0"),
    (
        {"output_low_water": 100, "output_high_water": 50},
        ValueError,
        "output_low_water (100) must not exceed output_high_water (50)",
    ),
    (
        {"output_high_water": 10 << 20},
        ValueError,
        "output_high_water (10485760) must not exceed output_limit (4194304)",
    ),
]


@pytest.mark.parametrize(("changes", "exc_type", "message"), BAD_LIMITS)
def test_a_bad_limit_is_refused_naming_it_and_its_value(
    changes: dict[str, Any], exc_type: type[Exception], message: str
) -> None:
    with pytest.raises(exc_type, match=f"^{re.escape(message)}$"):
        Limits(**changes)
    with pytest.raises(exc_type, match=f"^{re.escape(message)}$"):
        Limits().evolve(**changes)


def test_unknown_limits_are_named() -> None:
    with pytest.raises(TypeError, match="^unknown limit\\(s\\): bogus, nonsense$"):
        Limits().evolve(nonsense=1, bogus=2)
    with pytest.raises(TypeError, match="^unknown limit\\(s\\): bogus$"):
        MultiplexingTCPServer(("127.0.0.1", 0), Echo, bogus=1)


def test_timeouts_may_be_turned_off_with_none() -> None:
    assert Limits(idle_timeout=None).idle_timeout is None


def test_a_server_class_may_set_its_own_limits_and_keywords_override_them() -> None:
    class Small(MultiplexingTCPServer):
        limits = Limits(max_connections=5, idle_timeout=30)

    with Small(("127.0.0.1", 0), Echo, idle_timeout=7) as server:
        assert (server.limits.max_connections, server.limits.idle_timeout) == (5, 7)
    with MultiplexingTCPServer(("127.0.0.1", 0), Echo) as plain:
        assert plain.limits == Limits()


def test_the_simulator_takes_limits_like_a_server() -> None:
    sim = Simulator(Echo, limits=Limits(max_connections=3), read_size=10)
    assert (sim.limits.max_connections, sim.limits.read_size) == (3, 10)


# -- limits a peer can feel, over real sockets -----------------------------------------------------
@attrs.define
class Echo(Machine):
    reading = State(Line(), initial=True)
    done = State(final=True)

    @reading.on(Frame, to=(reading, done))
    def echo(self, line: bytes) -> State:
        if line == b"quit":
            self.send(b"bye\n")
            return self.done
        self.send(line + b"\n")
        return self.reading


@attrs.define
class Sizes(Machine):
    """Replies with the size of every raw piece it is handed."""

    reading = State(Raw(), initial=True)

    @reading.on(Frame, to=reading)
    def size(self, data: bytes) -> None:
        self.send(b"%d\n" % len(data))


class Closed:
    """Collects close reasons from on_closed, from the loop thread, for the test thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.reasons: list[CloseReason] = []

    def add(self, reason: CloseReason) -> None:
        with self.cond:
            self.reasons.append(reason)
            self.cond.notify_all()

    def wait(self, n: int = 1) -> list[CloseReason]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.reasons) >= n, WAIT), self.reasons
            return list(self.reasons)


@attrs.define
class ReportingEcho(Echo):
    closed: Closed = attrs.field(factory=Closed)

    def on_closed(self, reason: CloseReason) -> None:
        self.closed.add(reason)


@pytest.fixture
def connect() -> Iterator[Callable[[Any], socket.socket]]:
    made: list[socket.socket] = []

    def _connect(address: Any) -> socket.socket:
        sock = socket.create_connection(address, timeout=WAIT)
        made.append(sock)
        return sock

    yield _connect
    for sock in made:
        sock.close()


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def test_read_size_bounds_what_one_read_hands_the_machine(connect: Any) -> None:
    server = MultiplexingTCPServer(("127.0.0.1", 0), Sizes, read_size=16)
    with serving(server) as addr:
        sock = connect(addr)
        sock.sendall(b"z" * 100)
        sock.shutdown(socket.SHUT_WR)
        sizes = [int(n) for n in read_to_eof(sock).split()]
    assert sum(sizes) == 100
    assert max(sizes) <= 16


def test_idle_timeout_closes_a_silent_client(connect: Any) -> None:
    closed = Closed()
    server = MultiplexingTCPServer(
        ("127.0.0.1", 0), functools.partial(ReportingEcho, closed=closed), idle_timeout=0.2
    )
    with serving(server) as addr:
        sock = connect(addr)
        sock.sendall(b"hi\n")
        start = time.monotonic()
        assert read_to_eof(sock) == b"hi\n"  # EOF once the client has been silent long enough
        assert time.monotonic() - start < WAIT
        sock.close()
        assert closed.wait() == [CloseReason.IDLE]


def test_linger_timeout_bounds_the_wait_for_the_peers_eof(connect: Any) -> None:
    closed = Closed()
    server = MultiplexingTCPServer(
        ("127.0.0.1", 0), functools.partial(ReportingEcho, closed=closed), linger_timeout=0.2
    )
    with serving(server) as addr:
        sock = connect(addr)
        sock.sendall(b"quit\n")
        assert read_to_eof(sock) == b"bye\n"
        # The client keeps its end open; the server stops waiting after linger_timeout.
        start = time.monotonic()
        assert closed.wait() == [CloseReason.NORMAL]
        assert time.monotonic() - start < 1.5  # not the 2 s default


def test_linger_bytes_bounds_what_is_discarded_while_lingering(connect: Any) -> None:
    closed = Closed()
    server = MultiplexingTCPServer(
        ("127.0.0.1", 0),
        functools.partial(ReportingEcho, closed=closed),
        linger_timeout=60,
        linger_bytes=1000,
    )
    with serving(server) as addr:
        sock = connect(addr)
        sock.sendall(b"quit\n")
        assert read_to_eof(sock) == b"bye\n"
        try:
            for _ in range(100):
                sock.sendall(b"w" * 1000)
        except OSError:
            pass  # the server gave up lingering and closed
        assert closed.wait() == [CloseReason.NORMAL]  # long before the 60 s linger_timeout


def test_accepts_per_event_one_still_serves_a_burst_of_clients(connect: Any) -> None:
    server = MultiplexingTCPServer(("127.0.0.1", 0), Echo, accepts_per_event=1)
    with serving(server) as addr:
        socks = [connect(addr) for _ in range(30)]
        for i, sock in enumerate(socks):
            sock.sendall(b"%d\n" % i)
        for i, sock in enumerate(socks):
            assert sock.recv(10) == b"%d\n" % i


@attrs.define
class DatagramEcho(Machine):
    closed: Closed = attrs.field(factory=Closed)

    reading = State(Datagram(max_size=100), initial=True)

    @reading.on(Frame, to=reading)
    def echo(self, data: bytes) -> None:
        self.send(data)

    def on_closed(self, reason: CloseReason) -> None:
        self.closed.add(reason)


def test_session_timeout_expires_a_quiet_datagram_session() -> None:
    closed = Closed()
    server = MultiplexingUDPServer(
        ("127.0.0.1", 0), functools.partial(DatagramEcho, closed=closed), session_timeout=0.2
    )
    with serving(server) as addr, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT)
        sock.sendto(b"ping", addr)
        assert sock.recvfrom(100)[0] == b"ping"
        assert closed.wait() == [CloseReason.IDLE]
        sock.sendto(b"again", addr)  # a new session for the same peer
        assert sock.recvfrom(100)[0] == b"again"


@attrs.define
class SendsALotThenCloses(Machine):
    """On any line: queue far more than a small socket buffer holds, then close."""

    closed: Closed
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def flood(self, line: bytes) -> None:
        self.send(b"x" * (8 * 1024 * 1024))
        self.close()

    def on_closed(self, reason: CloseReason) -> None:
        self.closed.add(reason)


def test_flush_timeout_cuts_off_a_peer_that_stops_reading_during_a_graceful_close() -> None:
    closed = Closed()
    gone = threading.Event()

    class Server(MultiplexingTCPServer):
        def _forget(self, conn: Any) -> None:  # the connection has left the table
            super()._forget(conn)
            gone.set()

    server = Server(
        ("127.0.0.1", 0),
        functools.partial(SendsALotThenCloses, closed),
        flush_timeout=0.3,
        output_limit=64 * 1024 * 1024,
    )
    with serving(server) as addr:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT)
        sock.connect(addr)
        sock.sendall(b"go\n")  # and never read: the close cannot finish on its own
        assert gone.wait(WAIT)  # (read nothing until the server gave up on us)
        assert closed.wait() == [CloseReason.SLOW_CONSUMER]
        with pytest.raises(ConnectionResetError):  # the reply was cut short: a reset
            while sock.recv(1 << 20):
                pass
        assert server.stats.close_reasons[CloseReason.SLOW_CONSUMER] == 1
        assert server.connections == []
        sock.close()
