"""The syslog receiver behind real sockets, fed by real clients: util-linux ``logger`` over Unix
datagram, UDP, TCP and Unix stream sockets, Python's ``SysLogHandler``, and raw sockets."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from statemachines.syslog import MAX_DATAGRAM, SyslogSink, build
from statemux import (
    ForkingTCPServer,
    ForkingUDPServer,
    ForkingUnixDatagramServer,
    ForkingUnixStreamServer,
    MultiplexingTCPServer,
    MultiplexingUDPServer,
    MultiplexingUnixDatagramServer,
    MultiplexingUnixStreamServer,
    TCPServer,
    ThreadingTCPServer,
    ThreadingUDPServer,
    ThreadingUnixDatagramServer,
    ThreadingUnixStreamServer,
    UDPServer,
    UnixDatagramServer,
    UnixStreamServer,
)
from statemux.testing import serving

pytestmark = pytest.mark.skipif(shutil.which("logger") is None, reason="util-linux logger needed")

TAG = "smxtest"
HOST = socket.gethostname()


class WatchedSink(SyslogSink):
    """A sink that tells waiting tests when records were written (no polling, no sleeping)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written = 0
        self.cond = threading.Condition()

    def write_line(self, line: bytes) -> None:
        super().write_line(line)
        with self.cond:
            self.written += 1
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.written >= n, timeout):
                raise AssertionError(f"{self.written} records written after {timeout}s, wanted {n}")


