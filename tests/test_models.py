"""What each concurrency model does on its own: refusals, threads and children (bounds and
reaping), shared services under threading, shutdown, resets, datagram sessions and queues."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

import statemux
from statemux import (
    CloseReason,
    Datagram,
    Frame,
    Hub,
    Line,
    Machine,
    Message,
    Opened,
    State,
    TimerFired,
    UnsupportedMachine,
)
from statemux.blocking import peer_state_reason
from statemux.testing import serving

pytestmark = pytest.mark.timeout(30)

PREFIX = {
    "sync": "",
    "threading": "Threading",
    "forking": "Forking",
    "multiplexing": "Multiplexing",
}


def server_class(model: str, family: str) -> Any:
    return getattr(statemux, f"{PREFIX[model]}{family}Server")


# -- machines --------------------------------------------------------------------------------------
@attrs.define
class Greeting(Machine):
    """Says hi, echoes lines, ``quit`` closes."""

    refusal = b"busy\n"
    reading = State(Line(max_length=1024), initial=True)
    done = State(final=True)

    @reading.on(Opened, to=reading)
    def hello(self, event: Opened) -> None:
        self.send(b"hi\n")

    @reading.on(Frame, to=(reading, done))
    def line(self, line: bytes) -> State:
        if line == b"quit":
            return Greeting.done
        self.send(line + b"\n")
        return Greeting.reading


@attrs.define
class Room(Machine):
    """Every line goes to every other member; ``joined`` confirms the subscription. A line
    ``block`` makes the handler wait for ``Room.gate`` (a member whose thread is busy)."""

    shares_memory = True
    waits_for_peers = True
    gate: threading.Event | None = None
    chatting = State(Line(max_length=4096), initial=True)

    @chatting.on(Opened, to=chatting)
    def join(self, event: Opened) -> None:
        self.subscribe("room")
        self.send(b"joined\n")

    @chatting.on(Frame, to=chatting)
    def say(self, line: bytes) -> None:
        if line == b"block" and self.gate is not None:
            self.gate.wait(10)
            return
        self.publish("room", line + b"\n")
        if line.startswith(b"ack"):
            self.send(b"ok\n")

    @chatting.on(Message, to=chatting)
    def hear(self, message: Message) -> None:
        self.send(message.payload)  # type: ignore[arg-type]


@attrs.define
class Shared(Machine):
    shares_memory = True
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def line(self, line: bytes) -> None:
        pass


@attrs.define
class Lonely(Machine):
    waits_for_peers = True
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def line(self, line: bytes) -> None:
        pass


@attrs.define
class DgCounter(Machine):
    counting = State(Datagram(max_size=64), initial=True)
    seen: int = 0

    @counting.on(Frame, to=counting)
    def count(self, data: bytes) -> None:
        self.seen += 1
        self.send(b"%d %s" % (self.seen, data))


@attrs.define
class DgEcho(Machine):
    echoing = State(Datagram(max_size=64), initial=True)

    @echoing.on(Frame, to=echoing)
    def echo(self, data: bytes) -> None:
        self.send(data)


@attrs.define
class Triple(Machine):
    """Three sends per line: they must leave in one system call per read."""

    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def line(self, line: bytes) -> None:
        self.send(b"<")
        self.send(line)
        self.send(b">")


# -- helpers ---------------------------------------------------------------------------------------
class Client(socket.socket):
    """A client socket that hangs up with shutdown() before close(): a forked child holds a
    copy of every descriptor of this process, clients' too, and close() alone would leave
    the connection open in that copy."""

    def close(self) -> None:
        if self.fileno() >= 0:
            with contextlib.suppress(OSError):
                self.shutdown(socket.SHUT_RDWR)
        super().close()


def connect(address: Any, *, rcvbuf: int | None = None) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = Client(family, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(address)
    return sock


def read_line(sock: socket.socket) -> bytes:
    out = bytearray()
    while not out.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            break
        out += data
    return bytes(out)


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            return bytes(out)
        out += data
    return bytes(out)


def nothing_arrives(sock: socket.socket, seconds: float = 0.2) -> bool:
    """True if nothing is readable for ``seconds`` (a bounded wait for an absence)."""
    readable, _, _ = select.select([sock], [], [], seconds)
    return not readable


def unix_address(tmp: str, name: str = "srv.sock") -> str:
    return os.path.join(tmp, name)


# -- refusals at construction ----------------------------------------------------------------------
def _chat() -> Callable[[], Machine]:
    from statemachines import chat

    return chat.build()


def _resp() -> Callable[[], Machine]:
    from statemachines import resp

    return resp.build()


REFUSALS = [
    (
        "ForkingTCPServer",
        lambda: Shared,
        "shares memory between connections (shares_memory = True)",
    ),
    ("ForkingUnixStreamServer", _chat, "each forked child has its own copy of memory"),
    ("ForkingTCPServer", _resp, "would silently split into one per connection"),
    ("TCPServer", lambda: Lonely, "wait for other connections (waits_for_peers = True)"),
    ("UnixStreamServer", _chat, "serves one connection at a time, so it would wait forever"),
    (
        "ForkingUDPServer",
        lambda: _TwoStates,
        "keeps per-peer state across datagrams (it has 2 states",
    ),
    ("ForkingUDPServer", lambda: _DeclaredStateful, "(it declares per_peer_state = True)"),
    ("ForkingUnixDatagramServer", lambda: Room, "shares memory"),
]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("cls_name", "factory", "message"),
    REFUSALS,
    ids=[r[0] + "-" + str(i) for i, r in enumerate(REFUSALS)],
)
def test_a_model_refuses_machines_it_cannot_run(
    cls_name: str, factory: Any, message: str, short_tmp: str
) -> None:
    cls = getattr(statemux, cls_name)
    address = (
        ("127.0.0.1", 0) if "TCP" in cls_name or "UDP" in cls_name else unix_address(short_tmp)
    )
    machine_factory = factory()
    before = open_fds()
    with pytest.raises(UnsupportedMachine, match=re.escape(message)) as info:
        cls(address, machine_factory)
    assert isinstance(info.value, TypeError)
    family = cls_name.removeprefix("Forking")
    assert f"Multiplexing{family}" in str(info.value)  # it names the servers that can
    assert open_fds() == before
    assert os.listdir(short_tmp) == []


@pytest.mark.parametrize(
    ("cls_name", "factory"),
    [
        ("ThreadingTCPServer", Room),
        ("ThreadingUnixStreamServer", Room),
        ("ForkingUDPServer", DgEcho),
        ("TCPServer", Shared),
        ("ForkingTCPServer", Lonely),
    ],
)
def test_models_accept_what_they_can_run(cls_name: str, factory: Any, short_tmp: str) -> None:
    cls = getattr(statemux, cls_name)
    address = (
        ("127.0.0.1", 0) if "TCP" in cls_name or "UDP" in cls_name else unix_address(short_tmp)
    )
    with cls(address, factory):
        pass


def test_stateless_datagram_services_run_under_forking(short_tmp: str) -> None:
    from statemachines import echo, syslog

    with statemux.ForkingUDPServer(("127.0.0.1", 0), echo.build(datagram=True)) as srv:
        with serving(srv) as address, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"hello", address)
            assert client.recv(100) == b"hello"
    assert srv.stats.close_reasons == {CloseReason.NORMAL: 1}

    out = os.path.join(short_tmp, "log")
    sink = syslog.SyslogSink(out)
    try:
        factory = syslog.build(datagram=True, sink=sink)
        with statemux.ForkingUnixDatagramServer(unix_address(short_tmp), factory) as srv:
            with (
                serving(srv) as address,
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client,
            ):
                client.sendto(b"<13>Oct 11 22:14:15 host app: hello from a child", address)
                assert srv.wait_idle(5)
    finally:
        sink.close()
    assert srv.stats.close_reasons == {CloseReason.NORMAL: 1}
    with open(out, "rb") as f:
        assert b"hello from a child" in f.read()


def test_a_factory_whose_class_cannot_be_told_is_checked_at_the_first_connection() -> None:
    seen: list[BaseException] = []

    class Recording(statemux.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            import sys

            seen.append(sys.exc_info()[1])  # type: ignore[arg-type]

    with Recording(("127.0.0.1", 0), lambda: Lonely()) as srv, serving(srv) as address:
        with connect(address) as client:
            assert read_all(client) == b""
    assert len(seen) == 1
    assert isinstance(seen[0], UnsupportedMachine)
    assert "waits_for_peers" in str(seen[0])


@attrs.define
class _TwoStates(Machine):
    a = State(Datagram(), initial=True)
    b = State(Datagram())

    @a.on(Frame, to=b)
    def go(self, d: bytes) -> None:
        pass

    @b.on(Frame, to=a)
    def back(self, d: bytes) -> None:
        pass


@attrs.define
class _Timed(Machine):
    a = State(Datagram(), initial=True, timeout=1.0)

    @a.on(Frame, to=a)
    def go(self, d: bytes) -> None:
        pass


@attrs.define
class _Greets(Machine):
    a = State(Datagram(), initial=True)

    @a.on(Opened, to=a)
    def hi(self, e: Opened) -> None:
        pass

    @a.on(Frame, to=a)
    def go(self, d: bytes) -> None:
        pass


@attrs.define
class _Ticks(Machine):
    a = State(Datagram(), initial=True)

    @a.on(Frame, to=a)
    def go(self, d: bytes) -> None:
        pass

    @a.on(TimerFired, to=a)
    def tick(self, e: TimerFired) -> None:
        pass


@attrs.define
class _Declared(_TwoStates):
    per_peer_state = False


@attrs.define
class _DeclaredStateful(DgEcho):
    per_peer_state = True


@attrs.define
class _SharesMemory(DgEcho):
    shares_memory = True


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (DgEcho, None),
        (DgCounter, None),  # fields alone do not count: configuration looks the same
        (_TwoStates, "it has 2 states (a, b)"),
        (_Timed, "state 'a' has a timeout"),
        (_Greets, "state 'a' handles Opened"),
        (_Ticks, "state 'a' handles TimerFired"),
        (Room, "it shares memory (shares_memory = True)"),
        (_SharesMemory, "it shares memory (shares_memory = True)"),
        (_Declared, None),
        (_DeclaredStateful, "it declares per_peer_state = True"),
    ],
)
def test_how_per_peer_state_is_told(cls: type[Machine], reason: str | None) -> None:
    assert peer_state_reason(cls) == reason


# -- threading: shared services --------------------------------------------------------------------
def test_threading_servers_lock_their_hub() -> None:
    with statemux.ThreadingTCPServer(("127.0.0.1", 0), Room) as srv:
        assert hasattr(srv.hub._lock, "acquire")
    given = Hub()
    with statemux.ThreadingTCPServer(("127.0.0.1", 0), Room, hub=given) as srv:
        assert srv.hub is given and hasattr(given._lock, "acquire")
    with statemux.TCPServer(("127.0.0.1", 0), Greeting) as srv:
        assert not hasattr(srv.hub._lock, "acquire")  # one thread: no lock to pay for


@contextlib.contextmanager
def members(address: Any, n: int, **kw: Any) -> Iterator[list[socket.socket]]:
    socks = [connect(address, **kw) for _ in range(n)]
    try:
        for sock in socks:
            assert read_line(sock) == b"joined\n"
        yield socks
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("model", ["threading", "multiplexing"])
def test_a_broadcast_reaches_members_whose_threads_wait_for_input(
    model: str, short_tmp: str
) -> None:
    with (
        server_class(model, "UnixStream")(unix_address(short_tmp), Room) as srv,
        serving(srv) as address,
    ):
        with members(address, 3) as (a, b, c):
            a.sendall(b"hello\n")
            assert read_line(b) == b"hello\n"
            assert read_line(c) == b"hello\n"
            c.sendall(b"back\n")
            assert read_line(a) == b"back\n"
            assert read_line(b) == b"back\n"


@pytest.mark.parametrize("model", ["threading", "multiplexing"])
def test_a_member_that_stops_reading_is_cut_off_and_stalls_nobody(
    model: str, short_tmp: str
) -> None:
    limits = {"output_high_water": 16384, "output_low_water": 4096, "output_limit": 65536}
    line = b"x" * 999 + b"\n"
    count = 3000  # 3 MB: well beyond what the kernel and output_limit hold for one reader
    # The sender keeps within a window of what the healthy member has read: this test
    # process's threads share one interpreter, and the healthy reader must not be the one
    # that falls output_limit behind (under threading nothing paces a publisher).
    window = 32 * len(line)
    with server_class(model, "UnixStream")(unix_address(short_tmp), Room, **limits) as srv:
        with serving(srv) as address, members(address, 3) as (sender, fast, slow):
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            got = bytearray()
            progress = threading.Condition()

            def read_fast() -> None:
                while len(got) < count * len(line):
                    data = fast.recv(65536)
                    if not data:
                        break
                    with progress:
                        got.extend(data)
                        progress.notify()
                with progress:
                    progress.notify()

            reader = threading.Thread(target=read_fast)
            reader.start()
            for n in range(count // 8):
                with progress:
                    assert progress.wait_for(lambda n=n: len(got) >= n * 8 * len(line) - window, 10)
                sender.sendall(line * 8)
            reader.join(20)
            assert len(got) == count * len(line)
            assert bytes(got) == line * count
            slow.settimeout(10)
            assert len(read_all(slow)) < count * len(line)  # what it had before the cut, then EOF
    assert srv.stats.close_reasons[CloseReason.SLOW_CONSUMER] == 1


def test_a_member_whose_thread_is_busy_overflows_its_mailbox_not_the_sender(short_tmp: str) -> None:
    gate = threading.Event()
    factory = functools.partial(Room, gate=gate)
    limits = {"output_high_water": 4096, "output_low_water": 1024, "output_limit": 8192}
    with statemux.ThreadingUnixStreamServer(unix_address(short_tmp), factory, **limits) as srv:
        with serving(srv) as address, members(address, 2) as (sender, busy):
            busy.sendall(b"block\n")  # its thread now waits inside a handler
            for i in range(40):  # 40 x ~300 bytes: past output_limit while it waits
                sender.sendall(b"ack %d %s\n" % (i, b"y" * 300))
                assert read_line(sender) == b"ok\n"  # the sender is never held up
            gate.set()
            busy.settimeout(10)
            assert read_all(busy) == b""  # closed without delivering the backlog
    assert srv.stats.close_reasons[CloseReason.SLOW_CONSUMER] == 1


def test_broadcasts_keep_each_publishers_order_under_threading(short_tmp: str) -> None:
    with (
        statemux.ThreadingUnixStreamServer(unix_address(short_tmp), Room) as srv,
        serving(srv) as address,
    ):
        with members(address, 4) as (p1, p2, p3, listener):
            publishers = [p1, p2, p3]

            def publish(i: int, sock: socket.socket) -> None:
                for n in range(200):
                    sock.sendall(b"%d:%d\n" % (i, n))

            threads = [
                threading.Thread(target=publish, args=(i, s)) for i, s in enumerate(publishers)
            ]
            for t in threads:
                t.start()
            lines = [read_line(listener) for _ in range(600)]
            for t in threads:
                t.join()
    for i in range(3):
        mine = [int(x.split(b":")[1]) for x in lines if x.startswith(b"%d:" % i)]
        assert mine == list(range(200))


# -- threading: bounds and reaping -----------------------------------------------------------------
def test_max_threads_pauses_accepting_and_resumes_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="statemux")
    with statemux.ThreadingTCPServer(("127.0.0.1", 0), Greeting, max_threads=2) as srv:
        with serving(srv) as address:
            a, b = connect(address), connect(address)
            assert read_line(a) == b"hi\n" and read_line(b) == b"hi\n"
            c, d = connect(address), connect(address)  # both wait in the listen backlog
            assert nothing_arrives(c)
            assert srv.threads == 2
            a.sendall(b"quit\n")
            assert read_all(a) == b""
            assert read_line(c) == b"hi\n"  # the first waiting client goes first
            assert nothing_arrives(d, 0.05)
            b.sendall(b"quit\n")
            assert read_line(d) == b"hi\n"
            for sock in (a, b, c, d):
                sock.close()
    warnings = [r for r in caplog.records if "max_threads (2)" in r.getMessage()]
    assert len(warnings) == 1  # reached three times: warned once (then at most once a minute)
    assert srv.stats.close_reasons[CloseReason.REFUSED] == 0


def test_max_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_threads must be a positive int or None, not 0"):
        statemux.ThreadingTCPServer(("127.0.0.1", 0), Greeting, max_threads=0)


def test_threading_refuses_past_max_connections_with_the_machines_refusal() -> None:
    with statemux.ThreadingTCPServer(("127.0.0.1", 0), Greeting, max_connections=1) as srv:
        with serving(srv) as address, connect(address) as first:
            assert read_line(first) == b"hi\n"
            with connect(address) as second:
                assert read_all(second) == b"busy\n"
    assert srv.stats.close_reasons[CloseReason.REFUSED] == 1


def test_finished_threads_leave_at_once() -> None:
    baseline = threading.active_count()
    with statemux.ThreadingTCPServer(("127.0.0.1", 0), Greeting) as srv, serving(srv) as address:
        for _ in range(20):
            with connect(address) as client:
                assert read_line(client) == b"hi\n"
                client.sendall(b"quit\n")
                assert read_all(client) == b""
        assert srv.wait_idle(5)
        assert srv.threads == 0
        assert threading.active_count() == baseline + 1  # the serving thread only
    assert srv.stats.close_reasons[CloseReason.NORMAL] == 20


# -- forking: bounds and reaping -------------------------------------------------------------------
def zombies() -> list[int]:
    """Children of this process that exited and were not reaped."""
    me = os.getpid()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            found.append(int(pid))
    return found


def test_forking_refuses_at_max_children_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statemux")
    with statemux.ForkingTCPServer(("127.0.0.1", 0), Greeting, max_children=1) as srv:
        with serving(srv) as address:
            with connect(address) as first:
                assert read_line(first) == b"hi\n"
                for _ in range(2):
                    with connect(address) as extra:
                        assert read_all(extra) == b"busy\n"
                first.sendall(b"quit\n")
                assert read_all(first) == b""
            assert srv.wait_idle(5)
            with connect(address) as later:
                assert read_line(later) == b"hi\n"
    warnings = [r for r in caplog.records if "max_children" in r.getMessage()]
    assert len(warnings) == 1
    assert srv.stats.close_reasons[CloseReason.REFUSED] == 2
    assert not zombies()


def test_forking_reaps_children_as_soon_as_they_exit() -> None:
    with statemux.ForkingTCPServer(("127.0.0.1", 0), Greeting) as srv, serving(srv) as address:
        for _ in range(8):
            with connect(address) as client:
                assert read_line(client) == b"hi\n"
                client.sendall(b"quit\n")
                assert read_all(client) == b""
        started = time.monotonic()
        assert srv.wait_idle(5)
        assert time.monotonic() - started < 2
        assert not srv.active_children
        assert not zombies()
    assert srv.stats.close_reasons[CloseReason.NORMAL] == 8


def test_max_children_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_children must be a positive int, not 0"):
        statemux.ForkingTCPServer(("127.0.0.1", 0), Greeting, max_children=0)


# -- every blocking model: shutdown, resets, one send per read -------------------------------------
@pytest.mark.parametrize("model", ["sync", "threading", "forking", "multiplexing"])
def test_shutdown_closes_open_connections_gracefully(model: str) -> None:
    with server_class(model, "TCP")(("127.0.0.1", 0), Greeting) as srv:
        thread = threading.Thread(target=srv.serve_forever)
        thread.start()
        try:
            client = connect(srv.server_address)
            assert read_line(client) == b"hi\n"
            client.sendall(b"still here\n")
            assert read_line(client) == b"still here\n"
            started = time.monotonic()
            srv.shutdown()
            assert time.monotonic() - started < srv.limits.drain_timeout
            assert read_all(client) == b""
            client.close()
        finally:
            srv.shutdown()
            thread.join(10)
    assert srv.stats.close_reasons[CloseReason.SHUTDOWN] == 1


@pytest.mark.parametrize("model", ["sync", "threading", "forking", "multiplexing"])
def test_a_reset_is_a_normal_close_not_a_traceback(
    model: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="statemux")
    closed = threading.Event()

    @attrs.define
    class Noticing(Greeting):
        def on_closed(self, reason: CloseReason) -> None:
            closed.set()  # in this process (all but forking, where wait_idle is the signal)

    with server_class(model, "TCP")(("127.0.0.1", 0), Noticing) as srv, serving(srv) as address:
        # The client lives in a process of its own: a forked server child holds copies of
        # this process's sockets, and a reset is only sent when the last copy closes.
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                client = socket.create_connection(address, timeout=10)
                if read_line(client) == b"hi\n":
                    client.sendall(b"unfinished")
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()  # RST
                    status = 0
            finally:
                os._exit(status)
        assert os.waitpid(pid, 0)[1] == 0
        assert srv.wait_idle(5) if model == "forking" else closed.wait(5)
    assert srv.stats.close_reasons[CloseReason.PEER_CLOSED] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class RecordingSocket:
    """A socket that records every send call."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends: list[bytes] = []
        self.family = sock.family

    def send(self, data: Any) -> int:
        n = self.sock.send(data)
        self.sends.append(bytes(data[:n]))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_everything_one_read_produced_leaves_in_one_send() -> None:
    with statemux.TCPServer(("127.0.0.1", 0), Triple) as srv:
        server_end, client = socket.socketpair()
        recording = RecordingSocket(server_end)
        client.sendall(b"a\nb\nc\n")
        driver = threading.Thread(target=srv._serve_stream, args=(recording, "peer"))
        driver.start()
        assert client.recv(100) == b"<a><b><c>"
        client.sendall(b"d\n")
        assert client.recv(100) == b"<d>"
        client.close()
        driver.join(10)
        server_end.close()
    assert recording.sends == [b"<a><b><c>", b"<d>"]
    assert srv.stats.close_reasons[CloseReason.PEER_CLOSED] == 1


