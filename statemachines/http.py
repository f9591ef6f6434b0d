"""HTTP/1.1 server: static files from a root directory, ``/echo`` and ``/_status``.

One connection is one :class:`HTTP` machine. Its states are named after what the connection
waits for: a whole request head (request line and header fields, cut in one pass by
:class:`RequestHead`), a Content-Length body, a chunk-size line, chunk data, a trailer line, or
room in the output buffer while a large file is sent piece by piece.

* Persistent connections and pipelining: buffered requests are answered in order. HTTP/1.1
  keeps the connection unless ``Connection: close``; HTTP/1.0 closes unless
  ``Connection: keep-alive``. ``max_requests_per_connection`` bounds one connection.
* Request bodies by ``Content-Length`` or ``Transfer-Encoding: chunked`` (trailers are read and
  dropped); ``Expect: 100-continue`` gets ``100 Continue`` before the body is read, or the final
  answer at once (then the connection closes) when the request would be refused anyway.
* ``GET``/``HEAD`` of files under the root (:class:`~statemachines.http_site.Site` says how paths
  are kept inside it), ``index.html`` for a directory URL ending in ``/`` (404 if it has none;
  no listings), 301 to the ``/`` form for a directory named without it. ``Content-Type`` from
  the extension, ``Last-Modified``, ``If-Modified-Since`` → 304 (ignored when
  ``If-None-Match`` is present: there are no ETags), one byte range → 206 (unsatisfiable → 416;
  several ranges, a malformed ``Range`` or any ``If-Range`` → the whole file with 200).
* ``/echo``: ``POST``/``PUT`` answer with the request body (405 with ``Allow`` otherwise).
  ``/_status``: counters of the shared :class:`~statemachines.http_site.Site`.
* ``OPTIONS`` answers 204 with ``Allow``; other known methods (``DELETE``, ``PATCH``, ``TRACE``,
  ``CONNECT``) get 405; unknown methods 501.

Errors close the connection when the rest of the input can't be trusted (every 4xx/5xx sent
from a parse or limit error); 404, 405, 416 and 301 keep it. Every response carries ``Date``
(formatted once per second) and ``Server``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

import attrs

from statemux import (
    CloseReason,
    Drained,
    Exact,
    Frame,
    FrameTooLong,
    Machine,
    Opened,
    ProtocolError,
    State,
    TimedOut,
    TimerFired,
)
from statemux.framing import Framing, ReceiveBuffer
from statemux.service import Option, Service

from .http_site import REASONS, STATUS_LINES, Entry, HTTPLimits, Site, read_exactly

__all__ = [
    "HTTP",
    "HTTPError",
    "HTTPLimits",
    "Request",
    "RequestHead",
    "LimitedLine",
    "Site",
    "HEADER_TIMEOUT",
    "BODY_TIMEOUT",
    "SERVICE",
    "build",
]

#: Seconds a request head may take to arrive, counted from when the server starts waiting for
#: it (connection opened, or previous response queued). A partly received head then gets 408;
#: an idle persistent connection is closed without a response.
HEADER_TIMEOUT = 30.0
#: Seconds a Content-Length body, or each chunk of a chunked body, may take (then 408).
BODY_TIMEOUT = 60.0

METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT")
)
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(rb"[%s]+" % _TCHAR)
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_FIELD_LINE = rb"[%s]+:[\t\x20-\x7e\x80-\xff]*" % _TCHAR
#: every header line of a head (LF-terminated, CRs already removed)
_FIELDS = re.compile(rb"(?:%s\n)*" % _FIELD_LINE)
_FIELD = re.compile(_FIELD_LINE)
_HEX = b"0123456789abcdefABCDEF"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_TEXT = b"text/plain; charset=utf-8"
_STATIC_ALLOW = b"GET, HEAD, OPTIONS"
_ECHO_ALLOW = b"POST, PUT, OPTIONS"


class HTTPError(ProtocolError):
    """A request the server refuses with ``status``; ``message`` goes in the small body."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class Request:
    """A parsed request head. ``headers`` maps lower-case names to values (surrounding
    whitespace removed; repeated fields joined with ``, ``)."""

    __slots__ = ("method", "target", "http11", "headers")

    def __init__(self, method: bytes, target: bytes, http11: bool, headers: dict[bytes, bytes]):
        self.method = method
        self.target = target
        self.http11 = http11
        self.headers = headers

    def __repr__(self) -> str:
        version = "1.1" if self.http11 else "1.0"
        return f"<Request {self.method.decode()} {self.target!r} HTTP/{version}>"


