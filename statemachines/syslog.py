"""Syslog receiver: every message received becomes one JSON object on one line.

Transports
----------
Datagrams (:class:`SyslogReceiver`, UDP and Unix datagram sockets): each datagram is one
message (RFC 5426). Streams (:class:`SyslogStreamReceiver`, TCP and Unix stream sockets):
RFC 6587 framing, octet counting (``LEN SP MSG``) when a frame starts with a digit, otherwise
non-transparent framing (one message per line, ending with ``\\n``).

Formats
-------
``rfc5424``       ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA [MSG]``;
                  a UTF-8 byte order mark before MSG is removed.
``rfc3164``       ``<PRI>Mmm dd hh:mm:ss HOSTNAME TAG[PID]: MSG`` (the BSD form).
``local``         ``<PRI>Mmm dd hh:mm:ss TAG[PID]: MSG``: the BSD form without a hostname, as
                  util-linux ``logger -u SOCKET`` and glibc's ``syslog(3)`` send it. Told apart
                  from ``rfc3164`` by its first word ending with ``:``.
``unstructured``  a valid PRI followed by anything else, e.g. Python's ``SysLogHandler``
                  (``<14>text\\0``). RFC 3164 section 4.3.3 keeps such messages; MSG is
                  everything after the PRI.

A trailing ``\\n``, ``\\r\\n`` or ``\\0`` is removed (senders append them to datagrams), and so
is an octet count before a datagram (``logger -d --octet-count`` sends one).

Records
-------
One JSON object per message, keys always present and in this order: ``received`` (when the
receiver got it, ISO 8601 UTC), ``peer`` (``host:port``, a socket path, or null), ``format``,
``pri``, ``facility``, ``facility_name``, ``severity``, ``severity_name``, ``timestamp`` (as
sent), ``time`` (ISO 8601, or null), ``host``, ``app``, ``procid``, ``msgid``,
``structured_data`` (``{SD-ID: {PARAM-NAME: value}}``, a repeated parameter's values as a
list), ``message``. RFC 3164 timestamps have no year and no zone: the year is the receiver's
(the one before or after when that is more than six months nearer) and ``time`` has no offset.

Flags appear only when they apply: ``malformed`` (the reason, e.g. ``PRI 192 is out of range
0..191``), with ``raw`` (the whole message as text) and, when it is not UTF-8, ``raw_base64``
(the exact bytes); ``truncated_from`` (the message's size when only its first ``max_message``
bytes were kept). A malformed message is never dropped and never fatal: fields parsed before
the problem are kept, and ``message`` holds the part that could not be parsed.

Output
------
:class:`SyslogSink`, created once per server by :func:`build`, parses, counts and writes.
Each record is one ``os.write`` of one line on a descriptor opened with ``O_APPEND``, so records
go straight to the kernel (nothing to flush) and lines from threads or forked processes sharing
the file do not interleave (local file systems append each ``write`` whole; on a pipe, lines up
to ``PIPE_BUF``, 4096 bytes, are atomic).

Limits
------
``max_message`` (:data:`MAX_MESSAGE`, 8 KiB): longer messages keep their first ``max_message``
bytes, parsed as usual, and are flagged ``truncated_from``. RFC 5424 asks receivers to accept
2048 octets and allows more; 8 KiB is rsyslog's default, eight times ``logger``'s 1 KiB default,
so common senders are never cut, while one record stays a bounded line.
:data:`MAX_DATAGRAM` (65535 bytes) bounds a datagram; a longer one (only possible on a Unix
datagram socket) is recorded without content, flagged ``datagram longer than 65535 bytes``.
"""

from __future__ import annotations

import base64
import calendar
import datetime as _dt
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import attrs

from statemux import Datagram, Frame, FrameTooLong, Machine, PeerClosed, State
from statemux.framing import Framing, ReceiveBuffer
from statemux.service import Option, Service

__all__ = [
    "SyslogReceiver",
    "SyslogStreamReceiver",
    "SyslogSink",
    "SyslogStreamFraming",
    "parse",
    "format_peer",
    "FACILITY_NAMES",
    "SEVERITY_NAMES",
    "MAX_MESSAGE",
    "MAX_DATAGRAM",
    "DEFAULT_PORT",
    "SERVICE",
    "build",
]