class Output:
    """The server's output file, read as JSON records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sink = WatchedSink(path)

    def records(self, n: int) -> list[dict[str, Any]]:
        self.sink.wait_for(n)
        lines = self.path.read_bytes().splitlines()
        assert len(lines) == n, lines
        return [json.loads(line) for line in lines]


@pytest.fixture
def output(short_tmp: str) -> Iterator[Output]:
    out = Output(Path(short_tmp) / "out.jsonl")
    yield out
    out.sink.close()


def logger(*args: str) -> int:
    """Run logger; return its pid (the PROCID it sends with ``-i``)."""
    proc = subprocess.Popen(["logger", *args], stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return proc.pid


@pytest.fixture
def unix_dgram(short_tmp: str, output: Output) -> Iterator[str]:
    path = os.path.join(short_tmp, "log")
    with MultiplexingUnixDatagramServer(path, build(datagram=True, sink=output.sink)) as srv:
        with serving(srv):
            yield path


@pytest.fixture
def udp(output: Output) -> Iterator[tuple[str, int]]:
    srv = MultiplexingUDPServer(("127.0.0.1", 0), build(datagram=True, sink=output.sink))
    with serving(srv) as address:
        yield address


def test_logger_unix_socket_local_form(unix_dgram: str, output: Output) -> None:
    pid = logger("-u", unix_dgram, "-t", TAG, "-i", "-p", "local3.warning", "hello local")
    (rec,) = output.records(1)
    assert rec["format"] == "local" and rec["peer"] is None
    assert (rec["pri"], rec["facility_name"], rec["severity_name"]) == (156, "local3", "warning")
    assert (rec["host"], rec["app"], rec["procid"]) == (None, TAG, str(pid))
    assert rec["message"] == "hello local" and "malformed" not in rec
    assert rec["time"] is not None and rec["time"].startswith(rec["received"][:4])


def test_logger_unix_socket_rfc5424(unix_dgram: str, output: Output) -> None:
    logger("-u", unix_dgram, "--rfc5424", "-t", TAG, "--msgid", "ID47", "--sd-id", "ex@32473",
           "--sd-param", 'k="v \\"q\\""', "hello 5424")  # fmt: skip
    (rec,) = output.records(1)
    assert rec["format"] == "rfc5424" and (rec["pri"], rec["severity_name"]) == (13, "notice")
    assert (rec["host"], rec["app"], rec["msgid"]) == (HOST, TAG, "ID47")
    assert rec["structured_data"]["ex@32473"] == {"k": 'v "q"'}
    assert set(rec["structured_data"]["timeQuality"]) == {"tzKnown", "isSynced"}
    assert rec["time"].endswith("+00:00") or rec["time"][-6] in "+-"
    assert rec["message"] == "hello 5424" and "malformed" not in rec


def test_logger_udp_rfc5424_by_default(udp: tuple[str, int], output: Output) -> None:
    host, port = udp
    logger("-d", "-n", host, "-P", str(port), "-t", TAG, "hello udp")
    (rec,) = output.records(1)
    assert rec["format"] == "rfc5424" and rec["peer"].startswith("127.0.0.1:")
    assert (rec["host"], rec["app"], rec["message"]) == (HOST, TAG, "hello udp")


def test_logger_udp_rfc3164(udp: tuple[str, int], output: Output) -> None:
    host, port = udp
    logger("-d", "-n", host, "-P", str(port), "--rfc3164", "-t", TAG, "-p", "mail.err", "hi")
    (rec,) = output.records(1)
    assert rec["format"] == "rfc3164" and HOST.startswith(rec["host"])
    assert (rec["facility_name"], rec["severity_name"]) == ("mail", "err")
    assert (rec["app"], rec["message"]) == (TAG, "hi")


def test_logger_udp_octet_counted(udp: tuple[str, int], output: Output) -> None:
    host, port = udp
    logger("-d", "-n", host, "-P", str(port), "--octet-count", "-t", TAG, "counted")
    (rec,) = output.records(1)
    assert rec["format"] == "rfc5424" and rec["message"] == "counted" and "malformed" not in rec


def test_logger_tcp_lines_and_octet_counting(output: Output) -> None:
    srv = MultiplexingTCPServer(("127.0.0.1", 0), build(sink=output.sink))
    with serving(srv) as (host, port):
        logger("-T", "-n", host, "-P", str(port), "-t", TAG, "over tcp")
        logger("-T", "-n", host, "-P", str(port), "--octet-count", "-t", TAG, "counted\nline")
        first, second = output.records(2)
    assert (first["format"], first["message"]) == ("rfc5424", "over tcp")
    assert (second["format"], second["message"]) == ("rfc5424", "counted\nline")
    assert first["peer"].startswith("127.0.0.1:")


def test_logger_unix_stream_socket(short_tmp: str, output: Output) -> None:
    """``logger -u`` on a stream socket sends the local form, one message per line."""
    path = os.path.join(short_tmp, "st")
    with MultiplexingUnixStreamServer(path, build(sink=output.sink)) as srv, serving(srv):
        logger("-u", path, "-t", TAG, "one")
        logger("-u", path, "-t", TAG, "--octet-count", "two")
        one, two = output.records(2)
    assert (one["format"], one["app"], one["message"]) == ("local", TAG, "one")
    assert (two["format"], two["app"], two["message"]) == ("local", TAG, "two")


def test_python_syslog_handler(udp: tuple[str, int], output: Output) -> None:
    handler = logging.handlers.SysLogHandler(address=udp, facility="local0")
    handler.ident = "pyapp: "
    log = logging.getLogger("smxtest.syslog.client")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("from python ✓")
    finally:
        log.removeHandler(handler)
        handler.close()
    (rec,) = output.records(1)
    assert (rec["format"], rec["facility_name"], rec["severity_name"]) == (
        "unstructured", "local0", "warning",
    )  # fmt: skip
    assert rec["message"] == "pyapp: from python ✓" and "malformed" not in rec


def test_malformed_datagrams_are_recorded(udp: tuple[str, int], output: Output) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data in (b"no pri at all", b"<200>too high", b"<13>bad \xff byte", b""):
            sock.sendto(data, udp)
        recs = output.records(4)
    assert [r["malformed"] for r in recs] == [
        "no PRI: the message does not start with '<'",
        "PRI 200 is out of range 0..191",
        "not UTF-8: byte 0xff at offset 8",
        "empty message",
    ]
    assert output.sink.counts()["malformed"] == 4


def test_oversized_unix_datagram_is_flagged(unix_dgram: str, output: Output) -> None:
    """The server reads one byte more than the framing allows and sees the datagram is too long."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_DATAGRAM)
        sock.sendto(b"<13>" + b"x" * (2 * MAX_DATAGRAM), unix_dgram)
        sock.sendto(b"<13>" + b"y" * 9000, unix_dgram)
        big, long = output.records(2)
    assert big["malformed"] == f"datagram longer than {MAX_DATAGRAM} bytes"
    assert big["truncated_from"] > MAX_DATAGRAM and big["message"] is None
    assert long["truncated_from"] == 9004 and long["message"] == "y" * (8192 - 4)
    assert output.sink.counts()["too_long"] == 2


