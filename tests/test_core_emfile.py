"""Running out of file descriptors: the server must not spin on a listening socket it cannot
accept from, must keep it open, and must accept again once descriptors are freed.

The server runs in a child process with a low RLIMIT_NOFILE; this process plays the clients.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.timeout(30)

WAIT = 5.0
NOFILE = 48
MEASURE_SECONDS = 1.0

CHILD = textwrap.dedent(
    """
    import logging, os, resource, sys, threading, time

    import attrs
    from statemux import Frame, Line, Machine, MultiplexingTCPServer, State

    @attrs.define
    class Echo(Machine):
        reading = State(Line(), initial=True)

        @reading.on(Frame, to=reading)
        def echo(self, line):
            self.send(line + b"\\n")

    out_lock = threading.Lock()

    def say(*words):
        with out_lock:
            sys.stdout.write(" ".join(str(w) for w in words) + "\\n")
            sys.stdout.flush()

    class Report(logging.Handler):
        def emit(self, record):
            if "Too many open files" in record.getMessage():
                say("EMFILE")

    log = logging.getLogger("statemux")
    log.addHandler(Report())
    log.setLevel(logging.WARNING)
    log.propagate = False

    limit = int(sys.argv[1])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    server = MultiplexingTCPServer(
        ("127.0.0.1", 0), Echo, idle_timeout=None, accept_retry_delay=0.05
    )
    loop = server._ensure_loop()
    thread = threading.Thread(target=server.serve_forever, args=(0.5,), daemon=True)
    thread.start()
    loop.started.wait(5)
    listening = server.fileno()
    say("READY", server.server_address[1])
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "measure":
            t0, w0 = os.times(), time.monotonic()
            time.sleep(float(cmd[1]))  # allowed: CPU use is measured over a fixed interval
            t1, w1 = os.times(), time.monotonic()
            cpu = (t1.user - t0.user) + (t1.system - t0.system)
            say("CPU", cpu, w1 - w0)
        elif cmd[0] == "status":
            say("STATUS", server.socket.fileno() == listening != -1, server.socket.fileno())
        elif cmd[0] == "quit":
            break
    server.shutdown()
    server.server_close()
    say("BYE")
    """
)


class Child:
    """The server process: commands on stdin, one reply line per command on stdout."""

    def __init__(self, nofile: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(nofile)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdout = self.proc.stdout
        self.stdin = self.proc.stdin
        self.pending = b""

    def readline(self, timeout: float = WAIT) -> str | None:
        """The next line, or None if none arrives within ``timeout``."""
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.stdout], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"the server process exited ({self.proc.poll()})")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()

    def expect(self, prefix: str, timeout: float = WAIT) -> list[str]:
        """Skip other lines (EMFILE reports) until one starting with ``prefix``."""
        for _ in range(10_000):
            line = self.readline(timeout)
            assert line is not None, f"no {prefix} line from the server process"
            if line.startswith(prefix):
                return line.split()[1:]
        raise AssertionError(f"no {prefix} line among 10000")

    def command(self, text: str) -> None:
        self.stdin.write(text.encode() + b"\n")
        self.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit")
                self.proc.wait(WAIT)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(WAIT)


@pytest.fixture
def child() -> Iterator[Child]:
    child = Child(NOFILE)
    try:
        yield child
    finally:
        child.close()


def test_descriptor_exhaustion_neither_spins_nor_stops_accepting(child: Child) -> None:
    port = int(child.expect("READY")[0])
    served: list[socket.socket] = []
    replies: dict[socket.socket, bytes] = {}
    try:
        # Open clients until the server reports accept() failing with EMFILE. (Linux reserves
        # the descriptor before looking at the queue, so the report may come right after the
        # last client that fits was accepted: that client may still be served.)
        for i in range(NOFILE + 10):
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            served.append(sock)
            replies[sock] = b"client %d\n" % i
            sock.sendall(replies[sock])
            ready, _, _ = select.select([sock, child.stdout], [], [], WAIT)
            if child.stdout in ready:
                assert child.readline() == "EMFILE"
                break
            assert sock in ready, "neither a reply nor an EMFILE report"
            assert sock.recv(100) == replies.pop(sock)
        else:
            raise AssertionError(f"{NOFILE + 10} clients served with RLIMIT_NOFILE={NOFILE}")
        assert len(served) > 10
        # The table is full now: this client waits in the listen queue.
        waiting = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        replies[waiting] = b"waiting\n"
        waiting.sendall(replies[waiting])

        # While descriptors are exhausted, the server process stays almost idle.
        child.command(f"measure {MEASURE_SECONDS}")
        cpu, wall = (float(x) for x in child.expect("CPU", timeout=WAIT + MEASURE_SECONDS))
        assert wall >= MEASURE_SECONDS
        assert cpu / wall < 0.2, f"server used {cpu:.2f} s of CPU in {wall:.2f} s of exhaustion"
        print(f"CPU while out of descriptors: {cpu:.3f} s in {wall:.3f} s")
        child.command("status")
        assert child.expect("STATUS")[0] == "True"  # the listening socket was never closed
        ready, _, _ = select.select([waiting], [], [], 0)
        assert ready == []  # not accepted: there is no descriptor for it

        # Freeing descriptors lets the waiting client in, and new ones after it.
        for sock in served[:3]:
            sock.close()
            replies.pop(sock, None)
        del served[:3]
        assert read_line(waiting) == b"waiting\n"
        late = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        served.append(late)
        late.sendall(b"late\n")
        assert read_line(late) == b"late\n"
        for sock in served[:-1]:
            if sock in replies:  # the one whose reply raced the EMFILE report
                assert read_line(sock) == replies.pop(sock)
            sock.sendall(b"still\n")
            assert read_line(sock) == b"still\n"
    finally:
        for sock in [*served, *replies]:
            sock.close()


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data