def test_connections_lists_what_each_live_connection_is_doing() -> None:
    with statemux.ThreadingTCPServer(("127.0.0.1", 0), Greeting) as srv, serving(srv) as address:
        with connect(address) as client:
            assert read_line(client) == b"hi\n"
            (row,) = srv.connections
            assert (row.machine, row.state, row.bytes_out, row.closing) == (
                "Greeting",
                "reading",
                3,
                None,
            )


# -- datagram sessions -----------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["sync", "threading", "multiplexing"])
def test_each_peer_has_its_own_session_and_order(model: str) -> None:
    with server_class(model, "UDP")(("127.0.0.1", 0), DgCounter) as srv, serving(srv) as address:
        peers = []
        for _ in range(5):
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.settimeout(5)
            peer.bind(("127.0.0.1", 0))
            peers.append(peer)
        for _ in range(20):
            for peer in peers:
                peer.sendto(b"m", address)
        for peer in peers:
            assert [peer.recv(100) for _ in range(20)] == [b"%d m" % n for n in range(1, 21)]
            peer.close()
        assert len(srv.connections) == 5


@pytest.mark.parametrize("model", ["sync", "threading", "multiplexing"])
def test_datagram_sessions_expire_after_session_timeout(model: str) -> None:
    with server_class(model, "UDP")(("127.0.0.1", 0), DgCounter, session_timeout=0.1) as srv:
        with serving(srv) as address, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.settimeout(5)
            peer.sendto(b"a", address)
            assert peer.recv(100) == b"1 a"
            time.sleep(0.3)  # allowed: the session must outlive its idle limit on the real clock
            peer.sendto(b"b", address)
            assert peer.recv(100) == b"1 b"  # a new session
    assert srv.stats.close_reasons[CloseReason.IDLE] == 1


