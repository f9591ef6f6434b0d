"""Code written for ``socketserver`` keeps working after ``import socketserver`` becomes
``import statemux``: stdlib handler classes run unchanged on every sync, threading and forking
class, with the stdlib's behaviour (in the spirit of CPython's Lib/test/test_socketserver.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import statemux
from statemachines.echo import DatagramEcho
from statemux.testing import serving

pytestmark = [
    pytest.mark.timeout(30),
    # A SystemExit ending a handler thread is silent in the stdlib (threading.excepthook
    # ignores it); pytest reports it, possibly during the next test.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

MODELS = ["", "Threading", "Forking"]
FAMILIES = ["TCP", "UDP", "UnixStream", "UnixDatagram"]
TEST_STR = b"hello world\n"


def is_stream(family: str) -> bool:
    return family in ("TCP", "UnixStream")


def is_unix(family: str) -> bool:
    return family.startswith("Unix")


def address_for(family: str, tmp: str) -> Any:
    return os.path.join(tmp, "srv.sock") if is_unix(family) else ("127.0.0.1", 0)


class EchoLine(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class EchoDatagram(socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class Client(socket.socket):
    """Hangs up with shutdown() first: a forked child holds copies of this process's sockets."""

    def close(self) -> None:
        if self.fileno() >= 0:
            with contextlib.suppress(OSError):
                self.shutdown(socket.SHUT_RDWR)
        super().close()


