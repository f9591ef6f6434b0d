"""Fallback workload machines: a minimal HTTP/1.1 keep-alive GET server and a minimal RESP
PING/SET/GET server, used only when ``statemachines/http.py`` or ``statemachines/resp.py``
cannot be imported.

They are deliberately as small as the hand-written baselines in :mod:`.baselines`: one frame
per request (the whole request head, or one whole RESP command), one handler call per request,
replies built from pre-encoded constants. Nothing outside the benchmark should use them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attrs

from statemux import Frame, FrameTooLong, Machine, ProtocolError, State
from statemux.framing import Framing, ReceiveBuffer

__all__ = [
    "BenchHttp",
    "BenchResp",
    "RequestHead",
    "RespCommand",
    "http_factory",
    "resp_factory",
    "MAX_HEAD",
    "MAX_RESP_LINE",
]

#: Longest request head (request line and headers) the fallback HTTP machine accepts.
MAX_HEAD = 16 * 1024
#: Longest RESP header or inline line, and largest bulk argument, of the fallback RESP machine.
MAX_RESP_LINE = 64 * 1024

_NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nContent-Type: text/plain\r\n\r\nnot found\n"
)
_BAD_METHOD = (
    b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 19\r\nAllow: GET\r\n"
    b"Content-Type: text/plain\r\nConnection: close\r\n\r\nmethod not allowed\n"
)
_TOO_LONG = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)


def http_response(body: bytes, content_type: bytes = b"text/plain") -> bytes:
    """The whole keep-alive 200 response for ``body`` (built once per file)."""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: %s\r\n\r\n"
        % (len(body), content_type)
    ) + body


def wants_close(head: bytes) -> bool:
    """True when the request head asks to close (``Connection: close``, or HTTP/1.0)."""
    if b"onnection: close" in head or b"ONNECTION: close" in head:
        return True
    line_end = head.find(b"\r\n")
    return head[line_end - 8 : line_end] == b"HTTP/1.0"


class RequestHead(Framing):
    """The request line and headers, up to and including the blank line (bodies are not
    supported: the workload is GET)."""

    __slots__ = ("max_size",)

    def __init__(self, max_size: int = MAX_HEAD) -> None:
        self.max_size = max_size

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> bytes | None:
        data = buffer.data
        i = data.find(b"\r\n\r\n", buffer.scan)
        if i < 0:
            n = len(data)
            if n > self.max_size:
                raise FrameTooLong("request head", self.max_size, n)
            buffer.scan = n - 3 if n > 3 else 0
            return None
        end = i + 4
        if end > self.max_size:
            raise FrameTooLong("request head", self.max_size, end)
        head = bytes(data[:end])
        del data[:end]
        buffer.scan = 0
        return head

    def describe(self) -> str:
        return f"request head ≤ {self.max_size} B"


@attrs.define
class BenchHttp(Machine):
    """GET of files held in memory (``files``: path -> whole response), keep-alive."""

    files: dict[bytes, bytes]

    reading = State(RequestHead(), initial=True, doc="waiting for a request head")
    done = State(final=True, doc="flushing the last response")

    @reading.on(Frame, to=(reading, done))
    def request(self, head: bytes) -> State:
        sp = head.find(b" ")
        sp2 = head.find(b" ", sp + 1)
        if head[:sp] != b"GET":
            self.send(_BAD_METHOD)
            return BenchHttp.done
        self.send(self.files.get(head[sp + 1 : sp2], _NOT_FOUND))
        return BenchHttp.done if wants_close(head) else BenchHttp.reading

    @reading.on(FrameTooLong, to=done)
    def too_long(self, exc: FrameTooLong) -> None:
        self.send(_TOO_LONG)


def http_factory(root: str) -> Callable[[], Machine]:
    """A factory serving every regular file directly under ``root`` (read once, here)."""
    return functools.partial(BenchHttp, files=load_files(root))


def load_files(root: str) -> dict[bytes, bytes]:
    """``{b"/name": whole 200 response}`` for the regular files directly under ``root``."""
    import os

    files = {}
    for entry in os.scandir(root):
        if entry.is_file():
            with open(entry.path, "rb") as f:
                files[b"/" + entry.name.encode()] = http_response(f.read())
    return files


class RespCommand(Framing):
    """One whole RESP command (``*N`` multibulk, or an inline line) as a list of arguments."""

    __slots__ = ("max_size",)

    def __init__(self, max_size: int = MAX_RESP_LINE) -> None:
        self.max_size = max_size

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> list[bytes] | None:
        data = buffer.data
        if not data:
            return None
        eol = data.find(b"\r\n")
        if eol < 0:
            if len(data) > self.max_size:
                raise FrameTooLong("RESP line", self.max_size, len(data))
            return None
        if data[0] != 42:  # not '*': an inline command
            args = bytes(data[:eol]).split()
            del data[: eol + 2]
            return args
        try:
            count = int(data[1:eol])
        except ValueError:
            raise ProtocolError("invalid multibulk length", b"-ERR Protocol error\r\n") from None
        pos = eol + 2
        args = []
        for _ in range(count):
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                return None
            if data[pos] != 36:  # '$'
                raise ProtocolError("expected '$'", b"-ERR Protocol error: expected '$'\r\n")
            try:
                size = int(data[pos + 1 : eol])
            except ValueError:
                raise ProtocolError("invalid bulk length", b"-ERR Protocol error\r\n") from None
            if size > self.max_size:
                raise FrameTooLong("RESP bulk", self.max_size, size)
            start = eol + 2
            pos = start + size + 2
            if pos > len(data):
                return None
            args.append(bytes(data[start : start + size]))
        del data[:pos]
        return args

    def describe(self) -> str:
        return "one RESP command"


@attrs.define
class BenchResp(Machine):
    """PING, SET key value, GET key over a dict shared by every connection."""

    shares_memory = True

    store: dict[bytes, bytes]

    serving = State(RespCommand(), initial=True, doc="waiting for a command")
    done = State(final=True, doc="flushing the error reply")

    @serving.on(Frame, to=serving)
    def command(self, args: list[bytes]) -> None:
        if not args:
            return
        name = args[0].upper()
        if name == b"GET" and len(args) == 2:
            value = self.store.get(args[1])
            self.send(b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value))
        elif name == b"SET" and len(args) == 3:
            self.store[args[1]] = args[2]
            self.send(b"+OK\r\n")
        elif name == b"PING" and len(args) == 1:
            self.send(b"+PONG\r\n")
        else:
            self.send(b"-ERR unknown command or wrong number of arguments\r\n")

    @serving.on(ProtocolError, to=done)
    def bad(self, exc: ProtocolError) -> None:
        self.send(exc.reply or b"-ERR Protocol error\r\n")

    @serving.on(FrameTooLong, to=done)
    def too_long(self, exc: FrameTooLong) -> None:
        self.send(b"-ERR Protocol error: %s\r\n" % str(exc).encode())


def resp_factory() -> Callable[[], Machine]:
    """A factory of :class:`BenchResp` machines sharing one new store."""
    return functools.partial(BenchResp, store={})
