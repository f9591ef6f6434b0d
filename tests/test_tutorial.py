"""The tutorial's four servers, run for real on loopback."""

from __future__ import annotations

import importlib
import os
import select
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
sys.path.insert(0, str(EXAMPLES))

tally_sync = importlib.import_module("tally_sync")
tally_machine = importlib.import_module("tally_machine")


@contextmanager
def running(server: socketserver.BaseServer) -> Iterator[tuple[str, int]]:
    """Serve in a thread; a forking server is served from a child process instead.

    A forking server must not fork from the test process once the test holds client
    sockets: each child would inherit the clients' ends, keep them open, and never see EOF.
    """
    if isinstance(server, socketserver.ForkingMixIn):
        with served_by_a_child(server) as address:
            yield address
        return
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address  # type: ignore[misc]
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


@contextmanager
def served_by_a_child(server: socketserver.BaseServer) -> Iterator[tuple[str, int]]:
    pid = os.fork()
    if pid == 0:  # the server process: serve until told to stop, reaping its own children
        os.setpgid(0, 0)  # its children join its group, so teardown can always end them all
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        try:
            server.serve_forever(0.05)
            server.server_close()
        finally:
            os._exit(0)
    server.socket.close()
    try:
        yield server.server_address  # type: ignore[misc]
    finally:
        os.kill(pid, signal.SIGTERM)
        pidfd = os.pidfd_open(pid)
        try:
            exited, _, _ = select.select([pidfd], [], [], 10)
        finally:
            os.close(pidfd)
        if not exited:  # a stuck child must not outlive the test (it holds pytest's output)
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            os.killpg(pid, signal.SIGKILL)  # any of its children still around
        except ProcessLookupError:
            pass


def ask(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        reply += chunk
    return reply


TRANSCRIPT = [
    (b"5\n", b"ERR say HELLO first\n"),
    (b"HELLO\n", b"welcome\n"),
    (b"5\n", b"= 5\n"),
    (b"-2\n", b"= 3\n"),
    (b"x\n", b"ERR not a number\n"),
    (b"RESET\n", b"= 0\n"),
    (b"4\n", b"= 4\n"),
    (b"BYE\n", b"total 4\n"),
]


@pytest.mark.timeout(20)
def test_the_sync_server_is_deaf_to_a_second_client() -> None:
    with running(socketserver.TCPServer(("127.0.0.1", 0), tally_sync.TallyHandler)) as address:
        first = socket.create_connection(address, timeout=5)
        second = socket.create_connection(address, timeout=5)  # the kernel accepts; nobody reads
        assert ask(first, b"HELLO\n") == b"welcome\n"
        second.sendall(b"HELLO\n")
        second.settimeout(0.3)
        with pytest.raises(TimeoutError):
            second.recv(100)  # deaf while the first client stays connected
        first.close()
        second.settimeout(5)
        assert second.recv(100) == b"welcome\n"  # served once the first one left
        second.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "server_class",
    [socketserver.ThreadingTCPServer, socketserver.ForkingTCPServer],
    ids=["threads", "fork"],
)
def test_threads_and_forks_serve_clients_at_once(server_class: type) -> None:
    with running(server_class(("127.0.0.1", 0), tally_sync.TallyHandler)) as address:
        first = socket.create_connection(address, timeout=5)
        second = socket.create_connection(address, timeout=5)
        for line, reply in TRANSCRIPT:
            assert ask(first, line) == reply
            assert ask(second, line) == reply
        first.close()
        second.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("model", sorted(tally_machine.MODELS))
def test_the_machine_gives_the_same_answers_under_every_model(model: str) -> None:
    server_class = tally_machine.MODELS[model]
    with running(server_class(("127.0.0.1", 0), tally_machine.Tally)) as address:
        first = socket.create_connection(address, timeout=5)
        for line, reply in TRANSCRIPT:
            assert ask(first, line) == reply
        assert first.recv(100) == b""  # BYE: the server closed after the total
        first.close()


def test_the_tutorial_page_shows_what_the_code_does() -> None:
    """Its diagram is Tally's own, and its in-memory test snippet passes."""
    import re

    from statemux.diagram import to_mermaid

    page = (EXAMPLES.parent / "tutorial.md").read_text()
    (diagram,) = re.findall(r"```mermaid\n(.*?)```", page, re.S)
    assert diagram == to_mermaid(tally_machine.Tally)
    (snippet,) = [
        b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "Simulator(Tally)" in b
    ]
    exec(compile(snippet, "tutorial.md", "exec"), {"Tally": tally_machine.Tally})