@attrs.define
class DgEchoUntilEnd(Machine):
    """Echo; ``end`` is not answered but sets ``seen_end`` (every earlier reply has been
    sent, queued or dropped by then: a session handles its datagrams in order)."""

    seen_end: threading.Event
    echoing = State(Datagram(max_size=64), initial=True)

    @echoing.on(Frame, to=echoing)
    def echo(self, data: bytes) -> None:
        if data == b"end":
            self.seen_end.set()
        else:
            self.send(data)


@pytest.mark.parametrize("model", ["sync", "threading", "multiplexing"])
def test_replies_a_peer_cannot_take_are_queued_then_dropped_never_blocking(
    model: str, short_tmp: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="statemux")
    sent = 40
    seen_end = threading.Event()
    factory = functools.partial(DgEchoUntilEnd, seen_end)
    with server_class(model, "UnixDatagram")(
        unix_address(short_tmp), factory, datagram_queue=4
    ) as srv:
        with serving(srv) as address:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stuck:
                stuck.bind(unix_address(short_tmp, "stuck"))
                stuck.settimeout(5)
                for n in range(sent):  # it reads nothing while it sends
                    stuck.sendto(b"%d" % n, address)
                stuck.sendto(b"end", address)
                assert seen_end.wait(5)
                dropped = srv.datagrams_dropped
                assert dropped > 0
                # The server is not blocked: another peer is answered at once (queues
                # are kept per peer, so the stuck one holds up no one else).
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
                    other.bind(unix_address(short_tmp, "other"))
                    other.settimeout(5)
                    other.sendto(b"ping", address)
                    assert other.recv(100) == b"ping"
                replies = [stuck.recv(100) for _ in range(sent - dropped)]
                assert replies == [
                    b"%d" % n for n in range(sent - dropped)
                ]  # the first ones, in order
                assert nothing_arrives(stuck, 0.1)
    assert srv.datagrams_dropped == dropped
    assert "datagram_queue (4) full: reply to" in caplog.text


