"""Multiplexing servers over real sockets (TCP on loopback and Unix stream sockets in a short
temporary directory): serving, flow control, errors, shutdown and the socketserver interface."""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from statemux import (
    CloseReason,
    Frame,
    FrameTooLong,
    Line,
    Loop,
    Machine,
    MultiplexingTCPServer,
    MultiplexingUnixStreamServer,
    Opened,
    PeerClosed,
    State,
)
from statemux.testing import serving
from statemux.trace import RecordingTracer

pytestmark = pytest.mark.timeout(30)

WAIT = 5.0  # upper bound of every wait for an event; never a sleep


# -- machines and probes ---------------------------------------------------------------------------
class Probe:
    """What the machines of one server report to the test thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.opened = 0
        self.closed: list[CloseReason] = []

    def on_opened(self) -> None:
        with self.cond:
            self.opened += 1
            self.cond.notify_all()

    def on_closed(self, reason: CloseReason) -> None:
        with self.cond:
            self.closed.append(reason)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[Probe], bool], timeout: float = WAIT) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self), timeout), (
                f"timed out: opened={self.opened} closed={self.closed}"
            )


@attrs.define
class Service(Machine):
    """Echoes lines. ``flood N`` sends N bytes at once, ``boom`` raises, ``quit`` says bye and
    closes. An over-long line gets ``ERR line longer than 1024 bytes`` and the connection
    closes; on EOF the unterminated rest is echoed."""

    probe: Probe = attrs.field(factory=Probe)

    reading = State(Line(max_length=1024), initial=True)
    done = State(final=True)

    refusal = b"busy\n"

    @reading.on(Opened, to=reading)
    def opened(self, event: Opened) -> None:
        self.probe.on_opened()

    @reading.on(Frame, to=(reading, done))
    def command(self, line: bytes) -> State:
        if line.startswith(b"flood "):
            self.send(b"x" * int(line[6:]))
        elif line == b"boom":
            raise ValueError("boom")
        elif line == b"quit":
            self.send(b"bye\n")
            return self.done
        else:
            self.send(line + b"\n")
        return self.reading

    @reading.on(FrameTooLong, to=done)
    def too_long(self, exc: FrameTooLong) -> None:
        self.send(b"ERR %s\n" % str(exc).encode())

    @reading.on(PeerClosed, to=done)
    def peer_closed(self, event: PeerClosed) -> None:
        self.send(event.unterminated)

    def on_closed(self, reason: CloseReason) -> None:
        self.probe.on_closed(reason)


@attrs.define
class Strict(Machine):
    """Echoes lines; has no handler for over-long lines (the implicit edge closes)."""

    probe: Probe = attrs.field(factory=Probe)

    reading = State(Line(max_length=1024), initial=True)

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")

    def on_closed(self, reason: CloseReason) -> None:
        self.probe.on_closed(reason)


class RecordingTCPServer(MultiplexingTCPServer):
    """Keeps what handle_error was called with: (peer of the socket, address, exception)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.errors: list[tuple[Any, Any, BaseException | None]] = []
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        peer = request.getpeername() if request is not None else None
        self.errors.append((peer, client_address, sys.exc_info()[1]))


class SmallSendBuffer(MultiplexingTCPServer):
    """Accepted sockets get a small kernel send buffer, so output stays in the server's."""

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        super().process_request(request, client_address)


# -- helpers ---------------------------------------------------------------------------------------
@pytest.fixture
def clients() -> Iterator[Callable[..., socket.socket]]:
    """``connect(address, rcvbuf=None)``: a client socket with a timeout, closed after the test."""
    made: list[socket.socket] = []

    def connect(address: Any, rcvbuf: int | None = None) -> socket.socket:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        made.append(sock)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(WAIT)
        sock.connect(address)
        return sock

    yield connect
    for sock in made:
        sock.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def read_to_eof(sock: socket.socket, limit: int = 64 << 20) -> bytes:
    data = bytearray()
    while len(data) < limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError("no EOF")


