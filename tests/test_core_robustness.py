"""One connection's mistakes stay its own; the loop keeps its promises across restarts."""

from __future__ import annotations

import functools
import selectors
import socket
import threading
from typing import Any

import attrs
import pytest

from statemux import (
    CloseReason,
    Datagram,
    Frame,
    Line,
    Loop,
    Machine,
    MultiplexingTCPServer,
    MultiplexingUDPServer,
    Opened,
    State,
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
        with socket.create_connection(address, timeout=5) as bad, socket.create_connection(
            address, timeout=5
        ) as good:
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

    @sending.on(Drained_ := __import__("statemux").Drained, to=(sending, done))
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