@attrs.define
class DgGated(Machine):
    """Echo; ``block`` holds the session's worker until ``gate`` opens."""

    blocked: threading.Event
    gate: threading.Event
    echoing = State(Datagram(max_size=64), initial=True)

    @echoing.on(Frame, to=echoing)
    def echo(self, data: bytes) -> None:
        if data == b"block":
            self.blocked.set()
            self.gate.wait(10)
        else:
            self.send(data)


def test_a_sessions_backlog_is_bounded_while_its_worker_is_busy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="statemux")
    blocked, gate = threading.Event(), threading.Event()

    class SmallBacklog(statemux.ThreadingUDPServer):
        session_backlog = 4

    factory = functools.partial(DgGated, blocked, gate)
    with SmallBacklog(("127.0.0.1", 0), factory) as srv, serving(srv) as address:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.settimeout(5)
            peer.sendto(b"block", address)
            assert blocked.wait(5)
            for n in range(10):
                peer.sendto(b"%d" % n, address)
            # The first 4 wait for the worker, the other 6 were dropped. A datagram from
            # another peer is unaffected (its session has a worker of its own).
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.settimeout(5)
                other.sendto(b"other", address)
                assert other.recv(100) == b"other"
            assert srv.datagrams_dropped == 6
            gate.set()
            assert [peer.recv(100) for _ in range(4)] == [b"0", b"1", b"2", b"3"]
            assert nothing_arrives(peer, 0.1)
    assert "session_backlog (4) full for" in caplog.text


