"""One connection's mistakes stay its own; the loop keeps its promises across restarts."""

from __future__ import annotations

import functools
import selectors
import socket
import struct
import threading
from typing import Any

import attrs
import pytest

from statemux import (
    CloseReason,
    Datagram,
    Drained,
    Frame,
    FrameTooLong,
    Line,
    Loop,
    Machine,
    MultiplexingTCPServer,
    MultiplexingUDPServer,
    MultiplexingUnixDatagramServer,
    Opened,
    PeerClosed,
    State,
    TimedOut,
)
from statemux.testing import Simulator, serving
from statemux.timers import TimerQueue

pytestmark = pytest.mark.timeout(20)


@attrs.define
class Careless(Machine):
    """Misbehaves on command; echoes anything else."""

    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def line(self, line: bytes) -> Any:
        if line == b"list":
            return [1, 2]  # unhashable: not a state
        if line == b"timer":
            self.start_timer("t", None)  # type: ignore[arg-type]
        if line == b"topic":
            self.subscribe(["not", "hashable"])  # type: ignore[arg-type]
        self.send(line + b"\n")
        return None


@pytest.mark.parametrize("command", [b"list", b"timer", b"topic"])
def test_a_bad_return_or_effect_closes_only_its_connection(command: bytes) -> None:
    errors: list[Any] = []

    class Server(MultiplexingTCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(client_address)

    server = Server(("127.0.0.1", 0), Careless)
    with serving(server) as address:
        with (
            socket.create_connection(address, timeout=5) as bad,
            socket.create_connection(address, timeout=5) as good,
        ):
            bad.sendall(command + b"\n")
            assert bad.recv(100) == b""  # closed, nothing of the failed handler sent
            good.sendall(b"still here\n")
            assert good.recv(100) == b"still here\n"
    assert len(errors) == 1
    assert server.stats.close_reasons[CloseReason.HANDLER_ERROR] == 1


@attrs.define
class FailsOnOpen(Machine):
    """The first three connections fail while opening; later ones echo."""

    failures: list[int]
    reading = State(Line(), initial=True)

    @reading.on(Opened, to=reading)
    def hello(self, event: Opened) -> None:
        if len(self.failures) < 3:
            self.failures.append(1)
            self.start_timer("t", -1)  # rejected inside the handler

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")


def test_a_failure_while_opening_leaves_nothing_behind() -> None:
    failures: list[int] = []
    server = MultiplexingTCPServer(("127.0.0.1", 0), functools.partial(FailsOnOpen, failures))
    server.handle_error = lambda request, address: None  # type: ignore[method-assign]
    with serving(server) as address:
        for _ in range(3):  # the fd numbers are reused: none may be poisoned
            with socket.create_connection(address, timeout=5) as sock:
                assert sock.recv(100) == b""
        assert ask(address, b"served\n") == b"served\n"
    assert server.stats.close_reasons[CloseReason.HANDLER_ERROR] == 3


@attrs.define
class TwoReplies(Machine):
    echoing = State(Datagram(max_size=100), initial=True)

    @echoing.on(Frame, to=echoing)
    def reply(self, data: bytes) -> None:
        self.send(b"first")
        self.send(b"second")


def test_each_send_of_a_datagram_session_is_its_own_datagram() -> None:
    server = MultiplexingUDPServer(("127.0.0.1", 0), TwoReplies)
    with serving(server) as address, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.settimeout(5)
        peer.sendto(b"x", address)
        assert [peer.recv(100), peer.recv(100)] == [b"first", b"second"]


@attrs.define
class Echo(Machine):
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")


def ask(address: Any, line: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(line)
        return sock.recv(100)


def test_a_loop_runs_again_after_a_shutdown_and_accepts_again() -> None:
    loop = Loop()
    server = MultiplexingTCPServer(("127.0.0.1", 0), Echo, loop=loop)
    try:
        for round_ in (b"one\n", b"two\n"):
            thread = threading.Thread(target=loop.run, args=(0.05,))
            thread.start()
            assert loop.started.wait(5)
            assert ask(server.server_address, round_) == round_
            loop.shutdown()
            thread.join(5)
    finally:
        server.server_close()
        loop.close()


def test_any_selectors_selector_drives_the_loop() -> None:
    loop = Loop(selectors.PollSelector())
    server = MultiplexingTCPServer(("127.0.0.1", 0), Echo, loop=loop)
    thread = threading.Thread(target=loop.run, args=(0.05,))
    thread.start()
    try:
        assert loop.started.wait(5)
        assert ask(server.server_address, b"poll\n") == b"poll\n"
    finally:
        loop.shutdown()
        thread.join(5)
        server.server_close()
        loop.close()


def test_a_timer_that_raises_loses_no_other_due_timer() -> None:
    queue = TimerQueue()
    fired: list[str] = []

    def boom() -> None:
        raise KeyboardInterrupt

    queue.add(1.0, boom)
    queue.add(1.0, fired.append, "after")
    with pytest.raises(KeyboardInterrupt):
        queue.run_due(2.0)
    queue.run_due(2.0)
    assert fired == ["after"]


@attrs.define
class Producer(Machine):
    """Sends ``pieces`` pieces of 32 KiB, one per Drained."""

    pieces: int = 400
    sending = State(initial=True)
    done = State(final=True)

    @sending.on(Opened, to=sending)
    def start(self, event: Opened) -> None:
        pass

    @sending.on(Drained, to=(sending, done))
    def more(self, event: Any) -> State:
        if not self.pieces:
            return self.done
        self.pieces -= 1
        self.send(b"x" * 32768)
        return self.sending


def test_a_producer_of_many_pieces_does_not_recurse_in_the_simulator() -> None:
    sim = Simulator(Producer, output_limit=64 * 1024 * 1024)
    peer = sim.connect()
    assert len(peer.received()) == 400 * 32768
    assert peer.close_reason is CloseReason.NORMAL


# -- timeouts on the multiplexing server's sweep ---------------------------------------------------


@attrs.define
class Pings(Machine):
    """Says ping when its waiting state times out, then waits for nothing in particular."""

    waiting = State(Line(), initial=True, timeout=0.2)
    pinged = State(Line())

    @waiting.on(Frame, to=waiting)
    def ignore(self, line: bytes) -> None:
        pass

    @waiting.on(TimedOut, to=pinged)
    def ping(self, event: TimedOut) -> None:
        self.send(b"ping\n")

    @pinged.on(Frame, to=pinged)
    def ignore_too(self, line: bytes) -> None:
        pass


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(100):
        data += chunk
    return data


def test_a_state_timeout_due_with_the_idle_limit_is_delivered_not_pre_empted() -> None:
    server = MultiplexingTCPServer(("127.0.0.1", 0), Pings, idle_timeout=0.2)
    with serving(server, poll_interval=0.05) as address:
        with socket.create_connection(address, timeout=5) as sock:
            assert read_all(sock) == b"ping\n"  # then idle: closed
    assert server.stats.close_reasons[CloseReason.IDLE] == 1


@attrs.define
class Quiet(Machine):
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def ignore(self, line: bytes) -> None:
        pass


def test_state_timeouts_of_a_class_met_late_are_swept_in_time() -> None:
    """A factory whose first machine has no timeouts, and no idle limit: the sweep starts
    when a connection enters a state with one."""
    made: list[int] = []

    def factory() -> Machine:
        made.append(1)
        return Quiet() if len(made) == 1 else Pings()

    server = MultiplexingTCPServer(("127.0.0.1", 0), factory, idle_timeout=None)
    with serving(server, poll_interval=5) as address:
        with socket.create_connection(address, timeout=5):
            with socket.create_connection(address, timeout=5) as second:
                assert second.recv(100) == b"ping\n"


@attrs.define
class FarTimer(Machine):
    reading = State(Line(), initial=True)

    @reading.on(Opened, to=reading)
    def far(self, event: Opened) -> None:
        self.start_timer("month", 30 * 86400.0)  # beyond what epoll can wait at once

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")


def test_a_timer_a_month_away_does_not_break_the_loop() -> None:
    loop = Loop()
    server = MultiplexingTCPServer(("127.0.0.1", 0), FarTimer, loop=loop, idle_timeout=None)
    thread = threading.Thread(target=loop.run, args=(None,))  # no poll_interval: the timer rules
    thread.start()
    try:
        assert loop.started.wait(5)
        with socket.create_connection(server.server_address, timeout=5) as sock:
            sock.sendall(b"hi\n")
            assert sock.recv(100) == b"hi\n"
            sock.sendall(b"again\n")  # the loop survived its long sleep's computation
            assert sock.recv(100) == b"again\n"
    finally:
        loop.shutdown()
        thread.join(5)
        server.server_close()
        loop.close()


# -- datagrams -------------------------------------------------------------------------------------


@attrs.define
class TwoPerDrained(Machine):
    """A datagram producer: five rounds of two datagrams, one round per Drained."""

    rounds: int = 0
    producing = State(Datagram(max_size=100), initial=True)

    @producing.on(Frame, to=producing)
    def go(self, data: bytes) -> None:
        self.rounds = 5

    @producing.on(Drained, to=producing)
    def more(self, event: Drained) -> None:
        if self.rounds:
            self.rounds -= 1
            self.send(b"%d.0" % self.rounds)
            self.send(b"%d.1" % self.rounds)


def test_a_datagram_producer_sending_several_per_drained_goes_on() -> None:
    server = MultiplexingUDPServer(("127.0.0.1", 0), TwoPerDrained)
    with serving(server) as address, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.settimeout(5)
        peer.sendto(b"go", address)
        assert len([peer.recv(100) for _ in range(10)]) == 10


@attrs.define
class Measures(Machine):
    reading = State(Datagram(max_size=200_000), initial=True)

    @reading.on(Frame, to=reading)
    def size(self, data: bytes) -> None:
        self.send(b"len=%d" % len(data))

    @reading.on(FrameTooLong, to=reading)
    def too_long(self, exc: FrameTooLong) -> None:
        self.send(b"too long")


def test_a_datagram_the_kernel_cut_is_never_taken_for_a_whole_one(short_tmp: str) -> None:
    """With a factory that is not a class, the first read's buffer is a guess (64 KiB): a
    larger datagram arrives cut, and is handled as too long rather than as a frame."""
    address = f"{short_tmp}/s"
    server = MultiplexingUnixDatagramServer(address, lambda: Measures())
    with serving(server), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as peer:
        peer.bind(f"{short_tmp}/c")
        peer.settimeout(5)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        peer.sendto(b"a" * 100_000, address)
        first = peer.recv(100)
        assert first in (b"too long", b"len=100000"), first
        peer.sendto(b"b" * 100_000, address)  # the class is known now: read whole
        second = peer.recv(100)
        assert second == b"len=100000", (first, second, server.machine_class, server._bufsize)


# -- shutdown ---------------------------------------------------------------------------------------


@attrs.define
class Dump(Machine):
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def dump(self, line: bytes) -> None:
        self.send(b"z" * 3_000_000)


def test_a_reply_cut_short_by_the_end_of_the_drain_ends_in_a_reset() -> None:
    server = MultiplexingTCPServer(("127.0.0.1", 0), Dump, drain_timeout=0.2)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    try:
        sock.connect(server.server_address)
        sock.sendall(b"go\n")
        assert sock.recv(1)  # the reply has begun
        server.shutdown()  # the drain gives up on us after 0.2 s
        thread.join(5)
        server.server_close()
        with pytest.raises(ConnectionResetError):
            read_all(sock)
    finally:
        sock.close()


@attrs.define
class Greets(Machine):
    """Greets on open; counts PeerClosed by handler."""

    seen: list[str]
    reading = State(Line(), initial=True)

    @reading.on(Opened, to=reading)
    def hello(self, event: Opened) -> None:
        self.send(b"hello\n" * 1000)

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")

    @reading.on(PeerClosed, to=reading)
    def bye(self, event: PeerClosed) -> None:
        self.seen.append("peer closed")
        self.send(b"bye\n")  # goes nowhere after a reset, harmlessly


def test_a_reset_takes_the_peer_closed_edge_like_an_eof() -> None:
    seen: list[str] = []
    server = MultiplexingTCPServer(("127.0.0.1", 0), functools.partial(Greets, seen))
    with serving(server) as address:
        sock = socket.create_connection(address, timeout=5)
        sock.recv(1)  # the greeting arrived, most of it unread
        sock.sendall(b"x\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
        with socket.create_connection(address, timeout=5) as other:  # the loop goes on
            other.recv(1)
            other.sendall(b"ok\n")
            other.shutdown(socket.SHUT_WR)
            assert read_all(other).endswith(b"ok\nbye\n")  # after an EOF, the goodbye arrives
    assert seen == ["peer closed", "peer closed"]
    transitions = server.stats.transitions()
    assert transitions[("Greets", "reading", "peer closed", "reading")] == 2
    assert server.stats.close_reasons[CloseReason.PEER_CLOSED] == 2


def test_handle_request_waits_for_a_request_through_the_servers_housekeeping() -> None:
    """The table sweep (every 10 ms here) is not 'something happened'."""
    server = MultiplexingTCPServer(("127.0.0.1", 0), Echo, idle_timeout=0.08)
    server.timeout = None  # wait for a request, as socketserver does
    timeouts: list[int] = []
    server.handle_timeout = lambda: timeouts.append(1)  # type: ignore[method-assign]
    done = threading.Event()

    def serve_one() -> None:
        server.handle_request()
        done.set()

    thread = threading.Thread(target=serve_one)
    thread.start()
    try:
        assert not done.wait(0.2)  # several sweeps went by: still waiting for a request
        with socket.create_connection(server.server_address, timeout=5):
            assert done.wait(5)  # the connection is what ended it
        assert timeouts == []
    finally:
        thread.join(5)
        server.server_close()
