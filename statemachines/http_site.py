"""The HTTP machine's shared service: the served root, the limits, the counters and the caches.

One :class:`Site` is created per server (by ``SERVICE.build``) and handed to every connection's
:class:`~statemachines.http.HTTP` machine. Connections only *read* it, apart from the status
counters and the caches, so it is safe under every concurrency model:

* multiplexing and sync: one thread, nothing to guard;
* threading: dict operations are atomic under the GIL; the counters are plain ``+=`` and may
  miss an increment when two threads race (they feed a status page, not accounting);
* forking: each child process has its own copy, so ``/_status`` shows the counts of the child
  that answered (connections it served, requests it handled, its uptime).

Path safety (:meth:`Site.resolve`): the request path is percent-decoded; a NUL byte is refused
(400); ``.`` and empty segments are dropped and ``..`` pops a segment, never above the root
(403); the result is joined to the root (an absolute or ``//`` path stays inside it), resolved
with ``realpath`` so symlinks are followed, and refused (403) unless it is still inside the
resolved root. Only regular files are served; files are opened with ``O_NOFOLLOW`` and
``O_NONBLOCK`` so a symlink or FIFO swapped in after the check is not followed or waited on.
"""

from __future__ import annotations

import email.utils
import mimetypes
import os
import stat
import time
from collections.abc import Callable
from urllib.parse import quote_from_bytes, unquote_to_bytes

import attrs

__all__ = ["HTTPLimits", "Site", "Entry", "STATUS_LINES", "REASONS", "http_date"]

REASONS: dict[int, str] = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    304: "Not Modified",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}

#: ``status -> b"HTTP/1.1 200 OK\r\n"``, built once.
STATUS_LINES: dict[int, bytes] = {
    code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in REASONS.items()
}

# The table shipped with Python only (not /etc/mime.types), so types do not vary by host.
_MIME = mimetypes.MimeTypes()
_MIME.add_type("text/markdown", ".md")  # missing from Python 3.11's table; the demo serves docs/
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW


def http_date(t: float) -> str:
    """An IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``), independent of the locale."""
    return email.utils.formatdate(t, usegmt=True)


def _positive(inst: object, attr: attrs.Attribute, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attr.name} must be positive, not {value!r}")


@attrs.frozen(kw_only=True)
class HTTPLimits:
    """Every bound the HTTP machine enforces, with the status the peer sees when it is passed.

    The two timeouts are not here: they are the ``timeout`` of the machine's states
    (:data:`~statemachines.http.HEADER_TIMEOUT`, :data:`~statemachines.http.BODY_TIMEOUT`).
    """

    #: request line (method, target, version) without its CRLF; longer → 414
    max_request_line: int = attrs.field(default=8 * 1024, validator=_positive)
    #: one header (or trailer) field line without its CRLF; longer → 431
    max_header_line: int = attrs.field(default=8 * 1024, validator=_positive)
    #: the whole request head, request line to blank line inclusive; larger → 431
    max_head_size: int = attrs.field(default=64 * 1024, validator=_positive)
    #: header fields in one request (trailer fields of a chunked body count too); more → 431
    max_headers: int = attrs.field(default=100, validator=_positive)
    #: request body, Content-Length or the sum of the chunks; larger → 413
    max_body: int = attrs.field(default=1024 * 1024, validator=_positive)
    #: a chunk-size line (size and extensions) without its CRLF; longer → 400
    max_chunk_line: int = attrs.field(default=1024, validator=_positive)
    #: requests served on one connection; the last one is answered with ``Connection: close``
    max_requests_per_connection: int | None = attrs.field(default=1000, validator=_positive)
    #: files up to this size are read whole (and cached); larger ones are streamed in pieces
    small_file_size: int = attrs.field(default=128 * 1024, validator=_positive)
    #: bytes read from a large file per piece; the next piece waits for output to drain
    file_piece: int = attrs.field(default=64 * 1024, validator=_positive)
    #: seconds a path's resolution, stat and small-file bytes are reused without a new stat
    cache_ttl: float = attrs.field(default=1.0, validator=_positive)
    #: paths cached at once; when full the cache is emptied
    cache_entries: int = attrs.field(default=1024, validator=_positive)
    #: bytes of small files cached at once; when full the cache is emptied
    cache_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)