def stream_examine(family: str, address: Any) -> None:
    af = socket.AF_UNIX if is_unix(family) else socket.AF_INET
    with Client(af, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(address)
        s.sendall(TEST_STR)
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(100)
            if not data:
                break
            buf += data
        assert buf == TEST_STR


def dgram_examine(family: str, address: Any, tmp: str, n: int) -> None:
    af = socket.AF_UNIX if is_unix(family) else socket.AF_INET
    with socket.socket(af, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        # A Unix datagram client must bind to be answered.
        s.bind(os.path.join(tmp, f"client{n}") if is_unix(family) else ("127.0.0.1", 0))
        s.sendto(TEST_STR, address)
        assert s.recv(100) == TEST_STR


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model", MODELS, ids=["sync", "threading", "forking"])
def test_stdlib_handlers_run_unchanged(model: str, family: str, short_tmp: str) -> None:
    cls = getattr(statemux, f"{model}{family}Server")
    handler = EchoLine if is_stream(family) else EchoDatagram
    # The stdlib base classes are the stdlib's: isinstance checks keep working.
    assert issubclass(cls, getattr(socketserver, f"{family}Server"))
    if model:
        assert issubclass(cls, getattr(socketserver, f"{model}MixIn"))

    class MyServer(cls):  # type: ignore[misc,valid-type]
        def handle_error(self, request: Any, client_address: Any) -> None:
            self.close_request(request)
            raise  # noqa: PLE0704 - the stdlib test's way to surface handler errors

    with MyServer(address_for(family, short_tmp), handler) as server:
        if not is_unix(family):
            assert server.server_address == server.socket.getsockname()
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
        thread.start()
        try:
            for n in range(3):
                if is_stream(family):
                    stream_examine(family, server.server_address)
                else:
                    dgram_examine(family, server.server_address, short_tmp, n)
        finally:
            server.shutdown()
            thread.join(10)
    assert server.socket.fileno() == -1
    if model == "Forking":
        assert not server.active_children


def test_forking_unix_servers_exist_on_every_python() -> None:
    for name in ("ForkingUnixStreamServer", "ForkingUnixDatagramServer"):
        cls = getattr(statemux, name)
        assert issubclass(cls, socketserver.ForkingMixIn)
    assert statemux.ForkingUnixStreamServer.address_family == socket.AF_UNIX
    assert statemux.ForkingUnixDatagramServer.socket_type == socket.SOCK_DGRAM


@pytest.mark.parametrize("family", ["TCP", "UDP", "UnixStream", "UnixDatagram"])
def test_multiplexing_servers_refuse_blocking_handlers_naming_who_can_run_them(
    family: str, short_tmp: str
) -> None:
    cls = getattr(statemux, f"Multiplexing{family}Server")
    handler = EchoLine if is_stream(family) else EchoDatagram
    with pytest.raises(TypeError) as info:
        cls(address_for(family, short_tmp), handler)
    message = str(info.value)
    assert handler.__qualname__ in message
    assert "is a blocking socketserver handler" in message
    assert "TCPServer, UDPServer, UnixStreamServer, UnixDatagramServer" in message
    assert "Threading*/Forking*" in message
    assert os.listdir(short_tmp) == []


# -- errors in handlers (CPython's ErrorHandlerTest) -----------------------------------------------
class ErrorReporter:
    """handle_error calls, counted across processes (a forked child reports by pipe)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)

    def count(self) -> int:
        try:
            return len(os.read(self.r, 4096))
        except BlockingIOError:
            return 0


@pytest.fixture
def reporter() -> Iterator[ErrorReporter]:
    r = ErrorReporter()
    yield r
    os.close(r.r)
    os.close(r.w)


def raising_handler(exc: type[BaseException]) -> type[socketserver.BaseRequestHandler]:
    class Raising(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            raise exc()

    return Raising


def reporting(cls: type, reporter: ErrorReporter) -> type:
    class Reporting(cls):  # type: ignore[misc,valid-type]
        def handle_error(self, request: Any, client_address: Any) -> None:
            os.write(reporter.w, b"E")

    return Reporting


def poke(address: Any) -> None:
    with Client(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(address)
        s.sendall(b"go\n")
        with contextlib.suppress(ConnectionResetError):
            s.recv(100)


@pytest.mark.parametrize("model", MODELS, ids=["sync", "threading", "forking"])
def test_a_handler_exception_goes_to_handle_error_and_the_server_goes_on(
    model: str, reporter: ErrorReporter
) -> None:
    cls = reporting(getattr(statemux, f"{model}TCPServer"), reporter)
    with cls(("127.0.0.1", 0), raising_handler(ValueError)) as server:
        with serving(server) as address:
            poke(address)
            poke(address)
        if model == "Forking":
            server.collect_children(blocking=True)
    assert reporter.count() == 2


def test_sync_does_not_swallow_system_exit(reporter: ErrorReporter) -> None:
    cls = reporting(statemux.TCPServer, reporter)
    with cls(("127.0.0.1", 0), raising_handler(SystemExit)) as server:
        client = threading.Thread(target=poke, args=(server.server_address,))
        client.start()
        with pytest.raises(SystemExit):
            server.handle_request()
        client.join(10)
    assert reporter.count() == 0


def test_threading_does_not_report_system_exit_and_goes_on(reporter: ErrorReporter) -> None:
    cls = reporting(statemux.ThreadingTCPServer, reporter)
    with cls(("127.0.0.1", 0), raising_handler(SystemExit)) as server:
        with serving(server) as address:
            poke(address)
            poke(address)
            assert server.wait_idle(5)
    assert reporter.count() == 0


@pytest.mark.parametrize(
    ("handler", "status", "reported"),
    [(EchoLine, 0, 0), (raising_handler(ValueError), 1, 1), (raising_handler(SystemExit), 1, 0)],
    ids=["ok", "ValueError", "SystemExit"],
)
def test_forking_children_exit_with_the_stdlibs_statuses(
    handler: type, status: int, reported: int, reporter: ErrorReporter
) -> None:
    with reporting(statemux.ForkingTCPServer, reporter)(("127.0.0.1", 0), handler) as server:
        client = threading.Thread(target=poke, args=(server.server_address,))
        client.start()
        server.handle_request()
        client.join(10)
        (pid,) = server.active_children
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == status
    assert reporter.count() == reported
    assert not server.active_children


# -- shutting down, closing, binding ---------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS, ids=["sync", "threading", "forking"])
def test_shutdown_wakes_serve_forever_at_once(model: str) -> None:
    with getattr(statemux, f"{model}TCPServer")(("127.0.0.1", 0), EchoLine) as server:
        thread = threading.Thread(
            target=server.serve_forever, args=(30.0,)
        )  # no polling to rely on
        thread.start()
        stream_examine("TCP", server.server_address)
        server.shutdown()
        thread.join(2)
        assert not thread.is_alive()


def test_shutdown_before_serve_forever_makes_it_return_at_once() -> None:
    with statemux.ThreadingTCPServer(("127.0.0.1", 0), EchoLine) as server:
        server.shutdown()  # the stdlib would block here until serve_forever ran
        server.serve_forever(30.0)
        # and serving again after that works
        with serving(server) as address:
            stream_examine("TCP", address)


def test_the_context_manager_closes_the_socket() -> None:
    with statemux.TCPServer(("127.0.0.1", 0), EchoLine) as server:
        assert server.socket.fileno() >= 0
    assert server.socket.fileno() == -1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    "name",
    ["TCPServer", "ThreadingTCPServer", "ForkingTCPServer", "MultiplexingUDPServer", "UDPServer"],
)
def test_a_failed_bind_leaks_nothing(name: str) -> None:
    cls = getattr(statemux, name)
    kind = socket.SOCK_DGRAM if "UDP" in name else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        before = open_fds()
        for _ in range(64):
            with pytest.raises(OSError):
                cls(taken.getsockname(), DatagramEcho if "Multiplexing" in name else EchoLine)
        assert open_fds() == before


def test_verify_request_false_shuts_the_request_down() -> None:
    shut: list[Any] = []

    class Refusing(statemux.TCPServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return False

        def shutdown_request(self, request: Any) -> None:
            shut.append(request)
            super().shutdown_request(request)

    with Refusing(("127.0.0.1", 0), EchoLine) as server, serving(server) as address:
        with Client(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(address)
            assert s.recv(100) == b""
    assert len(shut) == 1
    assert server.stats.close_reasons[statemux.CloseReason.REFUSED] == 1


def test_threads_are_reaped() -> None:
    with (
        statemux.ThreadingTCPServer(("127.0.0.1", 0), EchoLine) as server,
        serving(server) as address,
    ):
        for _ in range(10):
            stream_examine("TCP", address)
        assert server.wait_idle(5)
        assert server.threads == 0


def test_daemon_threads_and_block_on_close_are_honoured() -> None:
    started, release = threading.Event(), threading.Event()

    class Waiting(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            started.set()
            release.wait(10)

    class Daemonic(statemux.ThreadingTCPServer):
        daemon_threads = True
        block_on_close = False

    try:
        with Daemonic(("127.0.0.1", 0), Waiting) as server, serving(server) as address:
            with Client(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.connect(address)
                assert started.wait(5)
                (thread,) = server._handler_threads
                assert thread.daemon
        # server_close returned although the handler still waits
        assert thread.is_alive()
    finally:
        release.set()
    thread.join(5)


def test_handle_request_honours_timeout() -> None:
    timed_out: list[bool] = []

    class Impatient(statemux.UDPServer):
        timeout = 0.01

        def handle_timeout(self) -> None:
            timed_out.append(True)

    with Impatient(("127.0.0.1", 0), EchoDatagram) as server:
        server.handle_request()
    assert timed_out == [True]


def test_stream_handler_attributes_are_the_stdlibs() -> None:
    seen: dict[str, Any] = {}

    class Inspecting(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            seen["server"] = self.server
            seen["address"] = self.client_address
            seen["line"] = self.rfile.readline()
            self.wfile.write(b"ok\n")

    with (
        statemux.ThreadingTCPServer(("127.0.0.1", 0), Inspecting) as server,
        serving(server) as address,
    ):
        with Client(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(address)
            s.sendall(b"line\n")
            assert s.recv(100) == b"ok\n"
            mine = s.getsockname()
    assert seen == {"server": server, "address": mine, "line": b"line\n"}


def test_handle_error_logs_instead_of_printing(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with statemux.TCPServer(("127.0.0.1", 0), raising_handler(ValueError)) as server:
        client = threading.Thread(target=poke, args=(server.server_address,))
        client.start()
        server.handle_request()
        client.join(10)
    assert "ValueError" in caplog.text
    assert capsys.readouterr().err == ""