# -- machine timers without a loop: a store's active expiry ----------------------------------------
@pytest.mark.parametrize("model", ["sync", "threading", "multiplexing"])
def test_a_stores_active_expiry_runs_in_an_idle_connections_thread(model: str) -> None:
    from statemachines import resp

    factory = resp.build()
    store = factory.args[0]  # type: ignore[attr-defined]
    timer_fired = threading.Event()

    def tracer(cid: int, old: str, event: str, new: str) -> None:
        if event == "timer":
            timer_fired.set()

    with server_class(model, "TCP")(("127.0.0.1", 0), factory, tracer=tracer) as srv:
        with serving(srv) as address, connect(address) as client:
            client.sendall(b"SET k v PX 30\r\n")
            assert read_line(client) == b"+OK\r\n"
            assert len(store.data) == 1
            # Nobody touches the key again: only the machine's own timer can remove it.
            for _ in range(50):
                assert timer_fired.wait(5)
                timer_fired.clear()
                with store.lock:
                    if not store.data:
                        break
            assert not store.data


# -- the page that documents all this -----------------------------------------------------------------
def test_the_models_page_examples_run() -> None:
    page = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "models.md")
    with open(page) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, "models.md", "exec"), {"__name__": "models_md"})


# -- closing, ordering and shutdown under the blocking models ---------------------------------------
@attrs.define
class BigThenClose(Machine):
    """``big`` sends ``size`` bytes and ends the connection; other lines are echoed."""

    size: int
    reading = State(Line(), initial=True)
    done = State(final=True)

    @reading.on(Frame, to=(reading, done))
    def line(self, line: bytes) -> State:
        if line == b"big":
            self.send(b"x" * self.size)
            return BigThenClose.done
        self.send(line + b"\n")
        return BigThenClose.reading