class Entry:
    """What a request path resolved to, cached for ``cache_ttl`` seconds.

    ``status`` 200: a regular file (``body`` holds its bytes when it is small, else ``None`` and
    each request opens ``fs_path`` afresh); 301: a directory named without its trailing slash
    (``location``); 400/403/404: refused, ``message`` says why.
    """

    __slots__ = (
        "status", "expires", "fs_path", "size", "mtime", "headers", "type_line",
        "modified_line", "body", "location", "message",
    )  # fmt: skip

    def __init__(self, status: int, message: str = "") -> None:
        self.status = status
        self.message = message
        self.expires = 0.0
        self.fs_path = b""
        self.size = 0
        self.mtime = 0
        self.headers = b""
        self.type_line = b""
        self.modified_line = b""
        self.body: bytes | None = None
        self.location = b""


def _realroot(path: str) -> bytes:
    real = os.path.realpath(os.fsencode(path))
    if not os.path.isdir(real):
        raise ValueError(f"HTTP root {path!r} is not a directory")
    return real


# No on-setattr hooks: the counters are bumped on every request.
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class Site:
    """The shared service of one HTTP server: root, limits, counters, caches.

    Created by ``SERVICE.build`` (or by a test) and passed to each machine; connections call
    :meth:`lookup`, :meth:`date_header` and :meth:`parse_date`, and update the counters.
    ``wallclock`` gives the time for ``Date`` and uptime; cache expiry uses each connection's
    clock (``Machine.now``), so tests move it with the fake clock.
    """

    root: bytes = attrs.field(converter=_realroot)
    limits: HTTPLimits = attrs.field(factory=HTTPLimits)
    server_name: bytes = b"statemux"
    wallclock: Callable[[], float] = time.time
    started: float = attrs.field(init=False)
    #: connections accepted, connections open now, requests whose head was parsed
    connections: int = attrs.field(default=0, init=False)
    open_connections: int = attrs.field(default=0, init=False)
    requests: int = attrs.field(default=0, init=False)
    cache: dict[bytes, Entry] = attrs.field(factory=dict, init=False, repr=False)
    cached_bytes: int = attrs.field(default=0, init=False, repr=False)
    _date: tuple[int, bytes] = attrs.field(default=(-1, b""), init=False, repr=False)
    _parsed_date: tuple[bytes, int | None] = attrs.field(
        default=(b"", None), init=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        self.started = self.wallclock()

    # -- per-request helpers (hot path) --------------------------------------------------------
    def date_header(self) -> bytes:
        """``Date`` and ``Server`` header lines, formatted once per second."""
        now = int(self.wallclock())
        cached = self._date
        if cached[0] == now:
            return cached[1]
        line = b"Date: %s\r\nServer: %s\r\n" % (http_date(now).encode(), self.server_name)
        self._date = (now, line)
        return line

    def parse_date(self, value: bytes) -> int | None:
        """An HTTP date as a POSIX timestamp, or ``None`` if it is not one (the last value is
        remembered: clients repeat the same ``If-Modified-Since``)."""
        cached = self._parsed_date
        if cached[0] == value:
            return cached[1]
        try:
            parsed = email.utils.parsedate_tz(value.decode("latin-1"))
            result = email.utils.mktime_tz(parsed) if parsed is not None else None
        except (ValueError, OverflowError):
            result = None
        self._parsed_date = (value, result)
        return result

    def lookup(self, path: bytes, now: float) -> Entry:
        """The cached entry of a request path (without query), resolved again once expired."""
        entry = self.cache.get(path)
        if entry is not None and entry.expires > now:
            return entry
        return self._load(path, now)

    def status_text(self) -> bytes:
        """The body of ``/_status``."""
        uptime = self.wallclock() - self.started
        return (
            f"connections: {self.connections}\n"
            f"open_connections: {self.open_connections}\n"
            f"requests: {self.requests}\n"
            f"uptime_seconds: {uptime:.1f}\n"
            f"pid: {os.getpid()}\n"
        ).encode()

    # -- resolution and caching ------------------------------------------------------------------
    def _load(self, path: bytes, now: float) -> Entry:
        entry = self.resolve(path)
        limits = self.limits
        entry.expires = now + limits.cache_ttl
        cache = self.cache
        old = cache.pop(path, None)
        if old is not None and old.body is not None:
            self.cached_bytes -= len(old.body)
        size = len(entry.body) if entry.body is not None else 0
        if len(cache) >= limits.cache_entries or self.cached_bytes + size > limits.cache_bytes:
            # Emptying is cheap and bounds memory whatever paths clients ask for.
            cache.clear()
            self.cached_bytes = 0
        cache[path] = entry
        self.cached_bytes += size
        return entry

    def resolve(self, path: bytes) -> Entry:
        """Map a request path (percent-encoded, without query) to an :class:`Entry`.

        See the module docstring for the rules. May be called by tests; the machine calls
        :meth:`lookup`.
        """
        decoded = unquote_to_bytes(path) if b"%" in path else path
        if b"\x00" in decoded:
            return Entry(400, "NUL byte in path")
        segments: list[bytes] = []
        for seg in decoded.split(b"/"):
            if not seg or seg == b".":
                continue
            if seg == b"..":
                if not segments:
                    return Entry(403, "path escapes the root directory")
                segments.pop()
            else:
                segments.append(seg)
        root = self.root
        real = os.path.realpath(os.path.join(root, *segments)) if segments else root
        if not self._inside(real):
            return Entry(403, "path resolves outside the root directory")
        try:
            st = os.stat(real)
        except OSError:
            return Entry(404, "no such file")
        wants_dir = decoded.endswith(b"/")
        if stat.S_ISDIR(st.st_mode):
            if not wants_dir:
                entry = Entry(301, "directory; its URL ends with /")
                entry.location = quote_from_bytes(b"/" + b"/".join([*segments, b""])).encode()
                return entry
            real = os.path.realpath(os.path.join(real, b"index.html"))
            if not self._inside(real):
                return Entry(403, "path resolves outside the root directory")
        elif wants_dir:
            return Entry(404, "not a directory")
        return self._open_entry(real)

    def _inside(self, real: bytes) -> bool:
        root = self.root
        return real == root or real.startswith(root + b"/") or root == b"/"

    def _open_entry(self, real: bytes) -> Entry:
        try:
            fd = os.open(real, _OPEN_FLAGS)
        except PermissionError:
            return Entry(403, "permission denied")
        except OSError:
            return Entry(404, "no such file")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return Entry(404, "not a regular file")
            entry = Entry(200)
            entry.fs_path = real
            self.describe_file(entry, st)
            if st.st_size <= self.limits.small_file_size:
                body = read_exactly(fd, st.st_size, 0)
                if len(body) != st.st_size:  # changed while we read: describe what we have
                    entry.size = len(body)
                    entry.headers = entry.type_line + b"Content-Length: %d\r\n" % len(body)
                    entry.headers += entry.modified_line + b"Accept-Ranges: bytes\r\n"
                entry.body = body
            return entry
        finally:
            os.close(fd)

    @staticmethod
    def describe_file(entry: Entry, st: os.stat_result) -> None:
        """Fill size, mtime and the fixed header lines of a file's 200 response."""
        ctype = _MIME.guess_type(os.fsdecode(entry.fs_path), strict=False)[0]
        entry.size = st.st_size
        entry.mtime = int(st.st_mtime)
        entry.type_line = b"Content-Type: %s\r\n" % (ctype or "application/octet-stream").encode()
        entry.modified_line = b"Last-Modified: %s\r\n" % http_date(entry.mtime).encode()
        entry.headers = (
            entry.type_line
            + b"Content-Length: %d\r\n" % st.st_size
            + entry.modified_line
            + b"Accept-Ranges: bytes\r\n"
        )

    def open_file(self, entry: Entry) -> tuple[int, Entry] | None:
        """Open a large file for streaming: ``(fd, fresh entry)``, or ``None`` if it is gone."""
        try:
            fd = os.open(entry.fs_path, _OPEN_FLAGS)
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        fresh = Entry(200)
        fresh.fs_path = entry.fs_path
        self.describe_file(fresh, st)
        return fd, fresh


def read_exactly(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes of ``fd`` from ``offset``; fewer only if the file ends first."""
    data = os.pread(fd, n, offset)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