log = logging.getLogger("statemachines.syslog")

#: Default longest message kept whole; longer ones are truncated and flagged.
MAX_MESSAGE = 8 * 1024
#: Longest datagram read: at least the largest UDP payload (65507 bytes over IPv4, 65527 over IPv6).
MAX_DATAGRAM = 65535
#: Port the ``statemux serve syslog`` command binds when none is given (514 needs root).
DEFAULT_PORT = 5514

#: Facility names by number (``syslog.h``; 12..15 as RFC 5424 lists them).
FACILITY_NAMES: tuple[str, ...] = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "ntp", "security", "console", "solaris-cron",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)  # fmt: skip
#: Severity names by number, as ``logger -p`` spells them.
SEVERITY_NAMES: tuple[str, ...] = (
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
)  # fmt: skip

_MONTHS = {
    m: i + 1 for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())
}
_BSD_TIMESTAMP = re.compile(
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d)(?: |$)"
)
# A TAG is one word ending with ':' (with an optional [PID] before it), then a space or the end.
_TAG = re.compile(r"([^\s\[\]:]+)(?:\[([^\]\s]*)\])?:(?: |$)")
_VERSION = re.compile(r"[1-9]\d{0,2} ")
_RFC5424_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")
_PRINTUSASCII = re.compile(r"[!-~]+")
# SD-NAME: printable US-ASCII except '=', ' ', ']' and '"'.
_SD_NAME = re.compile(r"[!#-<>-\\^-~]+")
_SD_VALUE = re.compile(r'((?:[^"\\]|\\.)*)"', re.S)
_SD_ESCAPE = re.compile(r'\\(["\\\]])')
_SD_ELEMENT = re.compile(
    r'\[([!#-<>-\\^-~]{1,32})((?: [!#-<>-\\^-~]{1,32}="(?:[^"\\]|\\.)*")*)\]', re.S
)
_SD_PARAM = re.compile(r' ([!#-<>-\\^-~]{1,32})="((?:[^"\\]|\\.)*)"', re.S)
_OCTET_COUNT = re.compile(rb"([1-9][0-9]{0,9}) ")

_HEADER = ("VERSION", "TIMESTAMP", "HOSTNAME", "APP-NAME", "PROCID", "MSGID", "STRUCTURED-DATA")
_FIELD_LIMITS = (("HOSTNAME", 255), ("APP-NAME", 48), ("PROCID", 128), ("MSGID", 32))
_SD_NAME_LIMIT = 32
_SHOWN = 40  # characters of an offending value quoted in a reason


class _Malformed(Exception):
    """Internal: a reason why a message's header could not be parsed."""