# -- every concurrency model ------------------------------------------------------------------------
class PipeOutput:
    """A sink writing to a pipe, read here with a timeout: works when records are written by
    forked children, and waits on the descriptor rather than polling a file."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.sink = SyslogSink(self.w)
        self.buf = b""

    def records(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while self.buf.count(b"\n") < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise AssertionError(f"after {timeout}s only {self.buf!r}; wanted {n} records")
            self.buf += os.read(self.r, 65536)
        assert self.buf.count(b"\n") == n, self.buf
        return [json.loads(line) for line in self.buf.splitlines()]

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


MODELS = {
    "multiplex": (MultiplexingUDPServer, MultiplexingUnixDatagramServer, MultiplexingTCPServer,
                  MultiplexingUnixStreamServer),
    "threading": (ThreadingUDPServer, ThreadingUnixDatagramServer, ThreadingTCPServer,
                  ThreadingUnixStreamServer),
    "forking": (ForkingUDPServer, ForkingUnixDatagramServer, ForkingTCPServer,
                ForkingUnixStreamServer),
    "sync": (UDPServer, UnixDatagramServer, TCPServer, UnixStreamServer),
}  # fmt: skip
FAMILIES = ["udp", "unix-dgram", "tcp", "unix"]
# (logger options for the two messages, expected formats)
CLIENTS = {
    "udp": ((["-t", TAG], ["--rfc3164", "-t", TAG]), ("rfc5424", "rfc3164")),
    "unix-dgram": ((["-t", TAG], ["--rfc5424", "-t", TAG]), ("local", "rfc5424")),
    "tcp": ((["-t", TAG], ["--octet-count", "-t", TAG]), ("rfc5424", "rfc5424")),
    "unix": ((["-t", TAG], ["--octet-count", "-t", TAG]), ("local", "local")),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model", list(MODELS))
def test_logger_under_every_model(model: str, family: str, short_tmp: str) -> None:
    cls = MODELS[model][FAMILIES.index(family)]
    datagram = family in ("udp", "unix-dgram")
    out = PipeOutput()
    try:
        address: Any = (
            os.path.join(short_tmp, "s") if family.startswith("unix") else ("127.0.0.1", 0)
        )
        srv = cls(address, build(datagram=datagram, sink=out.sink))
        with serving(srv) as bound:
            if family.startswith("unix"):
                target = ["-u", bound]
            else:
                target = ["-d" if datagram else "-T", "-n", bound[0], "-P", str(bound[1])]
            (first_opts, second_opts), formats = CLIENTS[family]
            logger(*target, *first_opts, "first message")
            first = out.records(1)[0]
            logger(*target, *second_opts, "second message")
            second = out.records(2)[1]
    finally:
        out.close()
    assert (first["format"], second["format"]) == formats
    assert (first["app"], first["message"]) == (TAG, "first message")
    assert (second["app"], second["message"]) == (TAG, "second message")
    assert "malformed" not in first and "malformed" not in second