class RequestHead(Framing):
    """Cuts a whole request head — request line, header fields, blank line — in one pass and
    returns it parsed as a :class:`Request`.

    Limits come from the machine's ``site.limits``: a request line over ``max_request_line``
    raises ``FrameTooLong("request line")`` (→ 414), a head over ``max_head_size``
    ``FrameTooLong("request head")`` (→ 431); malformed heads raise :class:`HTTPError`. Empty
    lines before a request are skipped; lines may end with CRLF or a bare LF. When it returns
    ``None`` it records in ``machine.head_partial`` whether part of a head is buffered.
    Used as a state's framing; callers never call :meth:`cut` themselves.
    """

    __slots__ = ()

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> Request | None:
        data = buffer.data
        if not data:
            machine.head_partial = False
            return None
        first = data[0]
        if first == 13 or first == 10:
            k = 1
            n = len(data)
            while k < n and data[k] in b"\r\n":
                k += 1
            buffer.skip(k)
            if not data:
                machine.head_partial = False
                return None
        limits = machine.site.limits
        max_head = limits.max_head_size
        scan = buffer.scan
        i = data.find(b"\n\r\n", scan, max_head)
        j = data.find(b"\n\n", scan, max_head if i < 0 else i + 1)
        if j >= 0:
            end, skip = j, 2
        elif i >= 0:
            end, skip = i, 3
        else:
            n = len(data)
            max_line = limits.max_request_line
            if n > max_line + 1 and data.find(b"\n", 0, max_line + 2) < 0:
                raise FrameTooLong("request line", max_line, n)
            if n >= max_head:
                raise FrameTooLong("request head", max_head, n)
            buffer.scan = n - 2 if n > 2 else 0
            machine.head_partial = True
            return None
        head = bytes(data[: end + 1])
        del data[: end + skip]
        buffer.scan = 0
        machine.head_partial = False  # (the runner does not ask again while nothing is buffered)
        return parse_head(head, limits)

    def describe(self) -> str:
        return "request head ≤ max_head_size B"


def parse_head(head: bytes, limits: HTTPLimits) -> Request:
    """Parse a request head that ends with the LF of its last line (the blank line removed)."""
    if b"\r" in head:
        head = head.replace(b"\r\n", b"\n")
        if b"\r" in head:
            raise HTTPError(400, "bare CR in request head")
    lines = head.split(b"\n")
    lines.pop()
    reqline = lines[0]
    if len(reqline) > limits.max_request_line:
        raise FrameTooLong("request line", limits.max_request_line, len(reqline))
    parts = reqline.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        http11 = True
    elif version == b"HTTP/1.0":
        http11 = False
    elif _VERSION.fullmatch(version):
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    else:
        raise HTTPError(400, "malformed HTTP version")
    if method not in METHODS:
        if _TOKEN.fullmatch(method):
            raise HTTPError(501, "method not implemented")
        raise HTTPError(400, "malformed method")
    if not _TARGET.fullmatch(target):
        raise HTTPError(400, "malformed request target")
    headers: dict[bytes, bytes] = {}
    count = len(lines) - 1
    if count:
        if count > limits.max_headers:
            raise HTTPError(431, f"more than {limits.max_headers} header fields")
        if not _FIELDS.fullmatch(head, len(reqline) + 1):
            raise HTTPError(400, "malformed header field")
        max_line = limits.max_header_line
        if len(head) > max_line and max(map(len, lines)) > max_line:
            if max(map(len, lines[1:])) > max_line:
                raise HTTPError(431, f"header line longer than {max_line} bytes")
        it = iter(lines)
        next(it)
        for line in it:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name not in headers:
                headers[name] = value.strip(b" \t")
                continue
            value = value.strip(b" \t")
            if name == b"content-length":
                if headers[name] != value:
                    raise HTTPError(400, "conflicting Content-Length fields")
            elif name == b"host":
                raise HTTPError(400, "more than one Host field")
            else:
                headers[name] += b", " + value
    return Request(method, target, http11, headers)