@pytest.mark.parametrize("family", ["TCP", "UnixStream"])
@pytest.mark.parametrize("model", ["sync", "threading"])
def test_a_graceful_close_gives_up_on_a_peer_that_stops_reading(
    model: str, family: str, short_tmp: str
) -> None:
    size = 8 << 20  # more than the kernel buffers of both ends take, less than output_limit
    factory = functools.partial(BigThenClose, size)
    address = ("127.0.0.1", 0) if family == "TCP" else unix_address(short_tmp)
    with server_class(model, family)(
        address, factory, output_limit=2 * size, flush_timeout=0.3, drain_timeout=1
    ) as srv:
        with serving(srv) as address, connect(address, rcvbuf=4096) as stuck:
            stuck.sendall(b"big\n")  # and never reads
            with connect(address) as client:
                client.sendall(b"hello\n")
                # sync: served only once the stuck connection has been cut off
                assert read_line(client) == b"hello\n"
            assert srv.wait_idle(5)
            assert srv.stats.close_reasons[CloseReason.SLOW_CONSUMER] == 1
            assert srv.stats.close_reasons[CloseReason.PEER_CLOSED] == 1  # the other client


@attrs.define
class DgTwice(Machine):
    """Two sends per datagram: two datagrams back."""

    echoing = State(Datagram(max_size=64), initial=True)

    @echoing.on(Frame, to=echoing)
    def echo(self, data: bytes) -> None:
        self.send(b"1:" + data)
        self.send(b"2:" + data)