def _quote(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def _record(
    fmt: str | None,
    pri: int | None,
    timestamp: str | None = None,
    iso: str | None = None,
    host: str | None = None,
    app: str | None = None,
    procid: str | None = None,
    msgid: str | None = None,
    sd: dict[str, dict[str, Any]] | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    if pri is None:
        fac = sev = fac_name = sev_name = None
    else:
        fac, sev = pri >> 3, pri & 7
        fac_name, sev_name = FACILITY_NAMES[fac], SEVERITY_NAMES[sev]
    return {
        "format": fmt,
        "pri": pri,
        "facility": fac,
        "facility_name": fac_name,
        "severity": sev,
        "severity_name": sev_name,
        "timestamp": timestamp,
        "time": iso,
        "host": host,
        "app": app,
        "procid": procid,
        "msgid": msgid,
        "structured_data": sd,
        "message": message,
    }


_DAYS_IN_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# (second, year, month) of the last ``now`` seen: localtime() once a second, not per message.
_local_month: tuple[int, int, int] = (-1, 0, 0)


def _bsd_time(month: int, day: int, hms: tuple[str, str, str], now: float | None) -> str | None:
    """ISO 8601 of an RFC 3164 timestamp, with the year nearest to ``now``; None if invalid."""
    global _local_month
    second = int(time.time() if now is None else now)
    cached = _local_month
    if cached[0] != second:
        lt = time.localtime(second)
        cached = _local_month = (second, lt.tm_year, lt.tm_mon)
    year = cached[1]
    if month - cached[2] > 6:  # December's message read in January
        year -= 1
    elif cached[2] - month > 6:  # the sender's clock is already in January
        year += 1
    hh, mm, ss = hms
    if (
        not 1 <= day <= _DAYS_IN_MONTH[month]
        or (month == 2 and day == 29 and not calendar.isleap(year))
        or hh > "23"
        or mm > "59"
        or ss > "59"
    ):
        return None
    return f"{year:04d}-{month:02d}-{day:02d}T{hh}:{mm}:{ss}"


def _parse_sd(s: str) -> tuple[dict[str, dict[str, Any]], int]:
    """STRUCTURED-DATA at the start of ``s`` (which starts with '['): the elements, and the
    index just after them. Well-formed elements take one regex match each; at the first that
    does not match, :func:`_parse_sd_slowly` finds the exact reason."""
    sd: dict[str, dict[str, Any]] = {}
    n = len(s)
    i = 0
    while i < n and s[i] == "[":
        m = _SD_ELEMENT.match(s, i)
        if m is None or m[1] in sd:
            return _parse_sd_slowly(s)
        params: dict[str, Any] = {}
        if m[2]:
            for name, value in _SD_PARAM.findall(m[2]):
                if "\\" in value:
                    value = _SD_ESCAPE.sub(r"\1", value)
                old = params.get(name)
                if old is None:
                    params[name] = value
                elif isinstance(old, list):
                    old.append(value)
                else:
                    params[name] = [old, value]
        sd[m[1]] = params
        i = m.end()
    return sd, i


def _parse_sd_slowly(s: str) -> tuple[dict[str, dict[str, Any]], int]:
    """Like :func:`_parse_sd`, one character at a time, naming what is wrong."""
    sd: dict[str, dict[str, Any]] = {}
    n = len(s)
    i = 0
    while i < n and s[i] == "[":
        m = _SD_NAME.match(s, i + 1)
        if m is None:
            raise _Malformed("RFC 5424 SD-ELEMENT has no SD-ID")
        sd_id = m.group()
        if len(sd_id) > _SD_NAME_LIMIT:
            raise _Malformed(f"RFC 5424 SD-ID longer than {_SD_NAME_LIMIT} characters")
        if sd_id in sd:
            raise _Malformed(f"RFC 5424 SD-ID {_quote(sd_id)} appears twice")
        params: dict[str, Any] = {}
        j = m.end()
        while True:
            if j >= n:
                raise _Malformed(f"RFC 5424 SD-ELEMENT {_quote(sd_id)} is not closed by ']'")
            c = s[j]
            if c == "]":
                j += 1
                break
            m = _SD_NAME.match(s, j + 1) if c == " " else None
            if m is None or s[m.end() : m.end() + 2] != '="':
                raise _Malformed(
                    f'RFC 5424 SD-PARAM in {_quote(sd_id)} is not NAME="VALUE" '
                    f"at {_quote(s[j : j + 12])}"
                )
            name = m.group()
            if len(name) > _SD_NAME_LIMIT:
                raise _Malformed(f"RFC 5424 PARAM-NAME longer than {_SD_NAME_LIMIT} characters")
            v = _SD_VALUE.match(s, m.end() + 2)
            if v is None:
                raise _Malformed(f"RFC 5424 PARAM-VALUE of {_quote(name)} has no closing '\"'")
            value = v.group(1)
            if "\\" in value:
                value = _SD_ESCAPE.sub(r"\1", value)
            old = params.get(name)
            if old is None:
                params[name] = value
            elif isinstance(old, list):
                old.append(value)
            else:
                params[name] = [old, value]
            j = v.end()
        sd[sd_id] = params
        i = j
    return sd, i


def _parse_5424(rest: str, pri: int) -> dict[str, Any]:
    parts = rest.split(" ", 6)
    for k, part in enumerate(parts):
        if not part:
            raise _Malformed(f"RFC 5424 {_HEADER[k]} is empty")
    if len(parts) < 7:
        raise _Malformed(f"RFC 5424 header has no {_HEADER[len(parts)]}")
    version, ts, host, app, procid, msgid, sdmsg = parts
    if version != "1":
        raise _Malformed(f"RFC 5424 VERSION {version} is not supported (only 1)")
    if ts == "-":
        timestamp = iso = None
    else:
        try:
            if not _RFC5424_TIME.fullmatch(ts):
                raise ValueError
            iso = _dt.datetime.fromisoformat(ts).isoformat()
        except ValueError:
            raise _Malformed(f"RFC 5424 TIMESTAMP {_quote(ts)} is not valid") from None
        timestamp = ts
    fields: list[str | None] = []
    for (name, limit), value in zip(_FIELD_LIMITS, (host, app, procid, msgid), strict=True):
        if value == "-":
            fields.append(None)
            continue
        if len(value) > limit:
            raise _Malformed(f"RFC 5424 {name} longer than {limit} characters")
        if not _PRINTUSASCII.fullmatch(value):
            raise _Malformed(
                f"RFC 5424 {name} {_quote(value)} has characters outside ASCII 33..126"
            )
        fields.append(value)
    first = sdmsg[:1]
    if first == "-":
        sd, i = None, 1
    elif first == "[":
        sd, i = _parse_sd(sdmsg)
    else:
        raise _Malformed("RFC 5424 STRUCTURED-DATA is neither '-' nor '[...]'")
    if i == len(sdmsg):
        message = None
    elif sdmsg[i] == " ":
        message = sdmsg[i + 1 :]
        if message.startswith("\ufeff"):
            message = message[1:]
    else:
        raise _Malformed("RFC 5424 STRUCTURED-DATA is not followed by a space")
    return _record("rfc5424", pri, timestamp, iso, *fields, sd, message)


def _parse_bsd(rest: str, m: re.Match[str], pri: int, now: float | None) -> dict[str, Any]:
    timestamp = rest[: m.end(5)]
    iso = _bsd_time(_MONTHS[m[1]], int(m[2]), (m[3], m[4], m[5]), now)
    after = rest[m.end() :]
    tag = _TAG.match(after)
    if tag is not None:
        fmt, host, message = "local", None, after[tag.end() :]
    else:
        fmt = "rfc3164"
        host, _, message = after.partition(" ")
        tag = _TAG.match(message)
        if tag is not None:
            message = message[tag.end() :]
    app = procid = None
    if tag is not None:
        app, procid = tag[1], tag[2] or None
    record = _record(fmt, pri, timestamp, iso, host or None, app, procid, None, None, message)
    if iso is None:
        record["malformed"] = f"RFC 3164 TIMESTAMP {_quote(timestamp)} is not a valid date"
    return record


def parse(data: bytes, now: float | None = None, *, truncated: bool = False) -> dict[str, Any]:
    """Parse one syslog message into the record fields from ``format`` to ``message``, plus
    ``malformed``, ``raw`` and ``raw_base64`` when it is malformed (see the module docstring).

    ``now`` (seconds since the epoch; default: the current time) dates RFC 3164 timestamps.
    ``truncated``: ``data`` is the head of a longer message, so a UTF-8 sequence cut at its end
    is dropped rather than reported. Any caller may call it; it never raises on bad input.
    """
    body = data
    if body[-1:] == b"\n":
        body = body[:-2] if body[-2:] == b"\r\n" else body[:-1]
    elif body[-1:] == b"\0":
        body = body[:-1]
    skipped = 0
    if body[:1].isdigit():
        m = _OCTET_COUNT.match(body)
        if m is not None and int(m[1]) == len(body) - m.end():
            skipped = m.end()
            body = body[skipped:]
    reasons: list[str] = []
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        if truncated and exc.reason == "unexpected end of data":
            text = body[: exc.start].decode()
        else:
            reasons.append(
                f"not UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start + skipped}"
            )
            text = body.decode(errors="backslashreplace")
    pri: int | None = None
    record: dict[str, Any]
    if not text:
        reasons.append("empty message")
        record = _record(None, None, message="")
    elif text[0] != "<":
        reasons.append("no PRI: the message does not start with '<'")
        record = _record(None, None, message=text)
    else:
        end = text.find(">", 1, 5)
        digits = text[1:end]
        if end < 0:
            reasons.append("no PRI: no '>' within the first 5 characters")
        elif not (digits.isascii() and digits.isdigit()):
            reasons.append(f"PRI {_quote(text[: end + 1])} is not a number")
        elif len(digits) > 1 and digits[0] == "0":
            reasons.append(f"PRI {_quote(text[: end + 1])} has a leading zero")
        elif int(digits) > 191:
            reasons.append(f"PRI {int(digits)} is out of range 0..191")
        else:
            pri = int(digits)
        if pri is None:
            record = _record(None, None, message=text)
        else:
            rest = text[end + 1 :]
            try:
                if _VERSION.match(rest):
                    record = _parse_5424(rest, pri)
                elif (m := _BSD_TIMESTAMP.match(rest)) is not None:
                    record = _parse_bsd(rest, m, pri, now)
                    if "malformed" in record:
                        reasons.append(record.pop("malformed"))
                else:
                    record = _record("unstructured", pri, message=rest)
            except _Malformed as exc:
                reasons.append(str(exc))
                record = _record("rfc5424", pri, message=rest)
    if reasons:
        record["malformed"] = "; ".join(reasons)
        record["raw"] = data.decode(errors="backslashreplace")
        if reasons[0].startswith("not UTF-8"):
            record["raw_base64"] = base64.b64encode(data).decode()
    return record


def format_peer(peer: Any) -> str | None:
    """A socket address as text: ``host:port``, ``[v6]:port``, a path, or None (unbound)."""
    if isinstance(peer, tuple):
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if not peer:
        return None
    if isinstance(peer, bytes):  # Linux abstract namespace
        return peer.decode(errors="backslashreplace")
    return str(peer)


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class SyslogSink:
    """Parses messages, counts them and writes one JSON line per message.

    One sink is shared by every session of a server (:func:`build` creates it). ``output`` is
    a path (opened for append, created with mode 0640), an open descriptor (not closed by
    :meth:`close`), or None for standard output. ``clock`` gives wall-clock seconds for
    ``received`` and for dating RFC 3164 timestamps.

    Machines call :meth:`receive` and :meth:`receive_oversized`; the owner calls :meth:`close`.
    Anyone may read the counters (``received``, ``malformed``, ``too_long``, ``write_errors``)
    or :meth:`counts`. Subclasses may override :meth:`write_line` to send records elsewhere.
    Counters are per process: under a forking server each child counts its own.
    """

    def __init__(
        self,
        output: str | os.PathLike[str] | int | None = None,
        *,
        max_message: int = MAX_MESSAGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_message < 1:
            raise ValueError(f"max_message must be positive, not {max_message!r}")
        self.max_message = max_message
        self.clock = clock
        self.path: str | None = None
        if output is None:
            self.fd, self._owns_fd = 1, False
        elif isinstance(output, int):
            self.fd, self._owns_fd = output, False
        else:
            self.path = os.fspath(output)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self.fd, self._owns_fd = os.open(self.path, flags, 0o640), True
        self.received = 0
        self.malformed = 0
        self.too_long = 0
        self.write_errors = 0
        self._last_errno: int | None = None
        self._lock = threading.Lock()
        self._second: tuple[int, str] = (-1, "")

    def _received(self, now: float) -> str:
        """``now`` as ISO 8601 UTC with microseconds; the date and time formatted once a second."""
        second = int(now)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        return f"{cached[1]}.{int((now - second) * 1_000_000):06d}+00:00"

    def receive(
        self,
        message: bytes,
        peer: str | None,
        *,
        size: int | None = None,
        problem: str | None = None,
    ) -> dict[str, Any]:
        """Parse, count and write one message; return its record.

        ``size``: the message's real size when ``message`` is only its head (a stream cut it).
        ``problem``: a transport problem to report first in ``malformed``.
        """
        now = self.clock()
        limit = self.max_message
        if size is None and len(message) > limit:
            size = len(message)
            message = message[:limit]
        record: dict[str, Any] = {
            "received": self._received(now),
            "peer": peer,
        }
        fields = parse(message, now, truncated=size is not None)
        if problem is not None:
            fields["malformed"] = (
                problem + "; " + fields["malformed"] if "malformed" in fields else problem
            )
            fields.setdefault("raw", message.decode(errors="backslashreplace"))
        record.update(fields)
        if size is not None:
            record["truncated_from"] = size
        self._count(record)
        self.write_line(_encode(record).encode() + b"\n")
        return record

    def receive_oversized(self, size: int | None, limit: int, peer: str | None) -> dict[str, Any]:
        """Record a datagram too large to read (its content is lost, its size is at least
        ``size``); return the record."""
        record = {
            "received": self._received(self.clock()),
            "peer": peer,
            **_record(None, None),
            "malformed": f"datagram longer than {limit} bytes",
            "truncated_from": size,
        }
        self._count(record)
        self.write_line(_encode(record).encode() + b"\n")
        return record

    def _count(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.received += 1
            if "malformed" in record:
                self.malformed += 1
            if "truncated_from" in record:
                self.too_long += 1

    def write_line(self, line: bytes) -> None:
        """Write one record line with one ``os.write`` (more only after a short write). A
        failure is counted and logged (once per distinct error), never raised."""
        try:
            n = os.write(self.fd, line)
            while n < len(line):
                line = line[n:]
                n = os.write(self.fd, line)
        except OSError as exc:
            with self._lock:
                self.write_errors += 1
                first = exc.errno != self._last_errno
                self._last_errno = exc.errno
            if first:
                log.error("syslog record not written to %s: %s", self.path or self.fd, exc)

    def counts(self) -> dict[str, int]:
        """A snapshot of the counters."""
        with self._lock:
            return {
                "received": self.received,
                "malformed": self.malformed,
                "too_long": self.too_long,
                "write_errors": self.write_errors,
            }

    def close(self) -> None:
        """Close the output file if this sink opened it. Owners call it once, at the end."""
        if self._owns_fd:
            self._owns_fd = False
            os.close(self.fd)


_UNSET: Any = object()


@attrs.define
class SyslogReceiver(Machine):
    """Syslog over datagrams: every datagram is one message, written by the shared ``sink``.

    Stateless between datagrams, so every concurrency model may run it. Servers construct it
    through a factory such as ``functools.partial(SyslogReceiver, sink=sink)``.
    """

    #: each datagram stands alone, so a forking server may handle each in a new child
    per_peer_state: ClassVar[bool] = False

    sink: SyslogSink
    _peer_text: Any = attrs.field(init=False, default=_UNSET)

    receiving = State(
        Datagram(MAX_DATAGRAM),
        initial=True,
        doc="waiting for a datagram; each is one message, written as one JSON line",
    )

    def peer_text(self) -> str | None:
        """The peer as it appears in records (computed once per session)."""
        if self._peer_text is _UNSET:
            self._peer_text = format_peer(self.peer)
        return self._peer_text

    @receiving.on(Frame, to=receiving)
    def record(self, datagram: bytes) -> None:
        self.sink.receive(datagram, self.peer_text())

    @receiving.on(FrameTooLong, to=receiving)
    def record_oversized(self, exc: FrameTooLong) -> None:
        self.sink.receive_oversized(exc.size, exc.limit, self.peer_text())


class SyslogStreamFraming(Framing):
    """RFC 6587 framing; frames are ``(message bytes, real size or None)``.

    A frame starting with a digit and ``LEN SP`` (1 to 10 digits) is octet-counted; anything
    else is one line ending with ``\\n``. A message longer than the machine's
    ``sink.max_message`` yields its head with its real size; the rest is discarded as it
    arrives, using the machine's ``discard``, ``overflow`` and ``overflow_size``. Used as a
    state's framing; callers never call :meth:`cut` themselves.
    """

    __slots__ = ()
    max_size = MAX_MESSAGE

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> tuple[bytes, int | None] | None:
        data = buffer.data
        while machine.discard:
            n = min(machine.discard, len(data))
            if not n:
                return None
            del data[:n]
            buffer.scan = 0
            machine.discard -= n
        if machine.overflow is not None:
            i = data.find(b"\n")
            if i < 0:
                machine.overflow_size += len(data)
                data.clear()
                buffer.scan = 0
                return None
            frame = (machine.overflow, machine.overflow_size + i)
            machine.overflow = None
            del data[: i + 1]
            buffer.scan = 0
            return frame
        if not data:
            return None
        limit = machine.sink.max_message
        if 0x31 <= data[0] <= 0x39:
            sp = data.find(b" ", 0, 11)
            if sp > 0 and data[:sp].isdigit():
                length = int(data[:sp])
                start = sp + 1
                if length <= limit:
                    if len(data) < start + length:
                        return None
                    message = bytes(data[start : start + length])
                    del data[: start + length]
                    buffer.scan = 0
                    return message, None
                if len(data) < start + limit:
                    return None
                message = bytes(data[start : start + limit])
                del data[: start + limit]
                buffer.scan = 0
                machine.discard = length - limit
                return message, length
            if sp < 0 and len(data) < 11 and data.isdigit():
                return None  # the count is still arriving
        i = data.find(b"\n", buffer.scan)
        if i < 0:
            n = len(data)
            if n > limit:
                machine.overflow = bytes(data[:limit])
                machine.overflow_size = n
                data.clear()
            buffer.scan = len(data)
            return None
        end = i - 1 if i and data[i - 1] == 13 else i  # a CR before the LF is framing too
        if end > limit:
            frame: tuple[bytes, int | None] = (bytes(data[:limit]), end)
        else:
            frame = (bytes(data[:end]), None)
        del data[: i + 1]
        buffer.scan = 0
        return frame

    def describe(self) -> str:
        return "RFC 6587 frame (octet count or line)"


@attrs.define
class SyslogStreamReceiver(Machine):
    """Syslog over a stream (TCP, Unix stream): RFC 6587 frames, written by the shared ``sink``.

    Bytes after the last frame when the peer closes are recorded too: a last line without
    ``\\n`` as a message, a cut octet-counted message as malformed.
    """

    sink: SyslogSink
    #: bytes of an oversized octet-counted message still to discard
    discard: int = attrs.field(init=False, default=0)
    #: head of an oversized line whose end has not arrived, and the line's size so far
    overflow: bytes | None = attrs.field(init=False, default=None)
    overflow_size: int = attrs.field(init=False, default=0)
    _peer_text: Any = attrs.field(init=False, default=_UNSET)

    receiving = State(
        SyslogStreamFraming(),
        initial=True,
        doc="waiting for a message (octet-counted or a line); each is written as one JSON line",
    )

    def peer_text(self) -> str | None:
        """The peer as it appears in records (computed once per connection)."""
        if self._peer_text is _UNSET:
            self._peer_text = format_peer(self.peer)
        return self._peer_text

    @receiving.on(Frame, to=receiving)
    def record(self, frame: tuple[bytes, int | None]) -> None:
        self.sink.receive(frame[0], self.peer_text(), size=frame[1])

    @receiving.on(PeerClosed, to=receiving)
    def record_unterminated(self, event: PeerClosed) -> None:
        if self.overflow is not None:
            self.sink.receive(self.overflow, self.peer_text(), size=self.overflow_size)
            self.overflow = None
        rest = event.unterminated
        if not rest:
            return
        m = _OCTET_COUNT.match(rest)
        if m is not None and int(m[1]) > len(rest) - m.end():
            got = len(rest) - m.end()
            self.sink.receive(
                rest[m.end() :],
                self.peer_text(),
                problem=f"connection closed after {got} of {int(m[1])} octet-counted bytes",
            )
        else:
            self.sink.receive(rest, self.peer_text())


def build(
    datagram: bool = False,
    output: str | None = None,
    max_message: int = MAX_MESSAGE,
    *,
    sink: SyslogSink | None = None,
) -> Callable[[], Machine]:
    """The factory a server takes: datagram or stream receivers sharing one sink, created here
    (writing to ``output``, standard output by default) unless ``sink`` is given. The sink is
    the factory's ``keywords["sink"]``."""
    if sink is None:
        sink = SyslogSink(output, max_message=max_message)
    cls = SyslogReceiver if datagram else SyslogStreamReceiver
    return functools.partial(cls, sink=sink)


SERVICE = Service(
    name="syslog",
    summary="syslog receiver (RFC 3164, RFC 5424, logger's local form) writing JSON lines",
    build=build,
    options=(
        Option("--output", "append one JSON line per message to FILE (default: standard output)"),
        Option(
            "--max-message",
            f"keep at most N bytes of a message, flagging longer ones (default {MAX_MESSAGE})",
            int,
            MAX_MESSAGE,
        ),
    ),
    stream=True,
    datagram=True,
    default_port=DEFAULT_PORT,
    connect_hint="logger -T -n {host} -P {port} hello",
    connect_hint_unix="logger -u {path} hello",
    connect_hint_datagram="logger -d -n {host} -P {port} hello",
    connect_hint_unix_datagram="logger -u {path} hello",
)