class LimitedLine(Framing):
    """One line ending in LF (a CR before it is removed). Its limit is the ``limit`` field of
    the machine's ``site.limits``; a longer line raises ``FrameTooLong(what)``."""

    __slots__ = ("limit", "what")

    def __init__(self, limit: str, what: str) -> None:
        self.limit = limit
        self.what = what

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> bytes | None:
        limit = getattr(machine.site.limits, self.limit)
        data = buffer.data
        i = data.find(b"\n", buffer.scan)
        if i < 0:
            n = len(data)
            if n > limit + 1:
                raise FrameTooLong(self.what, limit, n)
            buffer.scan = n
            return None
        end = i - 1 if i and data[i - 1] == 13 else i
        if end > limit:
            raise FrameTooLong(self.what, limit, end)
        line = bytes(data[:end])
        del data[: i + 1]
        buffer.scan = 0
        return line

    def describe(self) -> str:
        return f"line ≤ {self.limit} B"


class BodyBytes(Exact):
    """Exactly ``machine.<n>`` bytes; the handler that set ``n`` has already checked it
    against ``max_body``, so the framing itself sets no lower bound."""

    __slots__ = ()

    def __init__(self, n: str) -> None:
        super().__init__(n, max_size=1 << 62)

    def describe(self) -> str:
        return f"exactly {self.n} B"


def _has_token(value: bytes, token: bytes) -> bool:
    """Whether a comma-separated header value lists ``token`` (case-insensitive)."""
    value = value.lower()
    if value == token:
        return True
    return any(t.strip(b" \t") == token for t in value.split(b","))


def _parse_range(value: bytes, size: int) -> tuple[int, int] | None | bool:
    """``(first, last)`` of a single satisfiable byte range; ``False`` if unsatisfiable;
    ``None`` if the field is to be ignored (malformed, another unit, or several ranges)."""
    value = value.strip()
    if not value.startswith(b"bytes="):
        return None
    spec = value[6:].strip(b" \t")
    first, dash, last = spec.partition(b"-")
    if not dash or b"," in spec:
        return None
    first = first.strip(b" \t")
    last = last.strip(b" \t")
    if first:
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        a = int(first)
        b = int(last) if last else size - 1
        if last and b < a:
            return None
        if a >= size:
            return False
        return a, min(b, size - 1)
    if not last.isdigit():
        return None
    n = int(last)
    if n == 0 or size == 0:
        return False
    return max(0, size - n), size - 1