def on_loop(server: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in the server's loop thread (where the connection table lives)."""
    box: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed to the test thread
            box.append((False, exc))
        finally:
            done.set()

    server.loop.call_soon_threadsafe(run)
    assert done.wait(WAIT), "the loop did not run the callback"
    ok, value = box[0]
    if not ok:
        raise value
    return value


def make_server(family: str, factory: Any, short_tmp: str, cls: Any = None, **limits: Any) -> Any:
    if family == "tcp":
        return (cls or MultiplexingTCPServer)(("127.0.0.1", 0), factory, **limits)
    return (cls or MultiplexingUnixStreamServer)(os.path.join(short_tmp, "s"), factory, **limits)


FAMILIES = ["tcp", "unix"]


# -- serving ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_line_echo_with_a_graceful_end(family: str, short_tmp: str, clients: Any) -> None:
    probe = Probe()
    with serving(make_server(family, functools.partial(Service, probe=probe), short_tmp)) as addr:
        sock = clients(addr)
        sock.sendall(b"hello\nwor")
        assert read_exactly(sock, 6) == b"hello\n"
        sock.sendall(b"ld\nunterminated")
        assert read_exactly(sock, 6) == b"world\n"
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"unterminated"
        probe.wait(lambda p: p.closed == [CloseReason.NORMAL])


@pytest.mark.parametrize("family", FAMILIES)
def test_many_clients_interleaved(family: str, short_tmp: str, clients: Any) -> None:
    with serving(make_server(family, Service, short_tmp)) as addr:
        socks = [clients(addr) for _ in range(20)]
        for round_ in range(3):
            for i, sock in enumerate(socks):
                sock.sendall(b"%d-%d\n" % (i, round_))
            for i, sock in enumerate(socks):
                expected = b"%d-%d\n" % (i, round_)
                assert read_exactly(sock, len(expected)) == expected


def test_a_thousand_concurrent_connections(
    raise_nofile: Callable[[int], int], clients: Any
) -> None:
    n = 1000
    raise_nofile(2 * n + 200)  # client and server ends both live in this process
    server = MultiplexingTCPServer(("127.0.0.1", 0), Service)
    with serving(server) as addr:
        socks = [clients(addr) for _ in range(n)]
        for i, sock in enumerate(socks):
            sock.sendall(b"client %d\n" % i)
        for i, sock in enumerate(socks):
            expected = b"client %d\n" % i
            assert read_exactly(sock, len(expected)) == expected
        assert on_loop(server, lambda: len(server.connections)) == n
        for sock in socks[:10]:
            sock.sendall(b"again\n")
            assert read_exactly(sock, 6) == b"again\n"


def _send_until_stalled(sock: socket.socket, payload: bytes) -> int:
    """Send without reading until the peer stops taking bytes for a while; return the total."""
    sock.setblocking(False)
    sent = 0
    for _ in range(100_000):  # bounded: a few hundred MB at most
        try:
            sent += sock.send(payload)
            continue
        except BlockingIOError:
            pass
        # Writable again within 0.5 s means the server still reads; otherwise it stopped.
        _, writable, _ = select.select([], [sock], [], 0.5)
        if not writable:
            return sent
    raise AssertionError("the server never stopped reading")


def test_a_client_that_never_reads_is_paused_and_bounded(clients: Any) -> None:
    server = MultiplexingTCPServer(("127.0.0.1", 0), Service, drain_timeout=0.2)
    limits = server.limits
    with serving(server) as addr:
        hog = clients(addr, rcvbuf=4096)
        hog_port = hog.getsockname()
        line = b"y" * 999 + b"\n"
        sent = _send_until_stalled(hog, line * 64)
        assert sent > limits.output_high_water

        def hog_row() -> Any:
            [row] = [r for r in server.connections if r.peer == hog_port]
            return row

        row = hog_row_before = on_loop(server, hog_row)
        # Output buffered in the server is bounded by high water plus one read's worth.
        assert row.buffered_out <= limits.output_high_water + limits.read_size
        assert row.buffered_in <= limits.read_size
        assert row.closing is None
        # Others are served meanwhile, and the hog is not read any further.
        other = clients(addr)
        for i in range(5):
            other.sendall(b"other %d\n" % i)
            assert read_exactly(other, 8) == b"other %d\n" % i
        row = on_loop(server, hog_row)
        assert row.bytes_in == hog_row_before.bytes_in
        assert row.buffered_out == hog_row_before.buffered_out


def test_a_flood_beyond_output_limit_closes_the_slow_consumer(clients: Any) -> None:
    probe = Probe()
    server = MultiplexingTCPServer(
        ("127.0.0.1", 0),
        functools.partial(Service, probe=probe),
        output_limit=1 << 20,
    )
    with serving(server) as addr:
        hog = clients(addr, rcvbuf=4096)
        hog.sendall(b"flood %d\n" % (16 << 20))  # more than any kernel buffers between us
        probe.wait(lambda p: p.closed == [CloseReason.SLOW_CONSUMER])
        assert server.stats.close_reasons[CloseReason.SLOW_CONSUMER] == 1
        other = clients(addr)
        other.sendall(b"still served\n")
        assert read_exactly(other, 13) == b"still served\n"


def test_an_over_long_line_gets_the_machines_error_reply(clients: Any) -> None:
    probe = Probe()
    server = MultiplexingTCPServer(("127.0.0.1", 0), functools.partial(Service, probe=probe))
    with serving(server) as addr:
        sock = clients(addr)
        sock.sendall(b"ok\n" + b"z" * 2000 + b"\n")
        assert read_to_eof(sock) == b"ok\nERR line longer than 1024 bytes\n"
        sock.close()  # ends the server's lingering at once
        probe.wait(lambda p: p.closed == [CloseReason.NORMAL])


def test_an_over_long_line_without_a_handler_closes_as_frame_too_long(clients: Any) -> None:
    probe = Probe()
    server = MultiplexingTCPServer(("127.0.0.1", 0), functools.partial(Strict, probe=probe))
    with serving(server) as addr:
        sock = clients(addr)
        sock.sendall(b"ok\n" + b"z" * 2000 + b"\n")
        assert read_to_eof(sock) == b"ok\n"
        sock.close()
        probe.wait(lambda p: p.closed == [CloseReason.FRAME_TOO_LONG])
        assert server.stats.close_reasons[CloseReason.FRAME_TOO_LONG] == 1


def test_the_reply_to_an_oversize_request_arrives_before_a_graceful_close(clients: Any) -> None:
    # The client goes on sending after its request was refused: it must still read the whole
    # error reply and then EOF, not a connection reset (the server lingers, reading and
    # discarding, after shutting down its sending side).
    server = MultiplexingTCPServer(("127.0.0.1", 0), Service)
    with serving(server) as addr:
        sock = clients(addr)
        errors: list[BaseException] = []

        def keep_sending() -> None:
            try:
                for _ in range(50):
                    sock.sendall(b"w" * 4096)
            except OSError as exc:  # the server may finish lingering first
                errors.append(exc)

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            assert read_to_eof(sock) == b"ERR line longer than 1024 bytes\n"
        finally:
            sender.join(WAIT)


def test_an_exception_in_one_machine_leaves_the_others_working(clients: Any) -> None:
    probe = Probe()
    server = RecordingTCPServer(("127.0.0.1", 0), functools.partial(Service, probe=probe))
    with serving(server) as addr:
        good = clients(addr)
        bad = clients(addr)
        bad_address = bad.getsockname()
        good.sendall(b"before\n")
        assert read_exactly(good, 7) == b"before\n"
        bad.sendall(b"fine\nboom\nnever\n")
        assert read_to_eof(bad) == b"fine\n"
        bad.close()
        probe.wait(lambda p: p.closed == [CloseReason.HANDLER_ERROR])
        [(peer, address, exc)] = server.errors
        assert peer == address == bad_address
        assert isinstance(exc, ValueError) and str(exc) == "boom"
        good.sendall(b"after\n")
        assert read_exactly(good, 6) == b"after\n"


def test_a_factory_that_fails_is_reported_and_the_server_goes_on(clients: Any) -> None:
    calls = []

    def factory() -> Machine:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("no machine for you")
        return Service()

    server = RecordingTCPServer(("127.0.0.1", 0), factory)
    with serving(server) as addr:
        first = clients(addr)
        assert read_to_eof(first) == b""
        second = clients(addr)
        second.sendall(b"hi\n")
        assert read_exactly(second, 3) == b"hi\n"
        assert [(addr_, type(exc)) for _, addr_, exc in server.errors] == [
            (first.getsockname(), RuntimeError)
        ]


def test_a_peer_reset_is_a_close_reason_not_a_traceback(
    clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()
    server = MultiplexingTCPServer(("127.0.0.1", 0), functools.partial(Service, probe=probe))
    with caplog.at_level(logging.DEBUG, logger="statemux"), serving(server) as addr:
        sock = clients(addr)
        sock.sendall(b"x\n")
        assert read_exactly(sock, 2) == b"x\n"
        sock.sendall(b"unread")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        probe.wait(lambda p: p.closed == [CloseReason.PEER_CLOSED])
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- shutdown, handle_request, server_close --------------------------------------------------------
@pytest.mark.parametrize("idle_clients", [0, 3])
def test_shutdown_returns_at_once_with_a_long_poll_interval(
    idle_clients: int, clients: Any
) -> None:
    server = MultiplexingTCPServer(("127.0.0.1", 0), Service)
    loop = server._ensure_loop()  # what serve_forever runs, created here to wait on it
    thread = threading.Thread(target=server.serve_forever, args=(5,), daemon=True)
    thread.start()
    try:
        assert loop.started.wait(WAIT)
        for _ in range(idle_clients):  # connected, nothing pending
            sock = clients(server.server_address)
            sock.sendall(b"x\n")
            assert read_exactly(sock, 2) == b"x\n"
        start = time.monotonic()
        server.shutdown()
        assert time.monotonic() - start < 0.5
        thread.join(WAIT)
        assert not thread.is_alive()
    finally:
        server.shutdown()
        server.server_close()


def test_shutdown_without_a_running_loop_returns_at_once() -> None:
    with MultiplexingTCPServer(("127.0.0.1", 0), Service) as server:
        start = time.monotonic()
        server.shutdown()
        assert time.monotonic() - start < 0.1


def test_handle_request_runs_one_pass_and_calls_handle_timeout_when_idle(clients: Any) -> None:
    class Counting(MultiplexingTCPServer):
        timeout = 0.05
        timeouts = 0

        def handle_timeout(self) -> None:
            self.timeouts += 1

    with Counting(("127.0.0.1", 0), Service) as server:
        start = time.monotonic()
        server.handle_request()
        assert server.timeouts == 1
        assert time.monotonic() - start < 2
        sock = clients(server.server_address)
        sock.sendall(b"hi\n")
        server.handle_request()  # the listening socket is ready: no timeout
        assert server.timeouts == 1
        sock.setblocking(False)
        for _ in range(50):
            server.handle_request()
            try:
                assert sock.recv(10) == b"hi\n"
                break
            except BlockingIOError:
                continue
        else:
            raise AssertionError("no reply after 50 passes")


def test_server_close_closes_every_open_connection_as_shutdown(clients: Any) -> None:
    probe = Probe()
    server = MultiplexingTCPServer(("127.0.0.1", 0), functools.partial(Service, probe=probe))
    server.timeout = 0.05
    socks = [clients(server.server_address) for _ in range(3)]
    for _ in range(100):
        if probe.opened == 3:
            break
        server.handle_request()
    assert probe.opened == 3
    server.server_close()
    assert probe.closed == [CloseReason.SHUTDOWN] * 3
    assert server.stats.close_reasons[CloseReason.SHUTDOWN] == 3
    assert server.connections == []
    for sock in socks:
        assert read_to_eof(sock) == b""
    assert server.socket.fileno() == -1


def test_verify_request_false_closes_the_client_and_counts_refused(clients: Any) -> None:
    class Picky(MultiplexingTCPServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return False

    probe = Probe()
    server = Picky(("127.0.0.1", 0), functools.partial(Service, probe=probe))
    with serving(server) as addr:
        sock = clients(addr)
        assert read_to_eof(sock) == b""
        assert on_loop(server, lambda: dict(server.stats.close_reasons)) == {CloseReason.REFUSED: 1}
        assert probe.opened == 0


def test_max_connections_sends_the_refusal_then_closes(clients: Any) -> None:
    probe = Probe()
    server = MultiplexingTCPServer(
        ("127.0.0.1", 0), functools.partial(Service, probe=probe), max_connections=2
    )
    with serving(server) as addr:
        kept = [clients(addr) for _ in range(2)]
        for sock in kept:
            sock.sendall(b"in\n")
            assert read_exactly(sock, 3) == b"in\n"
        extra = clients(addr)
        assert read_to_eof(extra) == b"busy\n"
        assert on_loop(server, lambda: server.stats.close_reasons[CloseReason.REFUSED]) == 1
        kept[0].close()
        probe.wait(lambda p: len(p.closed) == 1)
        again = clients(addr)
        again.sendall(b"room\n")
        assert read_exactly(again, 5) == b"room\n"


def test_graceful_shutdown_drains_queued_output(clients: Any) -> None:
    probe = Probe()
    size = 4 << 20
    server = SmallSendBuffer(
        ("127.0.0.1", 0), functools.partial(Service, probe=probe), output_limit=16 << 20
    )
    with serving(server) as addr:
        sock = clients(addr, rcvbuf=4096)
        sock.sendall(b"flood %d\n" % size)
        first = read_exactly(sock, 1)  # the flood is queued in the server now
        [row] = on_loop(server, lambda: server.connections)
        assert row.buffered_out > size // 2
        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        rest = read_to_eof(sock)
        stopper.join(WAIT)
        assert not stopper.is_alive()
        assert len(first) + len(rest) == size
        assert probe.closed == [CloseReason.SHUTDOWN]


def test_shutdown_gives_up_on_a_client_that_never_reads_after_drain_timeout(clients: Any) -> None:
    probe = Probe()
    server = MultiplexingTCPServer(
        ("127.0.0.1", 0),
        functools.partial(Service, probe=probe),
        output_limit=16 << 20,
        drain_timeout=0.3,
    )
    with serving(server) as addr:
        sock = clients(addr, rcvbuf=4096)
        sock.sendall(b"flood %d\n" % (8 << 20))
        read_exactly(sock, 1)
        start = time.monotonic()
        server.shutdown()
        assert time.monotonic() - start < 3
    assert probe.closed == [CloseReason.SHUTDOWN]


def test_the_server_is_a_context_manager_with_a_fileno() -> None:
    with MultiplexingTCPServer(("127.0.0.1", 0), Service) as server:
        assert server.fileno() == server.socket.fileno() >= 0
        assert server.socket.getsockname() == server.server_address
    assert server.socket.fileno() == -1


def test_service_actions_runs_at_least_every_poll_interval() -> None:
    class Periodic(MultiplexingTCPServer):
        calls = 0
        enough = threading.Event()

        def service_actions(self) -> None:
            self.calls += 1
            if self.calls >= 5:
                self.enough.set()

    server = Periodic(("127.0.0.1", 0), Service)
    start = time.monotonic()
    with serving(server, poll_interval=0.05):
        assert server.enough.wait(WAIT)
    # Five calls with nothing happening take about four poll intervals, never the 5 s bound.
    assert time.monotonic() - start < 3


def test_one_loop_hosts_a_tcp_and_a_unix_server(short_tmp: str, clients: Any) -> None:
    loop = Loop()
    tcp = MultiplexingTCPServer(("127.0.0.1", 0), Service, loop=loop)
    unix = MultiplexingUnixStreamServer(os.path.join(short_tmp, "u"), Service, loop=loop)
    thread = threading.Thread(target=loop.run, kwargs={"poll_interval": 5}, daemon=True)
    thread.start()
    try:
        assert loop.started.wait(WAIT)
        a = clients(tcp.server_address)
        b = clients(unix.server_address)
        a.sendall(b"tcp\n")
        b.sendall(b"unix\n")
        assert read_exactly(a, 4) == b"tcp\n"
        assert read_exactly(b, 5) == b"unix\n"
        start = time.monotonic()
        unix.shutdown()  # one server's shutdown stops the loop, so both
        assert time.monotonic() - start < 1
        thread.join(WAIT)
        assert not thread.is_alive()
        assert read_to_eof(a) == b"" and read_to_eof(b) == b""
        assert tcp.stats.close_reasons == unix.stats.close_reasons == {CloseReason.SHUTDOWN: 1}
    finally:
        loop.shutdown()
        tcp.server_close()
        unix.server_close()
        loop.close()


def test_the_connection_table_snapshot(clients: Any) -> None:
    server = MultiplexingTCPServer(("127.0.0.1", 0), Service)
    with serving(server) as addr:
        sock = clients(addr)
        other = clients(addr)
        sock.sendall(b"hello\npar")
        assert read_exactly(sock, 6) == b"hello\n"
        rows = {r.peer: r for r in on_loop(server, lambda: server.connections)}
        row = rows[sock.getsockname()]
        assert row.machine == "Service"
        assert row.state == "reading"
        # "par" is buffered, unless the kernel handed it over in a later read.
        assert (row.bytes_in, row.buffered_in) in ((9, 3), (6, 0))
        assert row.bytes_out == 6
        assert row.buffered_out == 0
        assert row.closing is None
        assert isinstance(row.id, int) and row.id != rows[other.getsockname()].id
        assert 0 <= row.age < 30


def test_accepted_tcp_sockets_have_nodelay(clients: Any) -> None:
    class NoDelayProbe(MultiplexingTCPServer):
        seen: list[int] = []

        def process_request(self, request: socket.socket, client_address: Any) -> None:
            super().process_request(request, client_address)
            self.seen.append(request.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    server = NoDelayProbe(("127.0.0.1", 0), Service)
    with serving(server) as addr:
        sock = clients(addr)
        sock.sendall(b"x\n")
        read_exactly(sock, 2)
        assert len(server.seen) == 1 and server.seen[0] != 0


def test_the_same_port_can_be_bound_again_right_after_close(clients: Any) -> None:
    assert MultiplexingTCPServer.allow_reuse_address
    server = MultiplexingTCPServer(("127.0.0.1", 0), Service)
    port = server.server_address[1]
    with serving(server) as addr:
        sock = clients(addr)
        sock.sendall(b"quit\n")  # the server closes first: its end goes to TIME_WAIT
        assert read_to_eof(sock) == b"bye\n"
        sock.close()
    again = MultiplexingTCPServer(("127.0.0.1", port), Service)
    try:
        assert again.server_address[1] == port
    finally:
        again.server_close()


def test_the_listen_backlog_is_somaxconn(monkeypatch: pytest.MonkeyPatch) -> None:
    backlogs: list[tuple[Any, ...]] = []
    listen = socket.socket.listen

    def spy(self: socket.socket, *args: Any) -> None:
        backlogs.append(args)
        listen(self, *args)

    monkeypatch.setattr(socket.socket, "listen", spy)
    with MultiplexingTCPServer(("127.0.0.1", 0), Service) as server:
        assert server.request_queue_size == socket.SOMAXCONN
    assert backlogs == [(socket.SOMAXCONN,)]


def test_a_stdlib_handler_class_is_refused_with_a_type_error() -> None:
    with pytest.raises(TypeError, match="StreamRequestHandler is a blocking socketserver handler"):
        MultiplexingTCPServer(("127.0.0.1", 0), socketserver.StreamRequestHandler)
    with pytest.raises(TypeError, match="the machine factory must be callable, not 42"):
        MultiplexingTCPServer(("127.0.0.1", 0), 42)


def test_serve_forever_can_run_again_after_shutdown(clients: Any) -> None:
    server = MultiplexingTCPServer(("127.0.0.1", 0), Service)
    try:
        for round_ in range(2):
            loop = server._ensure_loop()
            thread = threading.Thread(target=server.serve_forever, args=(5,), daemon=True)
            thread.start()
            assert loop.started.wait(WAIT)
            sock = clients(server.server_address)
            sock.sendall(b"round %d\n" % round_)
            assert read_exactly(sock, 8) == b"round %d\n" % round_
            server.shutdown()
            thread.join(WAIT)
            assert not thread.is_alive()
            assert read_to_eof(sock) == b""
    finally:
        server.server_close()


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_stop_serve_forever(
    exc_type: type[BaseException], clients: Any
) -> None:
    @attrs.define
    class Interrupting(Machine):
        reading = State(Line(), initial=True)

        @reading.on(Frame, to=reading)
        def stop(self, line: bytes) -> None:
            raise exc_type()

    server = MultiplexingTCPServer(("127.0.0.1", 0), Interrupting)
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve_forever(5)
        except BaseException as exc:  # what the serving thread would see
            raised.append(exc)

    loop = server._ensure_loop()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert loop.started.wait(WAIT)
        sock = clients(server.server_address)
        sock.sendall(b"stop\n")
        thread.join(WAIT)
        assert not thread.is_alive()
        assert [type(exc) for exc in raised] == [exc_type]
    finally:
        server.shutdown()
        server.server_close()


def test_a_servers_tracer_sees_its_transitions(clients: Any) -> None:
    tracer = RecordingTracer()
    probe = Probe()
    server = MultiplexingTCPServer(
        ("127.0.0.1", 0), functools.partial(Service, probe=probe), tracer=tracer
    )
    with serving(server) as addr:
        sock = clients(addr)
        sock.sendall(b"a\nquit\n")
        assert read_to_eof(sock) == b"a\nbye\n"
        sock.close()
        probe.wait(lambda p: len(p.closed) == 1)
    cid = tracer.transitions[0][0]
    assert tracer.transitions == [
        (cid, "reading", "opened", "reading"),
        (cid, "reading", "frame", "reading"),
        (cid, "reading", "frame", "done"),
    ]
    assert server.stats.transitions()[("Service", "reading", "frame", "done")] == 1


@attrs.define
class FloodThenClose(Machine):
    """Sends ``size`` bytes and closes, in one handler."""

    probe: Probe = attrs.field(factory=Probe)
    size: int = 16 << 20

    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def flood(self, line: bytes) -> None:
        self.send(b"x" * self.size)
        self.close()

    def on_closed(self, reason: CloseReason) -> None:
        self.probe.on_closed(reason)


def test_a_reply_cut_by_output_limit_is_not_ended_like_a_complete_one(clients: Any) -> None:
    # Reply and close() in one handler, the reply beyond output_limit: the connection is a
    # slow consumer, and the peer must not see a clean EOF after a truncated reply.
    probe = Probe()
    size = 16 << 20
    server = MultiplexingTCPServer(
        ("127.0.0.1", 0), functools.partial(FloodThenClose, probe=probe), output_limit=1 << 20
    )
    with serving(server) as addr:
        sock = clients(addr, rcvbuf=4096)
        sock.sendall(b"go\n")
        probe.wait(lambda p: len(p.closed) == 1)
        received = 0
        clean_eof = False
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
            clean_eof = True
        except OSError:
            pass
        assert probe.closed == [CloseReason.SLOW_CONSUMER]
        assert not (clean_eof and received < size), f"clean EOF after {received} of {size}"


def test_output_draining_to_a_slow_reader_counts_as_activity(clients: Any) -> None:
    # idle_timeout is "no byte in either direction": a client downloading a large reply
    # slowly but steadily is not idle.
    probe = Probe()
    size = 256 * 1024
    server = SmallSendBuffer(
        ("127.0.0.1", 0), functools.partial(Service, probe=probe), idle_timeout=0.3
    )
    with serving(server) as addr:
        sock = clients(addr, rcvbuf=4096)
        sock.sendall(b"flood %d\n" % size)
        received = 0
        while received < size:
            chunk = sock.recv(16384)
            assert chunk, f"closed after {received} of {size} bytes: {probe.closed}"
            received += len(chunk)
            time.sleep(0.02)  # allowed: paces a slow but steady reader (the point of the test)
        sock.sendall(b"still there?\n")
        assert read_exactly(sock, 13) == b"still there?\n"
        assert probe.closed == []
