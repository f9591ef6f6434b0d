"""The ``statemux`` command: parsing and errors in process, serving in subprocesses.

Every subprocess binds port 0 (or a Unix socket in a short temporary directory) and prints
the address it really bound; the tests read it from its standard output.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest

from statemux import CloseReason, Limits, Stats
from statemux.admin import (
    MAX_COMMAND,
    MAX_PENDING,
    ROWS_PER_PIECE,
    Admin,
    AdminView,
    listen_url,
    peer_text,
)
from statemux.cli import (
    UsageError,
    format_table,
    load_config,
    main,
    parse_address,
    parse_limit,
    plan_from_args,
    refusal,
)
from statemux.host import ConnectionInfo
from statemux.testing import Simulator, chunkings

ROOT = Path(__file__).resolve().parent.parent
BOUND = 20.0  # seconds any subprocess step may take before the test fails


# -- a `statemux serve` subprocess ------------------------------------------------------------


class Served:
    """``python -m statemux ARGS`` in a subprocess; threads collect its output lines."""

    LISTEN = re.compile(r"statemux: (\S+) listening on ([a-z-]+?)(?:://|:)(\S+)  try: ")

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "statemux", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )
        self.lines: dict[str, queue.Queue[str | None]] = {
            "out": queue.Queue(),
            "err": queue.Queue(),
        }
        self.seen: dict[str, list[str]] = {"out": [], "err": []}
        self.threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for t in self.threads:
            t.start()
        self.listening: list[tuple[str, str, str]] = []

    def _pump(self, stream: Any, name: str) -> None:
        for line in stream:
            self.lines[name].put(line.rstrip("\n"))
        self.lines[name].put(None)

    def expect(self, pattern: str, stream: str = "out", timeout: float = BOUND) -> re.Match[str]:
        """Wait for a line matching ``pattern``; fail with everything seen so far."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines[stream].get(timeout=max(left, 0.001))
            except queue.Empty:
                line = "<timeout>"
            if line is None or line == "<timeout>":
                pytest.fail(
                    f"no line matching {pattern!r} on std{stream} ({line}); seen: {self.seen}"
                )
            self.seen[stream].append(line)
            m = rx.search(line)
            if m:
                return m

    def ready(self) -> Served:
        while True:
            m = self.expect(r"statemux: (ready|.* listening on .*)")
            if m.group(1) == "ready":
                return self
            lm = self.LISTEN.search(m.group(0))
            assert lm, m.group(0)
            self.listening.append((lm.group(1), lm.group(2), lm.group(3)))

    def inet(self, label: str, scheme: str = "tcp") -> tuple[str, int]:
        for name, sch, where in self.listening:
            if name == label and sch == scheme:
                host, _, port = where.rpartition(":")
                return host.strip("[]"), int(port)
        raise AssertionError(f"{label} does not listen on {scheme}: {self.listening}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = BOUND) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def rest(self, stream: str = "err") -> list[str]:
        """Every remaining line of a stream (after the process ended)."""
        for t in self.threads:
            t.join(BOUND)
        out = []
        while True:
            try:
                line = self.lines[stream].get_nowait()
            except queue.Empty:
                break
            if line is not None:
                out.append(line)
        return self.seen[stream] + out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(BOUND)
        for t in self.threads:
            t.join(BOUND)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Served] = []

    def start(*args: str, **kw: Any) -> Served:
        s = Served(*args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def converse(address: Any, data: bytes, want: int, family: int = socket.AF_INET) -> bytes:
    """Send ``data``, read until ``want`` bytes came back."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(BOUND)
        sock.connect(address)
        sock.sendall(data)
        return read_exactly(sock, want)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def read_to_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(1 << 20):
        buf += chunk
    return bytes(buf)


def run_cli(*args: str, timeout: float = BOUND) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "statemux", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# -- addresses, limits, arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "text", "family", "address"),
    [
        ("tcp", "127.0.0.1:80", socket.AF_INET, ("127.0.0.1", 80)),
        ("tcp", "8080", socket.AF_INET, ("127.0.0.1", 8080)),
        ("tcp", ":8080", socket.AF_INET, ("0.0.0.0", 8080)),
        ("tcp", "[::1]:8080", socket.AF_INET6, ("::1", 8080)),
        ("udp", "localhost:514", socket.AF_INET, ("localhost", 514)),
        ("udp", "[::]:0", socket.AF_INET6, ("::", 0)),
        ("unix", "/tmp/x.sock", socket.AF_UNIX, "/tmp/x.sock"),
        ("unix-dgram", "@statemux", socket.AF_UNIX, "\0statemux"),
    ],
)
def test_addresses(transport: str, text: str, family: int, address: Any) -> None:
    ep = parse_address(transport, text)
    assert (ep.transport, ep.family, ep.address) == (transport, family, address)


@pytest.mark.parametrize(
    ("transport", "text", "message"),
    [
        (
            "tcp",
            "localhost",
            "bad address 'localhost' for --tcp: expected HOST:PORT, [IPV6]:PORT or PORT",
        ),
        (
            "tcp",
            "1.2.3.4:",
            "bad address '1.2.3.4:' for --tcp: expected HOST:PORT, [IPV6]:PORT or PORT",
        ),
        (
            "udp",
            "127.0.0.1:70000",
            "bad address '127.0.0.1:70000' for --udp: port 70000 is above 65535",
        ),
        ("tcp", "[::g]:80", "bad address '[::g]:80' for --tcp: '::g' is not an IPv6 address"),
        (
            "tcp",
            "::1:80",
            "bad address '::1:80' for --tcp: expected HOST:PORT, [IPV6]:PORT or PORT",
        ),
        ("unix", "", "bad address for --unix: expected a socket path or @NAME"),
        ("unix", "/tmp/" + "x" * 103, "bad address for --unix: path is 108 bytes, longer than 107"),
    ],
)
def test_bad_addresses(transport: str, text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_address(transport, text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("name", "value", "parsed"),
    [
        ("output_limit", "64K", 65536),
        ("output_limit", "4M", 4 * 1024 * 1024),
        ("output_limit", "1g", 1 << 30),
        ("output_limit", "100", 100),
        ("max_connections", 5, 5),
        ("idle_timeout", "500ms", 0.5),
        ("idle_timeout", "5m", 300.0),
        ("idle_timeout", "1.5", 1.5),
        ("idle_timeout", "2h", 7200.0),
        ("idle_timeout", "off", None),
        ("idle_timeout", False, None),
        ("drain_timeout", 30, 30.0),
    ],
)
def test_limit_values(name: str, value: Any, parsed: Any) -> None:
    assert parse_limit(name, value) == parsed


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("output_limit", "1.5", "output_limit must be a whole number (4096, 64K, 4M), not '1.5'"),
        ("output_limit", 1.5, "output_limit must be a whole number, not 1.5"),
        ("output_limit", True, "output_limit must be a number, not True"),
        (
            "drain_timeout",
            "off",
            "drain_timeout must be a duration in seconds (30, 1.5, 500ms, 5m), not 'off'",
        ),
        (
            "idle_timeout",
            "soon",
            "idle_timeout must be a duration in seconds (30, 1.5, 500ms, 5m), not 'soon'",
        ),
    ],
)
def test_bad_limit_values(name: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_limit(name, value)
    assert str(info.value) == message


def test_service_options_and_limits_are_parsed_in_two_steps() -> None:
    plan = plan_from_args(
        [
            "--idle-timeout",
            "30",
            "echo",
            "--max-line",
            "100",
            "--tcp",
            "127.0.0.1:0",
            "--output-limit",
            "8M",
        ]
    )
    (sp,) = plan.services
    assert sp.target.label == "echo"
    assert sp.options == {"max_line": 100}
    assert sp.limits == {"idle_timeout": 30.0, "output_limit": 8 * 1024 * 1024}
    assert [str(ep) for ep in sp.endpoints] == ["tcp://127.0.0.1:0"]
    assert (plan.model, plan.workers, plan.trace, plan.admin) == ("multiplex", 1, False, None)


@pytest.mark.parametrize(
    ("name", "endpoint"),
    [
        ("echo", "tcp://127.0.0.1:7007"),
        ("chat", "tcp://127.0.0.1:7070"),
        ("syslog", "tcp://127.0.0.1:"),
    ],
)
def test_default_address_is_the_services_port_on_loopback(name: str, endpoint: str) -> None:
    (sp,) = plan_from_args([name]).services
    (ep,) = sp.endpoints
    assert str(ep).startswith(endpoint)


def test_service_help_lists_its_options_and_the_limits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "chat", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-nick MAX_NICK" in out
    assert "--idle-timeout N" in out
    assert "seconds without a byte in either direction" in out  # the Limits field's comment


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "nope"], "unknown machine 'nope'; ready services: "),
        (
            ["serve", "nosuchmodule:Thing"],
            "cannot import module 'nosuchmodule' for 'nosuchmodule:Thing'",
        ),
        (["serve", "statemux.admin:Nope"], "statemux.admin has no attribute 'Nope'"),
        (
            ["serve", "statemux.admin:COMMANDS"],
            "statemux.admin:COMMANDS is not a machine class, a machine factory or a Service",
        ),
        (["serve", "echo", "--tcp", "localhost"], "bad address 'localhost' for --tcp"),
        (
            ["serve", "echo", "--tcp", "127.0.0.1:0", "--model", "fibers"],
            "argument --model: invalid choice: 'fibers'",
        ),
        (["serve", "echo", "--bogus"], "statemux serve: unrecognized arguments: --bogus"),
        (["serve"], "nothing to serve: give NAME, module:Class or --config FILE"),
        (["serve", "echo", "--config", "x.toml"], "give NAME or --config, not both"),
        (["serve", "echo", "--idle-timeout", "0"], "idle_timeout must be positive, not 0.0"),
        (
            ["serve", "echo", "--output-limit", "1K"],
            "output_high_water (65536) must not exceed output_limit (1024)",
        ),
        (
            ["serve", "echo", "--idle-timeout", "soon"],
            "argument --idle-timeout: idle_timeout must be a duration",
        ),
        (
            ["serve", "echo", "--tcp", "127.0.0.1:0", "--max-line", "0"],
            "echo: max_line must be positive, not 0",
        ),
        (["serve", "echo", "--workers", "0"], "--workers must be at least 1, not 0"),
        (
            ["serve", "echo", "--workers", "2", "--model", "threading"],
            "cannot be combined with --model threading",
        ),
        (
            ["serve", "chat", "--udp", "127.0.0.1:0"],
            "chat speaks only stream transports (TCP, Unix stream); it cannot be served on udp://127.0.0.1:0",
        ),
        (
            ["serve", "chat", "--model", "forking", "--tcp", "127.0.0.1:0"],
            "the forking model cannot serve chat (Chat): it shares memory between connections (shares_memory = True)",
        ),
        (
            ["serve", "chat", "--model", "sync", "--tcp", "127.0.0.1:0"],
            "the sync model cannot serve chat (Chat): its connections wait for other connections (waits_for_peers = True)",
        ),
        (
            ["serve", "chat", "--workers", "2", "--tcp", "127.0.0.1:0"],
            "--workers 2 cannot serve chat (Chat): it shares memory between connections (shares_memory = True), and each forked worker has its own copy of memory",
        ),
        (
            ["serve", "echo", "--admin", "/tmp/" + "a" * 110],
            "bad address for --admin: path is 115 bytes, longer than 107",
        ),
        (["diagram", "chat", "--datagram"], "chat has no datagram machine"),
        (["diagram", "echo", "--format", "png"], "argument --format: invalid choice: 'png'"),
        (["table", "/nonexistent/admin.sock"], "no admin socket at /nonexistent/admin.sock"),
        (["table", "/tmp/x", "--watch", "0"], "--watch must be positive, not 0"),
        (["fly"], "argument COMMAND: invalid choice: 'fly'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("statemux: error: ")
    assert message in lines[0]


@pytest.mark.parametrize(
    ("model", "workers", "machine", "datagram", "message"),
    [
        ("multiplex", 1, "chat", False, None),
        ("threading", 1, "chat", False, None),
        ("multiplex", 4, "echo", False, None),
        ("forking", 1, "echo", True, None),
        ("forking", 1, "chat", False, "the forking model cannot serve x (Chat): it shares memory"),
        ("sync", 1, "chat", False, "the sync model cannot serve x (Chat): its connections wait"),
        ("multiplex", 3, "chat", False, "--workers 3 cannot serve x (Chat): it shares memory"),
        (
            "forking",
            1,
            "admin",
            True,
            "the forking model cannot serve x (Admin) on a datagram socket: it keeps per-peer "
            "state across datagrams (it has 2 states (waiting, replying))",
        ),
        (
            "multiplex",
            2,
            "admin",
            True,
            "--workers 2 cannot serve x (Admin) on a datagram socket: it keeps per-peer state",
        ),
    ],
)
def test_refusals(
    model: str, workers: int, machine: str, datagram: bool, message: str | None
) -> None:
    from statemachines.chat import Chat
    from statemachines.echo import DatagramEcho, Echo

    cls = {"chat": Chat, "echo": DatagramEcho if datagram else Echo, "admin": Admin}[machine]
    why = refusal(model, workers, cls, "x", datagram)
    if message is None:
        assert why is None
    else:
        assert why is not None and why.startswith(message)


def test_an_address_in_use_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "echo", "--tcp", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"statemux: error: cannot listen on tcp://127.0.0.1:{port}: address already in use\n"
    )


def test_the_first_bound_address_is_released_when_a_later_one_fails(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        assert (
            main(["serve", "echo", "--tcp", f"127.0.0.1:{free}", "--tcp", f"127.0.0.1:{port}"]) == 2
        )
    with socket.socket() as again:  # bindable again: the first server was closed
        again.bind(("127.0.0.1", free))
    assert "address already in use" in capsys.readouterr().err


def test_usage_error_from_the_real_command() -> None:
    done = run_cli("serve", "nope")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("statemux: error: unknown machine 'nope'")


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


# -- the config file ----------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "statemux.toml"
    path.write_text(text)
    return str(path)


def test_config_limits_file_then_command_line_then_service(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
model = "threading"
trace = true
admin = "/tmp/x.admin"
[limits]
idle_timeout = 10
output_limit = "8M"
[[service]]
name = "echo"
tcp = ["127.0.0.1:0", "[::1]:0"]
unix = "/tmp/e.sock"
max_line = 100
limits = { idle_timeout = "30s" }
[[service]]
name = "chat"
tcp = "127.0.0.1:0"
max-nick = "8"
""",
    )
    plan = plan_from_args(["--config", path, "--idle-timeout", "20", "--workers", "1"])
    echo, chat = plan.services
    assert (plan.model, plan.trace, plan.admin, plan.workers) == (
        "threading",
        True,
        "/tmp/x.admin",
        1,
    )
    assert echo.limits == {"idle_timeout": 30.0, "output_limit": 8 << 20}
    assert chat.limits == {"idle_timeout": 20.0, "output_limit": 8 << 20}
    assert echo.options == {"max_line": 100}
    assert chat.options == {"max_nick": 8}
    assert [str(ep) for ep in echo.endpoints] == [
        "tcp://127.0.0.1:0",
        "tcp://[::1]:0",
        "unix:/tmp/e.sock",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('colour = 1\n[[service]]\nname = "echo"', "unknown key 'colour'; top-level keys: "),
        (
            'model = "fibers"\n[[service]]\nname = "echo"',
            "model must be one of multiplex, threading, forking, sync, not 'fibers'",
        ),
        ('workers = "2"\n[[service]]\nname = "echo"', "workers must be a whole number, not '2'"),
        ('model = "multiplex"', "no [[service]] entries"),
        (
            '[[service]]\ntcp = "127.0.0.1:0"',
            '[[service]] #1: give exactly one of name = "NAME" or machine = "module:Class"',
        ),
        ('[[service]]\nname = "echo"\nmachine = "x:Y"', "give exactly one of name"),
        ('[[service]]\nname = "nope"', "unknown machine 'nope'"),
        (
            '[[service]]\nname = "echo"\nmax_lines = 5',
            "[[service]] #1 (echo): unknown option 'max_lines'; echo options: max_line",
        ),
        (
            '[[service]]\nname = "echo"\nmax_line = "many"',
            "[[service]] #1 (echo): bad value 'many' for max_line",
        ),
        (
            '[[service]]\nname = "echo"\ntcp = "nope"',
            "[[service]] #1 (echo): bad address 'nope' for --tcp",
        ),
        (
            '[[service]]\nname = "echo"\ntcp = 80',
            "[[service]] #1 (echo): tcp must be an address string or a list of them",
        ),
        (
            '[limits]\nidle = 5\n[[service]]\nname = "echo"',
            "[limits]: unknown limit 'idle'; limits: ",
        ),
        (
            '[limits]\nidle_timeout = "soon"\n[[service]]\nname = "echo"',
            "[limits]: idle_timeout must be a duration",
        ),
        (
            '[[service]]\nname = "echo"\nlimits = { output_limit = 0 }',
            "[[service]] #1 (echo): output_limit must be positive, not 0",
        ),
        (
            "[[service]\nname = 'echo'",
            "Expected ']]' at the end of an array declaration (at line 1",
        ),
    ],
)
def test_config_errors(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, text)
    assert main(["serve", "--config", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"statemux: error: {path}") or "unknown machine" in err
    assert message in err


def test_config_file_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", "/nonexistent/statemux.toml"]) == 2
    assert capsys.readouterr().err == (
        "statemux: error: cannot read /nonexistent/statemux.toml: No such file or directory\n"
    )


def test_the_demo_config_lists_the_four_services_and_each_builds() -> None:
    plan = load_config(str(ROOT / "statemux.toml"))
    assert [sp.target.label for sp in plan.services] == ["http", "resp", "chat", "echo"]
    assert plan.model == "multiplex" and plan.workers == 1
    for sp in plan.services:
        for ep in sp.endpoints:
            assert ep.family == socket.AF_INET and ep.address[0] == "127.0.0.1"
            assert sp.target.service.build(datagram=ep.datagram, **sp.options) is not None
    assert plan.services[0].options == {"root": "docs"}


# -- diagram ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["echo"],
            ["stateDiagram-v2", "[*] --> echoing", "echoing --> echoing : frame / echo"],
        ),
        (["echo", "--format", "mermaid"], ["stateDiagram-v2"]),
        (["echo", "--format", "dot"], ['digraph "Echo" {', '"echoing" -> "done"']),
        (
            ["echo", "--format", "table"],
            ["| state | waits for | timeout | notes |", "| echoing | frame | echo | echoing |"],
        ),
        (["echo", "--datagram", "--format", "table"], ["| echoing | datagram"]),
        (["chat", "--format", "table"], ["| naming | frame | choose_nick | outside |"]),
        (
            ["statemux.admin:Admin", "--format", "table"],
            ["| replying | drained | next_piece | waiting |"],
        ),
    ],
)
def test_diagram(argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagram", *argv]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


# -- serving ------------------------------------------------------------------------------------


#: A reply larger than loopback's kernel buffers can hold (tcp_wmem's maximum is 4 MiB by
#: default), so at the signal most of it still waits in the server's output buffer.
BIG = 24 << 20
BIG_LIMITS = ("--max-line", str(32 << 20), "--output-limit", "64M")


def send_big_line_unread(srv: Served, ch: bytes) -> socket.socket:
    """Connect with a tiny receive window, send one BIG line, wait until the server took it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(BOUND)
    sock.connect(srv.inet("echo"))
    sender = threading.Thread(target=sock.sendall, args=(ch * BIG + b"\n",))
    sender.start()
    srv.expect(r"echoing --frame--> echoing", "err")  # traced after the handler: reply queued
    sender.join(BOUND)
    return sock


def test_serve_echo_and_sigterm_drains_a_reply_queued_before_it(serve: Any) -> None:
    srv = serve("serve", "echo", "--tcp", "127.0.0.1:0", "--trace", *BIG_LIMITS).ready()
    assert converse(srv.inet("echo"), b"hello\n", 6) == b"hello\n"
    srv.expect(r"#1 echoing --frame--> echoing", "err")
    with send_big_line_unread(srv, b"x") as sock:
        srv.proc.send_signal(signal.SIGTERM)
        srv.expect(r"statemux: SIGTERM: draining open connections \(up to 5s\)", "err")
        with pytest.raises(ConnectionRefusedError):  # while draining, new clients are refused
            socket.create_connection(srv.inet("echo"), timeout=BOUND).close()
        reply = read_to_eof(sock)
    assert len(reply) == BIG + 1 and reply == b"x" * BIG + b"\n"
    assert srv.proc.wait(BOUND) == 0
    assert srv.rest("err")[-1] == "statemux: stopped"


def test_second_signal_forces_the_exit(serve: Any) -> None:
    srv = serve(
        "serve", "echo", "--tcp", "127.0.0.1:0", "--trace", "--drain-timeout", "120", *BIG_LIMITS
    ).ready()
    with send_big_line_unread(srv, b"y"):
        srv.proc.send_signal(signal.SIGINT)
        srv.expect(
            r"SIGINT: draining open connections \(up to 120s\); send it again to force", "err"
        )
        started = time.monotonic()
        assert srv.stop(signal.SIGINT) == 130  # the client never reads: only force ends this
        assert time.monotonic() - started < BOUND
    assert srv.rest("err")[-1] == "statemux: forced exit; 1 connection(s) cut off"


@pytest.mark.parametrize("model", ["multiplex", "threading", "forking", "sync"])
def test_every_model_serves_and_stops_on_sigterm(serve: Any, model: str) -> None:
    srv = serve("serve", "echo", "--model", model, "--tcp", "127.0.0.1:0").ready()
    assert f"{model} model" in srv.seen["out"][-1]
    assert converse(srv.inet("echo"), b"one\ntwo\n", 8) == b"one\ntwo\n"
    assert srv.stop() == 0


def test_several_transports_in_one_loop(serve: Any, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "e.sock")
    dpath = os.path.join(short_tmp, "d.sock")
    srv = serve(
        "serve",
        "echo",
        "--tcp",
        "127.0.0.1:0",
        "--unix",
        path,
        "--udp",
        "127.0.0.1:0",
        "--unix-dgram",
        dpath,
    ).ready()
    assert {(n, s) for n, s, _ in srv.listening} == {
        ("echo", "tcp"),
        ("echo", "unix"),
        ("echo", "udp"),
        ("echo", "unix-dgram"),
    }
    assert any(f"nc -U {path}" in line for line in srv.seen["out"])
    assert converse(srv.inet("echo"), b"tcp\n", 4) == b"tcp\n"
    assert converse(path, b"unix\n", 5, socket.AF_UNIX) == b"unix\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(BOUND)
        udp.sendto(b"datagram", srv.inet("echo", "udp"))
        assert udp.recv(100) == b"datagram"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ud:
        ud.bind(os.path.join(short_tmp, "c.sock"))
        ud.settimeout(BOUND)
        ud.sendto(b"unix datagram", dpath)
        assert ud.recv(100) == b"unix datagram"
    assert srv.stop() == 0
    assert not os.path.exists(path) and not os.path.exists(dpath)  # socket files removed


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_address(serve: Any) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured")
    srv = serve("serve", "http", "--tcp", "[::1]:0", "--root", str(ROOT / "docs")).ready()
    host, port = srv.inet("http")
    assert host == "::1"
    assert any(f"curl -v http://[::1]:{port}/" in line for line in srv.seen["out"])
    reply = converse(
        ("::1", port),
        b"GET /_status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        12,
        socket.AF_INET6,
    )
    assert reply.startswith(b"HTTP/1.1 200")
    assert srv.stop() == 0


def test_config_serves_two_services_in_one_loop(serve: Any, short_tmp: str) -> None:
    unix = os.path.join(short_tmp, "chat.sock")
    path = os.path.join(short_tmp, "statemux.toml")
    Path(path).write_text(
        f"""
[[service]]
name = "echo"
tcp = "127.0.0.1:0"
max_line = 8
[[service]]
name = "chat"
tcp = "127.0.0.1:0"
unix = "{unix}"
"""
    )
    srv = serve("serve", "--config", path).ready()
    assert "ready: 3 address(es), multiplex model" in srv.seen["out"][-1]
    assert converse(srv.inet("echo"), b"short\n", 6) == b"short\n"
    # the service option from the file is in force: a 9-byte line is refused
    assert converse(srv.inet("echo"), b"123456789\n", 100) == b"ERR line longer than 8 bytes\n"
    # one chat on two addresses: a member on TCP hears a member on the Unix socket
    with (
        socket.create_connection(srv.inet("chat"), timeout=BOUND) as a,
        socket.socket(socket.AF_UNIX) as b,
    ):
        b.settimeout(BOUND)
        b.connect(unix)
        a_file, b_file = a.makefile("rb"), b.makefile("rb")
        assert a_file.readline().startswith(b"* welcome")
        assert b_file.readline().startswith(b"* welcome")
        a.sendall(b"ann\n/join lobby\n")
        assert a_file.readline().startswith(b"* hello ann")
        assert a_file.readline() == b"* you joined lobby; members: ann\r\n"
        b.sendall(b"bob\n/join lobby\nhi ann\n")
        assert a_file.readline() == b"* bob joined lobby\r\n"
        assert a_file.readline() == b"<bob> hi ann\r\n"
        a_file.close()
        b_file.close()
    assert srv.stop() == 0


def test_workers_share_the_socket_and_are_supervised(serve: Any, short_tmp: str) -> None:
    admin = os.path.join(short_tmp, "admin")
    srv = serve("serve", "echo", "--tcp", "127.0.0.1:0", "--workers", "2", "--admin", admin).ready()
    pids = {}
    for line in srv.seen["out"]:
        m = re.search(r"worker (\d) started \(pid (\d+)\)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
    assert sorted(pids) == [1, 2] and len(set(pids.values())) == 2
    assert "2 workers" in srv.seen["out"][-1]
    address = srv.inet("echo")
    held = [socket.create_connection(address, timeout=BOUND) for _ in range(6)]
    try:
        for i, sock in enumerate(held):
            sock.sendall(b"%d\n" % i)
            assert read_exactly(sock, 2) == b"%d\n" % i
        # every held connection is in the table of exactly one worker
        rows = []
        for n in (1, 2):
            done = run_cli("table", f"{admin}.{n}", "--json")
            assert done.returncode == 0, done.stderr
            rows += [json.loads(line) for line in done.stdout.splitlines()]
        assert sorted(r["peer"] for r in rows) == sorted(peer_text(s.getsockname()) for s in held)
    finally:
        for sock in held:
            sock.close()
    # a worker that dies is replaced
    os.kill(pids[1], signal.SIGKILL)
    m = srv.expect(
        rf"worker 1 \(pid {pids[1]}\) was killed by SIGKILL; restarted as pid (\d+)", "err"
    )
    replacement = int(m.group(1))
    for _ in range(4):
        assert converse(address, b"still\n", 6) == b"still\n"
    assert srv.stop() == 0
    for pid in (pids[2], replacement):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not os.path.exists(f"{admin}.1") and not os.path.exists(f"{admin}.2")


# -- the admin socket and `statemux table` ------------------------------------------------------


def test_live_table_shows_a_connected_client(serve: Any, short_tmp: str) -> None:
    admin = os.path.join(short_tmp, "admin.sock")
    srv = serve("serve", "echo", "--tcp", "127.0.0.1:0", "--admin", admin).ready()
    assert os.stat(admin).st_mode & 0o777 == 0o600
    with socket.create_connection(srv.inet("echo"), timeout=BOUND) as client:
        client.sendall(b"hello\n")
        assert read_exactly(client, 6) == b"hello\n"
        client.sendall(b"partial")  # half a request: buffered, waiting for its newline
        peer = peer_text(client.getsockname())

        done = run_cli("table", admin, "--json")
        assert done.returncode == 0, done.stderr
        (row,) = [json.loads(line) for line in done.stdout.splitlines()]
        assert row["service"] == "echo" and row["peer"] == peer
        assert row["listen"] == "tcp://{}:{}".format(*srv.inet("echo"))
        assert (row["machine"], row["state"]) == ("Echo", "echoing")
        assert (row["bytes_in"], row["bytes_out"], row["buffered_in"], row["buffered_out"]) == (
            13,
            6,
            7,
            0,
        )
        assert row["closing"] is None and row["age"] >= 0

        done = run_cli("table", admin)
        header, line = done.stdout.splitlines()
        assert header.split() == [
            "SERVICE",
            "ID",
            "PEER",
            "STATE",
            "AGE",
            "IN",
            "OUT",
            "BUF-IN",
            "BUF-OUT",
            "CLOSING",
        ]
        assert line.split()[:4] == ["echo", "1", peer, "echoing"]
        assert line.split()[5:] == ["13", "6", "7", "0"]

        done = run_cli("table", admin, "--watch", "0.05", "--count", "2")
        assert done.stdout.count(peer) == 2

        done = run_cli("table", admin, "--stats")
        assert done.stdout.splitlines()[0] == f"echo on {row['listen']}: 1 open; closed: none yet"
        assert re.search(r"Echo\s+echoing\s+frame\s+echoing\s+1$", done.stdout, re.MULTILINE)
    assert srv.stop() == 0
    assert not os.path.exists(admin)


# -- the admin machine, in memory ------------------------------------------------------------------


def fake_server(rows: int, port: int = 7007) -> Any:
    stats = Stats()
    stats.close_reasons[CloseReason.NORMAL] += 3
    infos = [
        ConnectionInfo(i, ("127.0.0.1", 40000 + i), "Echo", "echoing", 1.5, 10, 20, 1, 2, None)
        for i in range(1, rows + 1)
    ]
    return SimpleNamespace(
        socket=SimpleNamespace(family=socket.AF_INET, type=socket.SOCK_STREAM),
        server_address=("127.0.0.1", port),
        connections=infos,
        stats=stats,
    )


def admin_sim(rows: int) -> Simulator:
    view = AdminView()
    view.add("echo", fake_server(rows))
    return Simulator(functools.partial(Admin, view))


def replies(data: bytes) -> list[list[dict[str, Any]]]:
    """Split admin output into replies (each ends with an empty line)."""
    out: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for line in data.decode().split("\n")[:-1]:
        if line:
            current.append(json.loads(line))
        else:
            out.append(current)
            current = []
    assert not current, "reply without its terminating empty line"
    return out


@pytest.mark.parametrize("chunks", list(chunkings(b"table\r\n\nstats\nhelp\n")))
def test_admin_commands_at_every_split(chunks: list[bytes]) -> None:
    sim = admin_sim(2)
    conn = sim.connect()
    out = bytearray()
    for chunk in chunks:
        conn.send(chunk)
        out += conn.received()
    table, stats, help_ = replies(bytes(out))
    assert [r["peer"] for r in table] == ["127.0.0.1:40001", "127.0.0.1:40002"]
    assert table[0] == {
        "service": "echo",
        "listen": "tcp://127.0.0.1:7007",
        "id": 1,
        "peer": "127.0.0.1:40001",
        "machine": "Echo",
        "state": "echoing",
        "age": 1.5,
        "bytes_in": 10,
        "bytes_out": 20,
        "buffered_in": 1,
        "buffered_out": 2,
        "closing": None,
    }
    assert stats == [
        {
            "service": "echo",
            "listen": "tcp://127.0.0.1:7007",
            "connections": 2,
            "close_reasons": {"normal": 3},
            "transitions": [],
        }
    ]
    assert help_ == [{"commands": ["table", "stats", "help"]}]
    assert conn.state_name == "waiting"


def test_admin_sends_a_large_table_a_piece_at_a_time() -> None:
    rows = ROWS_PER_PIECE * 4 + 5
    sim = admin_sim(rows)
    conn = sim.connect()
    conn.stop_reading(0)
    conn.send(b"table\n")
    first = conn.buffered  # the peer reads nothing: only the first piece was sent
    assert conn.state_name == "replying"
    conn.resume_reading()
    data = conn.received()
    (table,) = replies(data)
    assert [r["id"] for r in table] == list(range(1, rows + 1))
    assert 0 < first < len(data) * 0.3
    assert conn.state_name == "waiting"


def test_admin_commands_wait_their_turn_then_overflow_closes() -> None:
    sim = admin_sim(ROWS_PER_PIECE * 2)
    conn = sim.connect()
    conn.stop_reading(0)
    conn.send(b"table\n" + b"help\n" * MAX_PENDING)
    assert not conn.closed
    conn.send(b"help\n")  # one more than may wait
    conn.resume_reading()
    (cut_short,) = replies(conn.received())
    # the piece already sent, then the error ends the reply and the connection
    assert len(cut_short) == ROWS_PER_PIECE + 1
    assert cut_short[-1] == {"error": f"more than {MAX_PENDING} commands waiting for a reply"}
    assert conn.closed and conn.close_reason is CloseReason.NORMAL


def test_admin_answers_everything_owed_when_the_peer_finishes_sending() -> None:
    rows = ROWS_PER_PIECE * 2 + 1
    sim = admin_sim(rows)
    conn = sim.connect()
    conn.stop_reading(0)
    conn.send(b"table\nhelp\n")
    conn.send_eof()
    conn.resume_reading()
    table, help_ = replies(conn.received())
    assert len(table) == rows and help_ == [{"commands": ["table", "stats", "help"]}]
    assert conn.closed


@pytest.mark.parametrize(
    ("data", "reply", "closes"),
    [
        (b"tables\n", {"error": "unknown command 'tables'; commands: table, stats, help"}, False),
        (
            b"x" * (MAX_COMMAND + 1) + b"\n",
            {"error": f"command longer than {MAX_COMMAND} bytes"},
            True,
        ),
        (b"x" * (MAX_COMMAND * 2), {"error": f"command longer than {MAX_COMMAND} bytes"}, True),
    ],
)
def test_admin_errors(data: bytes, reply: dict[str, str], closes: bool) -> None:
    sim = admin_sim(1)
    conn = sim.connect()
    conn.send(data)
    assert replies(conn.received()) == [[reply]]
    assert conn.closed is closes


def test_admin_ignores_blank_lines_and_an_empty_table_is_one_empty_line() -> None:
    sim = admin_sim(0)
    conn = sim.connect()
    conn.send(b"\n\r\n")
    assert conn.received() == b""
    conn.send(b"table\n")
    assert conn.received() == b"\n"


@pytest.mark.parametrize(
    ("peer", "text"),
    [
        (("127.0.0.1", 5), "127.0.0.1:5"),
        (("::1", 5, 0, 0), "[::1]:5"),
        ("", "-"),
        (None, "-"),
        ("/tmp/c.sock", "/tmp/c.sock"),
        ("\0abstract", "@abstract"),
        (b"/tmp/b.sock", "/tmp/b.sock"),
    ],
)
def test_peer_text(peer: Any, text: str) -> None:
    assert peer_text(peer) == text


@pytest.mark.parametrize(
    ("family", "kind", "address", "url"),
    [
        (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 80), "tcp://127.0.0.1:80"),
        (socket.AF_INET6, socket.SOCK_DGRAM, ("::1", 514, 0, 0), "udp://[::1]:514"),
        (socket.AF_UNIX, socket.SOCK_STREAM, "/tmp/a.sock", "unix:/tmp/a.sock"),
        (socket.AF_UNIX, socket.SOCK_DGRAM, "\0log", "unix-dgram:@log"),
    ],
)
def test_listen_url(family: int, kind: int, address: Any, url: str) -> None:
    server = SimpleNamespace(
        socket=SimpleNamespace(family=family, type=kind), server_address=address
    )
    assert listen_url(server) == url


def test_format_table_aligns_numbers_right() -> None:
    row = {
        "service": "echo",
        "id": 12,
        "peer": "127.0.0.1:5",
        "state": "echoing",
        "age": 75.0,
        "bytes_in": 1,
        "bytes_out": 123456,
        "buffered_in": 0,
        "buffered_out": 0,
        "closing": "shutdown",
    }
    header, line = format_table([row]).splitlines()
    assert line.split() == [
        "echo",
        "12",
        "127.0.0.1:5",
        "echoing",
        "1m15s",
        "1",
        "123456",
        "0",
        "0",
        "shutdown",
    ]
    assert header.index("OUT") + len("OUT") == line.index("123456") + len("123456")
    assert format_table([]).splitlines()[1] == "(no open connections)"


# -- docs and the bench hook ----------------------------------------------------------------------


def test_operations_guide_documents_every_limit() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    for field in attrs.fields(Limits):
        assert f"`--{field.name.replace('_', '-')}`" in text, field.name


def test_make_run_serves_the_demo_config() -> None:
    makefile = (ROOT / "Makefile").read_text()
    (recipe,) = re.findall(r"^run:.*\n\t(.*)$", makefile, re.MULTILINE)
    assert recipe.endswith("-m statemux serve --config statemux.toml")


def test_bench_is_handed_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def bench_main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    monkeypatch.setitem(sys.modules, "statemux.bench", SimpleNamespace(main=bench_main))
    assert main(["bench", "--models", "multiplex", "-v"]) == 3
    assert seen == [["--models", "multiplex", "-v"]]