@pytest.mark.parametrize("model", ["sync", "threading", "forking"])
def test_each_send_of_a_datagram_session_is_a_datagram_of_its_own(model: str) -> None:
    with server_class(model, "UDP")(("127.0.0.1", 0), DgTwice) as srv, serving(srv) as address:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.settimeout(5)
            peer.sendto(b"a", address)
            assert [peer.recv(100), peer.recv(100)] == [b"1:a", b"2:a"]
            assert nothing_arrives(peer, 0.05)


@attrs.define
class DgBatches(Machine):
    """Echo; the session ends after ``per_session`` datagrams. A datagram handled before
    ``Opened`` is recorded in ``early``."""

    per_session: int
    early: list[bytes]
    opened: bool = False
    seen: int = 0
    echoing = State(Datagram(max_size=64), initial=True)
    done = State(final=True)

    @echoing.on(Opened, to=echoing)
    def open(self, event: Opened) -> None:
        self.opened = True

    @echoing.on(Frame, to=(echoing, done))
    def echo(self, data: bytes) -> State:
        if not self.opened:
            self.early.append(data)
        self.send(data)
        self.seen += 1
        return DgBatches.done if self.seen == self.per_session else DgBatches.echoing


@pytest.mark.parametrize("model", ["sync", "threading"])
def test_one_peers_datagrams_are_handled_in_order_across_its_sessions(model: str) -> None:
    early: list[bytes] = []
    window, windows = 60, 20  # a window stays well below the server's receive buffer
    factory = functools.partial(DgBatches, 3, early)
    with server_class(model, "UDP")(("127.0.0.1", 0), factory) as srv, serving(srv) as address:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            peer.settimeout(5)
            got: list[int] = []
            for w in range(windows):
                for n in range(w * window, (w + 1) * window):
                    peer.sendto(b"%d" % n, address)
                got += [int(peer.recv(100)) for _ in range(window)]
    assert got == list(range(window * windows))
    assert early == []


