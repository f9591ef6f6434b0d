"""Hand-written baseline servers of the benchmark workloads, each as small as the workload
allows, so the statemux figures have something honest to be compared with.

- :class:`AsyncioHttp` / :class:`AsyncioResp`: ``asyncio.Protocol`` servers (stdlib event loop,
  or uvloop's when installed). Every reply produced by one ``data_received`` goes out in one
  ``transport.write``, as statemux sends everything produced by one read in one system call.
- :class:`StreamHttp` / :class:`StreamResp`: ``socketserver.StreamRequestHandler`` subclasses for
  the stdlib ``ThreadingTCPServer``, reading with ``rfile.readline`` as ``http.server`` does and
  writing one reply per ``wfile.write``. Nagle is disabled (``disable_nagle_algorithm``) so a
  burst of small pipelined replies is not held back waiting for an ACK.

The parsers are the same minimal ones the fallback machines in :mod:`.machines` use: find the
blank line that ends a request head; cut one RESP command. Only the benchmark runs these.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import sys
from typing import Any

from .machines import _BAD_METHOD, _NOT_FOUND, _TOO_LONG, MAX_HEAD, MAX_RESP_LINE, wants_close

__all__ = [
    "AsyncioHttp",
    "AsyncioResp",
    "StreamHttp",
    "StreamResp",
    "BaselineThreadingServer",
    "http_reply",
    "resp_reply",
]


def http_reply(files: dict[bytes, bytes], head: bytes) -> tuple[bytes, bool]:
    """The response to one request head and whether the connection closes after it."""
    sp = head.find(b" ")
    if head[:sp] != b"GET":
        return _BAD_METHOD, True
    sp2 = head.find(b" ", sp + 1)
    return files.get(head[sp + 1 : sp2], _NOT_FOUND), wants_close(head)


def resp_reply(store: dict[bytes, bytes], args: list[bytes]) -> bytes:
    """The reply to one RESP command (PING, SET key value, GET key)."""
    if not args:
        return b""
    name = args[0].upper()
    if name == b"GET" and len(args) == 2:
        value = store.get(args[1])
        return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)
    if name == b"SET" and len(args) == 3:
        store[args[1]] = args[2]
        return b"+OK\r\n"
    if name == b"PING" and len(args) == 1:
        return b"+PONG\r\n"
    return b"-ERR unknown command or wrong number of arguments\r\n"


class AsyncioHttp(asyncio.Protocol):
    """HTTP/1.1 keep-alive GET of in-memory files."""

    __slots__ = ("files", "buf", "transport")

    def __init__(self, files: dict[bytes, bytes]) -> None:
        self.files = files
        self.buf = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out = []
        close = False
        while not close:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > MAX_HEAD:
                    out.append(_TOO_LONG)
                    close = True
                break
            head = bytes(buf[: i + 4])
            del buf[: i + 4]
            reply, close = http_reply(self.files, head)
            out.append(reply)
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            self.transport.close()


class AsyncioResp(asyncio.Protocol):
    """RESP PING/SET/GET over a shared dict."""

    __slots__ = ("store", "buf", "transport")

    def __init__(self, store: dict[bytes, bytes]) -> None:
        self.store = store
        self.buf = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out = []
        store = self.store
        while True:
            try:
                args = cut_command(buf)
            except ValueError:
                out.append(b"-ERR Protocol error\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            if args is None:
                break
            out.append(resp_reply(store, args))
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


def cut_command(buf: bytearray) -> list[bytes] | None:
    """Cut one whole RESP command from the front of ``buf`` (None: incomplete).
    Raises ValueError on malformed or oversized input."""
    if not buf:
        return None
    eol = buf.find(b"\r\n")
    if eol < 0:
        if len(buf) > MAX_RESP_LINE:
            raise ValueError("line too long")
        return None
    if buf[0] != 42:  # inline command
        args = bytes(buf[:eol]).split()
        del buf[: eol + 2]
        return args
    count = int(buf[1:eol])
    pos = eol + 2
    args = []
    for _ in range(count):
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        if buf[pos] != 36:
            raise ValueError("expected '$'")
        size = int(buf[pos + 1 : eol])
        if size > MAX_RESP_LINE:
            raise ValueError("bulk too long")
        start = eol + 2
        pos = start + size + 2
        if pos > len(buf):
            return None
        args.append(bytes(buf[start : start + size]))
    del buf[:pos]
    return args


class BaselineThreadingServer(socketserver.ThreadingTCPServer):
    """The stdlib ``ThreadingTCPServer`` with a listen backlog as deep as the statemux servers'
    (the default of 5 drops connection bursts) and daemon threads so the process can exit."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = socket.SOMAXCONN

    def __init__(self, address: Any, handler: Any, shared: Any) -> None:
        self.shared = shared
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client resetting its connection (load generators do at the end of a run) is not
        an error worth a traceback; anything else is printed as the stdlib does."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class StreamHttp(socketserver.StreamRequestHandler):
    """HTTP/1.1 keep-alive GET, read line by line as ``http.server`` does."""

    disable_nagle_algorithm = True

    def handle(self) -> None:
        rfile = self.rfile
        wfile = self.wfile
        files = self.server.shared  # type: ignore[attr-defined]
        while True:
            line = rfile.readline(MAX_HEAD + 1)
            if not line:
                return
            head = [line]
            size = len(line)
            while True:
                header = rfile.readline(MAX_HEAD + 1)
                size += len(header)
                if size > MAX_HEAD:
                    wfile.write(_TOO_LONG)
                    return
                if not header:
                    return
                head.append(header)
                if header == b"\r\n":
                    break
            reply, close = http_reply(files, b"".join(head))
            wfile.write(reply)
            if close:
                return


class StreamResp(socketserver.StreamRequestHandler):
    """RESP PING/SET/GET, one ``readline``/``read`` per line or argument."""

    disable_nagle_algorithm = True

    def handle(self) -> None:
        rfile = self.rfile
        wfile = self.wfile
        store = self.server.shared  # type: ignore[attr-defined]
        while True:
            line = rfile.readline(MAX_RESP_LINE + 2)
            if not line:
                return
            try:
                if line[0] == 42:
                    args = []
                    for _ in range(int(line[1:])):
                        header = rfile.readline(MAX_RESP_LINE + 2)
                        size = int(header[1:])
                        if header[0] != 36 or size > MAX_RESP_LINE:
                            raise ValueError("bad bulk header")
                        args.append(rfile.read(size + 2)[:-2])
                else:
                    args = line.split()
            except (ValueError, IndexError):
                wfile.write(b"-ERR Protocol error\r\n")
                return
            wfile.write(resp_reply(store, args))