@attrs.define
class HTTP(Machine):
    """One HTTP/1.1 server connection. Construct it with the server's shared ``site``
    (``functools.partial(HTTP, site=Site(root))``); ``SERVICE.build`` does that.

    Subclasses may override :meth:`respond` to add routes (call the base for the rest).
    """

    site: Site
    req: Request | None = None
    keep_alive: bool = True
    requests: int = 0
    body_length: int = 0
    chunk_length: int = 0
    chunks: bytearray | None = None
    trailers: int = 0
    head_since: float = 0.0
    head_partial: bool = False
    file_fd: int = -1
    file_offset: int = 0
    file_left: int = 0

    request_head = State(
        RequestHead(),
        timeout=HEADER_TIMEOUT,
        initial=True,
        doc="waiting for a whole request head (request line, header fields, blank line)",
    )
    body = State(
        BodyBytes("body_length"),
        timeout=BODY_TIMEOUT,
        doc="waiting for a Content-Length request body",
    )
    chunk_size = State(
        LimitedLine("max_chunk_line", "chunk-size line"),
        timeout=BODY_TIMEOUT,
        doc="waiting for a chunk-size line of a chunked body",
    )
    chunk_data = State(
        BodyBytes("chunk_length"),
        timeout=BODY_TIMEOUT,
        doc="waiting for a chunk's data and its CRLF",
    )
    chunk_trailer = State(
        LimitedLine("max_header_line", "trailer line"),
        timeout=BODY_TIMEOUT,
        doc="waiting for trailer fields and the blank line ending a chunked body",
    )
    sending_file = State(
        doc="sending a large file piece by piece, each when the output has drained; "
        "pipelined requests wait unread"
    )
    closing = State(final=True, doc="flushing the last response, then closing")

    # -- request head ------------------------------------------------------------------------
    @request_head.on(Opened, to=request_head)
    def opened(self, event: Opened) -> None:
        site = self.site
        site.connections += 1
        site.open_connections += 1
        self.head_since = self.now()

    @request_head.on(Frame, to=(request_head, body, chunk_size, sending_file, closing))
    def on_request(self, req: Request) -> str:
        site = self.site
        site.requests += 1
        self.requests += 1
        self.req = req
        headers = req.headers
        connection = headers.get(b"connection")
        if req.http11:
            if b"host" not in headers:
                return self.fail(400, "missing Host field (required in HTTP/1.1)")
            keep = (
                connection is None
                or b"close" not in connection.lower()
                or not _has_token(connection, b"close")
            )
        else:
            keep = connection is not None and _has_token(connection, b"keep-alive")
        limit = site.limits.max_requests_per_connection
        if limit is not None and self.requests >= limit:
            keep = False
        self.keep_alive = keep
        te = headers.get(b"transfer-encoding")
        cl = headers.get(b"content-length")
        if te is None and cl is None and b"expect" not in headers:
            return self.respond(b"")
        return self._start_body(req, te, cl)

    def _start_body(self, req: Request, te: bytes | None, cl: bytes | None) -> str:
        max_body = self.site.limits.max_body
        length = 0
        if te is not None:
            if cl is not None:
                return self.fail(400, "Content-Length together with Transfer-Encoding")
            if not req.http11:
                return self.fail(400, "Transfer-Encoding in an HTTP/1.0 request")
            if te.lower() != b"chunked":
                return self.fail(501, "transfer coding not implemented (only chunked)")
            length = -1
        elif cl is not None:
            if not cl.isdigit():
                return self.fail(400, "malformed Content-Length")
            length = int(cl)
            if length > max_body:
                return self.fail(413, f"body longer than {max_body} bytes")
        expect = req.headers.get(b"expect")
        if expect is not None and req.http11:
            if expect.lower() != b"100-continue":
                return self.fail(417, "only 100-continue is supported")
            if length and not self.accepts_body(req):
                # Answer without reading the body; the client may still send it, so close.
                self.keep_alive = False
                return self.respond(b"")
            if length:
                self.send(_CONTINUE)
        if length < 0:
            self.chunks = bytearray()
            self.trailers = len(req.headers)
            return "chunk_size"
        if length == 0:
            return self.respond(b"")
        self.body_length = length
        return "body"

    @request_head.on(FrameTooLong, to=closing)
    def head_too_long(self, exc: FrameTooLong) -> None:
        self.req = None
        if exc.what == "request line":
            self.fail(414, f"request line longer than {exc.limit} bytes")
        else:
            self.fail(431, f"request head longer than {exc.limit} bytes")

    @request_head.on(ProtocolError, to=closing)
    def bad_head(self, exc: ProtocolError) -> None:
        self.req = None
        self.fail(getattr(exc, "status", 400), exc.message)

    @request_head.on(TimedOut, to=(request_head, closing))
    def head_timed_out(self, event: TimedOut) -> str:
        return self._check_head_deadline()

    @request_head.on(TimerFired, to=(request_head, closing))
    def head_timer(self, event: TimerFired) -> str:
        return self._check_head_deadline()

    def _check_head_deadline(self) -> str:
        # The state's timeout counts from entering request_head, and answering a request
        # stays in it, so the deadline is checked lazily against head_since instead of
        # restarting a timer for every request.
        waited = self.now() - self.head_since
        if waited < HEADER_TIMEOUT - 1e-9:
            self.start_timer("header", HEADER_TIMEOUT - waited)
            return "request_head"
        if self.head_partial:
            self.req = None
            return self.fail(408, f"request head not received within {HEADER_TIMEOUT:g} s")
        return "closing"  # an idle persistent connection: close without a response

    # -- request bodies ------------------------------------------------------------------------
    @body.on(Frame, to=(request_head, sending_file, closing))
    def on_body(self, data: bytes) -> str:
        return self.respond(data)

    @chunk_size.on(Frame, to=(chunk_data, chunk_trailer))
    def on_chunk_size(self, line: bytes) -> str:
        size = line.split(b";", 1)[0].strip(b" \t")
        if not size or len(size) > 16 or size.translate(None, _HEX):
            raise HTTPError(400, "malformed chunk size")
        n = int(size, 16)
        if n == 0:
            return "chunk_trailer"
        chunks = self.chunks
        assert chunks is not None
        max_body = self.site.limits.max_body
        if len(chunks) + n > max_body:
            raise HTTPError(413, f"body longer than {max_body} bytes")
        self.chunk_length = n + 2
        return "chunk_data"

    @chunk_data.on(Frame, to=chunk_size)
    def on_chunk_data(self, data: bytes) -> None:
        if not data.endswith(b"\r\n"):
            raise HTTPError(400, "chunk data not followed by CRLF")
        assert self.chunks is not None
        self.chunks += memoryview(data)[:-2]

    @chunk_trailer.on(Frame, to=(chunk_trailer, request_head, sending_file, closing))
    def on_trailer(self, line: bytes) -> str:
        if line:
            self.trailers += 1
            max_headers = self.site.limits.max_headers
            if self.trailers > max_headers:
                raise HTTPError(431, f"more than {max_headers} header and trailer fields")
            if not _FIELD.fullmatch(line):
                raise HTTPError(400, "malformed trailer field")
            return "chunk_trailer"
        body = bytes(self.chunks or b"")
        self.chunks = None
        return self.respond(body)

    @chunk_size.on(FrameTooLong, to=closing)
    def chunk_line_too_long(self, exc: FrameTooLong) -> None:
        self.fail(400, f"chunk-size line longer than {exc.limit} bytes")

    @chunk_trailer.on(FrameTooLong, to=closing)
    def trailer_too_long(self, exc: FrameTooLong) -> None:
        self.fail(431, f"trailer line longer than {exc.limit} bytes")

    @chunk_size.on(ProtocolError, to=closing)
    @chunk_data.on(ProtocolError, to=closing)
    @chunk_trailer.on(ProtocolError, to=closing)
    def bad_chunked_body(self, exc: ProtocolError) -> None:
        self.fail(getattr(exc, "status", 400), exc.message)

    @body.on(TimedOut, to=closing)
    @chunk_size.on(TimedOut, to=closing)
    @chunk_data.on(TimedOut, to=closing)
    @chunk_trailer.on(TimedOut, to=closing)
    def body_timed_out(self, event: TimedOut) -> None:
        self.fail(408, f"request body not received within {BODY_TIMEOUT:g} s")

    # -- large files -----------------------------------------------------------------------------
    @sending_file.on(Drained, to=(sending_file, request_head, closing))
    def send_piece(self, event: Drained) -> str:
        n = min(self.site.limits.file_piece, self.file_left)
        data = read_exactly(self.file_fd, n, self.file_offset)
        if len(data) != n:
            # The file shrank under us: the promised Content-Length can't be kept.
            self._close_file()
            self.abort()
            return "sending_file"
        self.send(data)
        self.file_offset += n
        self.file_left -= n
        if self.file_left:
            return "sending_file"
        self._close_file()
        return self._next()

    def _close_file(self) -> None:
        if self.file_fd >= 0:
            os.close(self.file_fd)
            self.file_fd = -1

    def on_closed(self, reason: CloseReason) -> None:
        self._close_file()
        self.site.open_connections -= 1

    # -- responses -------------------------------------------------------------------------------
    def accepts_body(self, req: Request) -> bool:
        """Whether the request's body is wanted (decides ``100 Continue``). Subclasses that
        add routes taking bodies override it together with :meth:`respond`."""
        path = req.target.partition(b"?")[0]
        return path == b"/echo" and (req.method == b"POST" or req.method == b"PUT")

    def respond(self, body: bytes) -> str:
        """Answer ``self.req`` (its body, if any, is ``body``); return the next state's name.
        Subclasses may override it to add routes and call the base for the rest."""
        req = self.req
        assert req is not None
        target = req.target
        method = req.method
        if target[0] != 47:  # not origin-form
            if target == b"*" and method == b"OPTIONS":
                return self.reply(204, b"", extra=b"Allow: GET, HEAD, POST, PUT, OPTIONS\r\n")
            if target.startswith((b"http://", b"https://")):
                target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
            elif method == b"CONNECT":
                return self.refuse(405, _STATIC_ALLOW)
            else:
                return self.fail(400, "malformed request target")
        q = target.find(b"?")
        path = target if q < 0 else target[:q]
        if method == b"GET" or method == b"HEAD":
            if path == b"/_status":
                return self.reply(200, self.site.status_text(), _TEXT)
            if path == b"/echo":
                return self.refuse(405, _ECHO_ALLOW)
            return self.serve_file(req, path)
        if path == b"/echo":
            if method == b"POST" or method == b"PUT":
                ctype = req.headers.get(b"content-type", b"application/octet-stream")
                return self.reply(200, body, ctype)
            allow = _ECHO_ALLOW
        else:
            allow = b"GET, HEAD, OPTIONS"
        if method == b"OPTIONS":
            return self.reply(204, b"", extra=b"Allow: %s\r\n" % allow)
        return self.refuse(405, allow)

    def serve_file(self, req: Request, path: bytes) -> str:
        """``GET``/``HEAD`` of a file under the root. Callable from :meth:`respond`."""
        site = self.site
        now = self.now()
        entry = site.lookup(path, now)
        status = entry.status
        if status != 200:
            if status == 301:
                return self.reply(
                    301,
                    b"moved to %s\n" % entry.location,
                    _TEXT,
                    b"Location: %s\r\n" % entry.location,
                )
            return self.reply(status, self.error_body(status, entry.message), _TEXT)
        headers = req.headers
        head_only = req.method == b"HEAD"
        if len(headers) > 1:
            ims = headers.get(b"if-modified-since")
            if ims is not None and b"if-none-match" not in headers:
                since = site.parse_date(ims)
                if since is not None and entry.mtime <= since:
                    return self.reply(304, b"", extra=entry.modified_line)
            rng = headers.get(b"range")
            if rng is not None and not head_only and b"if-range" not in headers:
                span = _parse_range(rng, entry.size)
                if span is False:
                    return self.reply(
                        416,
                        self.error_body(416, f"file has {entry.size} bytes"),
                        _TEXT,
                        b"Content-Range: bytes */%d\r\n" % entry.size,
                    )
                if span is not None:
                    assert isinstance(span, tuple)
                    return self._send_range(entry, span[0], span[1])
        body = entry.body
        if body is None:
            return self._send_large(entry, 0, entry.size, head_only, 200)
        keep = self.keep_alive
        self.send(
            b"".join(
                (
                    b"HTTP/1.1 200 OK\r\n",
                    site.date_header(),
                    entry.headers,
                    b"" if keep and req.http11 else _KEEP_ALIVE if keep else _CLOSE,
                    b"\r\n",
                    b"" if head_only else body,
                )
            )
        )
        if keep:
            self.head_since = now
            return "request_head"
        return "closing"

    def _send_range(self, entry: Entry, first: int, last: int) -> str:
        length = last - first + 1
        if entry.body is None:
            return self._send_large(entry, first, length, False, 206)
        extra = b"Content-Range: bytes %d-%d/%d\r\n%s" % (
            first,
            last,
            entry.size,
            entry.modified_line,
        )
        return self.reply(206, entry.body[first : last + 1], entry.type_line[14:-2], extra)

    def _send_large(
        self, entry: Entry, first: int, length: int, head_only: bool, status: int
    ) -> str:
        opened = self.site.open_file(entry)
        if opened is None:
            return self.reply(404, self.error_body(404, "no such file"), _TEXT)
        fd, fresh = opened
        if first + length > fresh.size:  # changed since the range was checked
            os.close(fd)
            return self.fail(500, "file changed while being served")
        if status == 206:
            headers = fresh.type_line + b"Content-Length: %d\r\n" % length
            headers += b"Content-Range: bytes %d-%d/%d\r\n" % (
                first,
                first + length - 1,
                fresh.size,
            )
            headers += fresh.modified_line
        else:
            headers = fresh.headers
            length = fresh.size
        self.send(STATUS_LINES[status] + self.site.date_header() + headers + self._conn_line())
        self.send(b"\r\n")
        if head_only or not length:
            os.close(fd)
            return self._next()
        self.file_fd = fd
        self.file_offset = first
        self.file_left = length
        return "sending_file"

    def _conn_line(self) -> bytes:
        req = self.req
        if not self.keep_alive:
            return _CLOSE
        return b"" if req is None or req.http11 else _KEEP_ALIVE

    def _next(self) -> str:
        if self.keep_alive:
            self.head_since = self.now()
            return "request_head"
        return "closing"

    @staticmethod
    def error_body(status: int, message: str) -> bytes:
        return f"{status} {REASONS[status]}: {message}\n".encode()

    def reply(self, status: int, body: bytes, content_type: bytes = b"", extra: bytes = b"") -> str:
        """Send a whole response to ``self.req`` (no body for ``HEAD``, 204 and 304) and return
        the next state: ``request_head`` when the connection is kept, else ``closing``."""
        req = self.req
        parts = [STATUS_LINES[status], self.site.date_header(), extra]
        if status != 204 and status != 304:
            if content_type:
                parts.append(b"Content-Type: %s\r\n" % content_type)
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(self._conn_line())
        parts.append(b"\r\n")
        if body and status != 204 and status != 304 and (req is None or req.method != b"HEAD"):
            parts.append(body)
        self.send(b"".join(parts))
        return self._next()

    def refuse(self, status: int, allow: bytes) -> str:
        """405 with ``Allow``; the connection is kept."""
        message = self.error_body(status, "allowed: " + allow.decode())
        return self.reply(status, message, _TEXT, b"Allow: %s\r\n" % allow)

    def fail(self, status: int, message: str) -> str:
        """Send an error response and close: the rest of the input can't be trusted."""
        self.keep_alive = False
        self.reply(status, self.error_body(status, message), _TEXT)
        return "closing"


def build(
    datagram: bool = False,
    *,
    root: str | None = None,
    max_body: int | None = None,
    **options: Any,
) -> Callable[[], Machine]:
    """Return the factory a server takes: :class:`HTTP` bound to one new :class:`Site`
    serving ``root`` (default: the current directory). Called by ``statemux serve``."""
    if datagram:
        raise ValueError("http runs over streams only (TCP or Unix stream sockets)")
    limits = HTTPLimits() if max_body is None else HTTPLimits(max_body=max_body)
    site = Site(root if root is not None else os.getcwd(), limits=limits)
    return functools.partial(HTTP, site=site)


SERVICE = Service(
    name="http",
    summary="HTTP/1.1: static files from --root, /echo and /_status",
    build=build,
    options=(
        Option("--root", "directory whose files are served", str, "."),
        Option("--max-body", "largest request body in bytes", int, HTTPLimits().max_body),
    ),
    stream=True,
    datagram=False,
    default_port=8080,
    connect_hint="curl -v http://{host}:{port}/_status",
    connect_hint_unix="curl -v --unix-socket {path} http://localhost/",
)