@attrs.define
class Stopper(Machine):
    """Any frame shuts the server (``holder[0]``) down from the handler, then replies how
    many seconds ``shutdown()`` took."""

    holder: list[Any]
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def stop(self, frame: bytes) -> None:
        started = time.monotonic()
        self.holder[0].shutdown()
        self.send(b"%.3f\n" % (time.monotonic() - started))


@attrs.define
class DgStopper(Stopper):
    reading = State(Datagram(max_size=64), initial=True)

    @reading.on(Frame, to=reading)
    def stop(self, frame: bytes) -> None:
        Stopper.stop(self, frame)


@pytest.mark.parametrize("family", ["TCP", "UDP"])
@pytest.mark.parametrize("model", ["sync", "threading"])
def test_shutdown_from_a_handler_does_not_wait_for_its_own_connection(
    model: str, family: str
) -> None:
    holder: list[Any] = []
    factory = functools.partial(Stopper if family == "TCP" else DgStopper, holder)
    with server_class(model, family)(("127.0.0.1", 0), factory, drain_timeout=5) as srv:
        holder.append(srv)
        with serving(srv) as address:
            if family == "TCP":
                with connect(address) as client:
                    client.sendall(b"stop\n")
                    reply = read_line(client)
                    assert read_all(client) == b""  # then closed by the shutdown
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                    peer.settimeout(5)
                    peer.sendto(b"stop", address)
                    reply = peer.recv(100)
    assert float(reply) < 1
