"""The syslog receiver in memory: the parser's tables, datagram and stream machines, the sink."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from statemachines import syslog
from statemachines.syslog import (
    DEFAULT_PORT,
    MAX_DATAGRAM,
    MAX_MESSAGE,
    SERVICE,
    SyslogReceiver,
    SyslogSink,
    SyslogStreamReceiver,
    build,
    format_peer,
    parse,
)
from statemux import CloseReason
from statemux.testing import SimConnection, Simulator, chunkings, random_chunkings

# Wall clock of every test: 24 Nov 2026, noon, local time (RFC 3164 years are read from it).
NOW = time.mktime((2026, 11, 24, 12, 0, 0, 0, 0, -1))
RECEIVED = dt.datetime.fromtimestamp(NOW, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")

FACILITIES = (
    "kern user mail daemon auth syslog lpr news uucp cron authpriv ftp ntp security console "
    "solaris-cron local0 local1 local2 local3 local4 local5 local6 local7"
).split()
SEVERITIES = "emerg alert crit err warning notice info debug".split()


def fields(fmt: str | None = None, pri: int | None = None, **kw: Any) -> dict[str, Any]:
    """The record fields ``parse`` returns, None where not given."""
    out: dict[str, Any] = {
        "format": fmt,
        "pri": pri,
        "facility": None if pri is None else pri >> 3,
        "facility_name": None if pri is None else FACILITIES[pri >> 3],
        "severity": None if pri is None else pri & 7,
        "severity_name": None if pri is None else SEVERITIES[pri & 7],
        "timestamp": None,
        "time": None,
        "host": None,
        "app": None,
        "procid": None,
        "msgid": None,
        "structured_data": None,
        "message": None,
    }
    extra = {k: kw.pop(k) for k in ("malformed", "raw", "raw_base64") if k in kw}
    unknown = set(kw) - set(out)
    assert not unknown, unknown
    out.update(kw)
    out.update(extra)
    return out


LOGGER_5424 = b'<13>1 2026-11-24T00:28:37.993521+00:00 vm root - - [timeQuality tzKnown="1" isSynced="0"] hello'
TIME_QUALITY = {"timeQuality": {"tzKnown": "1", "isSynced": "0"}}
BSD_TS = {"timestamp": "Nov 24 00:28:37", "time": "2026-11-24T00:28:37"}
RFC_SD = b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]'
RFC_SD_PARSED = {"exampleSDID@32473": {"iut": "3", "eventSource": "Application", "eventID": "1011"}}

WELL_FORMED = [
    # -- what util-linux logger 2.38 sends (captured from it) -------------------------------------
    ("logger -u", b"<13>Nov 24 00:28:37 root: hello",
     fields("local", 13, **BSD_TS, app="root", message="hello")),
    ("logger -u -i -t -p local3.warning", b"<156>Nov 24 00:28:37 mytag[4361]: hi there",
     fields("local", 156, **BSD_TS, app="mytag", procid="4361", message="hi there")),
    ("logger --rfc3164", b"<13>Nov 24 00:28:37 vm root: hello",
     fields("rfc3164", 13, **BSD_TS, host="vm", app="root", message="hello")),
    ("logger --rfc5424", LOGGER_5424,
     fields("rfc5424", 13, timestamp="2026-11-24T00:28:37.993521+00:00",
            time="2026-11-24T00:28:37.993521+00:00", host="vm", app="root",
            structured_data=TIME_QUALITY, message="hello")),
    ("logger --rfc5424 --msgid --sd-id",
     b'<13>1 2026-11-24T00:28:37.999118+00:00 vm app 77 ID47 [timeQuality tzKnown="1" '
     b'isSynced="0"][ex@32473 k="v"] hello sd',
     fields("rfc5424", 13, timestamp="2026-11-24T00:28:37.999118+00:00",
            time="2026-11-24T00:28:37.999118+00:00", host="vm", app="app", procid="77",
            msgid="ID47", structured_data={**TIME_QUALITY, "ex@32473": {"k": "v"}},
            message="hello sd")),
    ("logger --rfc5424=notq", b"<13>1 2026-11-24T00:28:38.009413+00:00 vm root - - - hello",
     fields("rfc5424", 13, timestamp="2026-11-24T00:28:38.009413+00:00",
            time="2026-11-24T00:28:38.009413+00:00", host="vm", app="root", message="hello")),
    ("logger -d --octet-count", b"95 " + LOGGER_5424,
     fields("rfc5424", 13, timestamp="2026-11-24T00:28:37.993521+00:00",
            time="2026-11-24T00:28:37.993521+00:00", host="vm", app="root",
            structured_data=TIME_QUALITY, message="hello")),
    ("logger multi-line", b"<13>1 - vm root 4553 - - a\nb",
     fields("rfc5424", 13, host="vm", app="root", procid="4553", message="a\nb")),
    # -- RFC 3164 ---------------------------------------------------------------------------------
    ("3164 RFC example", b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick",
     fields("rfc3164", 34, timestamp="Oct 11 22:14:15", time="2026-10-11T22:14:15",
            host="mymachine", app="su", message="'su root' failed for lonvick")),
    ("3164 space-padded day", b"<38>Oct  1 02:03:04 h sshd[77]: ok",
     fields("rfc3164", 38, timestamp="Oct  1 02:03:04", time="2026-10-01T02:03:04",
            host="h", app="sshd", procid="77", message="ok")),
    ("3164 unpadded day", b"<38>Oct 1 02:03:04 h sshd: ok",
     fields("rfc3164", 38, timestamp="Oct 1 02:03:04", time="2026-10-01T02:03:04",
            host="h", app="sshd", message="ok")),
    ("3164 tag with a path", b"<22>Nov 24 00:28:37 mail postfix/smtpd[1234]: connect from x",
     fields("rfc3164", 22, **BSD_TS, host="mail", app="postfix/smtpd", procid="1234",
            message="connect from x")),
    ("3164 IPv6 host", b"<13>Nov 24 00:28:37 2001:db8::1 app: x",
     fields("rfc3164", 13, **BSD_TS, host="2001:db8::1", app="app", message="x")),
    ("3164 no tag", b"<13>Nov 24 00:28:37 vm just some text",
     fields("rfc3164", 13, **BSD_TS, host="vm", message="just some text")),
    ("3164 empty pid", b"<13>Nov 24 00:28:37 tag[]: x",
     fields("local", 13, **BSD_TS, app="tag", message="x")),
    ("3164 tag, no message", b"<13>Nov 24 00:28:37 tag:",
     fields("local", 13, **BSD_TS, app="tag", message="")),
    ("3164 timestamp only", b"<13>Nov 24 00:28:37",
     fields("rfc3164", 13, **BSD_TS, message="")),
    ("3164 colons in message", b"<13>Nov 24 00:28:37 cron[9]: a: b: c",
     fields("local", 13, **BSD_TS, app="cron", procid="9", message="a: b: c")),
    ("3164 UTF-8 message", "<13>Nov 24 00:28:37 app: héllo ✓".encode(),
     fields("local", 13, **BSD_TS, app="app", message="héllo ✓")),
    # -- RFC 5424 (examples from section 6.5) ---------------------------------------------------
    ("5424 example 1 with BOM",
     b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - "
     b"\xef\xbb\xbf'su root' failed for lonvick on /dev/pts/8",
     fields("rfc5424", 34, timestamp="2003-10-11T22:14:15.003Z",
            time="2003-10-11T22:14:15.003000+00:00", host="mymachine.example.com", app="su",
            msgid="ID47", message="'su root' failed for lonvick on /dev/pts/8")),
    ("5424 example 2",
     b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time to make "
     b"the do-nuts.",
     fields("rfc5424", 165, timestamp="2003-08-24T05:14:15.000003-07:00",
            time="2003-08-24T05:14:15.000003-07:00", host="192.0.2.1", app="myproc",
            procid="8710", message="%% It's time to make the do-nuts.")),
    ("5424 example 3 with SD",
     b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 " + RFC_SD
     + b" \xef\xbb\xbfAn application event log entry...",
     fields("rfc5424", 165, timestamp="2003-10-11T22:14:15.003Z",
            time="2003-10-11T22:14:15.003000+00:00", host="mymachine.example.com",
            app="evntslog", msgid="ID47", structured_data=RFC_SD_PARSED,
            message="An application event log entry...")),
    ("5424 example 4 SD only",
     b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 " + RFC_SD
     + b'[examplePriority@32473 class="high"]',
     fields("rfc5424", 165, timestamp="2003-10-11T22:14:15.003Z",
            time="2003-10-11T22:14:15.003000+00:00", host="mymachine.example.com",
            app="evntslog", msgid="ID47",
            structured_data={**RFC_SD_PARSED, "examplePriority@32473": {"class": "high"}})),
    ("5424 all nil", b"<0>1 - - - - - -", fields("rfc5424", 0)),
    ("5424 empty MSG", b"<191>1 - h a p m - ",
     fields("rfc5424", 191, host="h", app="a", procid="p", msgid="m", message="")),
    ("5424 BOM only", b"<13>1 - - - - - - \xef\xbb\xbf", fields("rfc5424", 13, message="")),
    ("5424 UTF-8 without BOM", "<13>1 - - - - - - grüße".encode(),
     fields("rfc5424", 13, message="grüße")),
    ("5424 MSG starting with [", b"<13>1 - - - - - - [not sd]",
     fields("rfc5424", 13, message="[not sd]")),
    ("5424 SD escapes, repeats, empty",
     b'<13>1 - - - - - [x@1 a="q\\"u\\\\o\\]" a="2" e="" k="back\\slash" u="\xc3\xa9"] m',
     fields("rfc5424", 13, message="m",
            structured_data={"x@1": {"a": ['q"u\\o]', "2"], "e": "", "k": "back\\slash",
                                     "u": "é"}})),
    ("5424 unescaped ] in value", b'<13>1 - - - - - [a b="x]y"]',
     fields("rfc5424", 13, structured_data={"a": {"b": "x]y"}})),
    ("5424 SD-ID without params", b"<13>1 - - - - - [origin] x",
     fields("rfc5424", 13, structured_data={"origin": {}}, message="x")),
    ("5424 longest fields",
     b"<13>1 - " + b"h" * 255 + b" " + b"a" * 48 + b" " + b"p" * 128 + b" " + b"m" * 32 + b" -",
     fields("rfc5424", 13, host="h" * 255, app="a" * 48, procid="p" * 128, msgid="m" * 32)),
    ("5424 time without fraction", b"<13>1 2026-11-24T00:28:37+01:00 - - - - -",
     fields("rfc5424", 13, timestamp="2026-11-24T00:28:37+01:00",
            time="2026-11-24T00:28:37+01:00")),
    # -- no recognisable header: RFC 3164 section 4.3.3 keeps the rest as MSG --------------------
    ("Python SysLogHandler", b"<14>something happened\x00",
     fields("unstructured", 14, message="something happened")),
    ("unstructured digit", b"<13>1", fields("unstructured", 13, message="1")),
    ("unstructured ISO time", b"<13>2026-11-24T00:28:37Z host app: x",
     fields("unstructured", 13, message="2026-11-24T00:28:37Z host app: x")),
    ("PRI only", b"<13>", fields("unstructured", 13, message="")),
    # -- trailers senders add to datagrams -------------------------------------------------------
    ("trailing LF", b"<13>Nov 24 00:28:37 root: hello\n",
     fields("local", 13, **BSD_TS, app="root", message="hello")),
    ("trailing CRLF", b"<13>Nov 24 00:28:37 root: hello\r\n",
     fields("local", 13, **BSD_TS, app="root", message="hello")),
    ("trailing NUL", b"<13>Nov 24 00:28:37 root: hello\x00",
     fields("local", 13, **BSD_TS, app="root", message="hello")),
    ("one trailer only", b"<13>Nov 24 00:28:37 root: hello\n\n",
     fields("local", 13, **BSD_TS, app="root", message="hello\n")),
]  # fmt: skip


@pytest.mark.parametrize(("data", "expected"), [r[1:] for r in WELL_FORMED],
                         ids=[r[0] for r in WELL_FORMED])  # fmt: skip
def test_parse_well_formed(data: bytes, expected: dict[str, Any]) -> None:
    assert parse(data, NOW) == expected


def bad(reason: str, data: bytes, fmt: str | None = None, pri: int | None = None, **kw: Any) -> dict[str, Any]:  # fmt: skip
    """The fields of a malformed message: the reason and the raw text, plus ``kw``."""
    kw.setdefault("raw", data.decode(errors="backslashreplace"))
    return fields(fmt, pri, malformed=reason, **kw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


MALFORMED: list[tuple[str, bytes, dict[str, Any]]] = [
    ("empty", b"", bad("empty message", b"", message="")),
    ("only a trailer", b"\n", bad("empty message", b"\n", message="")),
    ("no PRI", b"hello", bad("no PRI: the message does not start with '<'", b"hello",
                             message="hello")),
    ("no PRI, 3164 header", b"Nov 24 00:28:37 vm app: x",
     bad("no PRI: the message does not start with '<'", b"Nov 24 00:28:37 vm app: x",
         message="Nov 24 00:28:37 vm app: x")),
    ("unclosed PRI", b"<13", bad("no PRI: no '>' within the first 5 characters", b"<13",
                                 message="<13")),
    ("PRI too many digits", b"<1234>x",
     bad("no PRI: no '>' within the first 5 characters", b"<1234>x", message="<1234>x")),
    ("empty PRI", b"<>x", bad("PRI '<>' is not a number", b"<>x", message="<>x")),
    ("letters in PRI", b"<ab>x", bad("PRI '<ab>' is not a number", b"<ab>x", message="<ab>x")),
    ("negative PRI", b"<-1>x", bad("PRI '<-1>' is not a number", b"<-1>x", message="<-1>x")),
    ("non-ASCII digit PRI", "<١٣>x".encode(),
     bad("PRI '<١٣>' is not a number", "<١٣>x".encode(), message="<١٣>x")),
    ("leading zero PRI", b"<013>x", bad("PRI '<013>' has a leading zero", b"<013>x",
                                        message="<013>x")),
    ("PRI 192", b"<192>x", bad("PRI 192 is out of range 0..191", b"<192>x", message="<192>x")),
    ("PRI 999", b"<999>x", bad("PRI 999 is out of range 0..191", b"<999>x", message="<999>x")),
    ("binary garbage", b"\xff\xfe\x00\x01",
     bad("not UTF-8: byte 0xff at offset 0; no PRI: the message does not start with '<'",
         b"\xff\xfe\x00\x01", message="\\xff\\xfe\x00\x01",
         raw_base64=b64(b"\xff\xfe\x00\x01"))),
    ("latin-1 in a 3164 message", b"<13>Nov 24 00:28:37 vm app: caf\xe9",
     bad("not UTF-8: byte 0xe9 at offset 31", b"<13>Nov 24 00:28:37 vm app: caf\xe9",
         "rfc3164", 13, **BSD_TS, host="vm", app="app", message="caf\\xe9",
         raw_base64=b64(b"<13>Nov 24 00:28:37 vm app: caf\xe9"))),
    ("not UTF-8 after an octet count", b"8 <13>x\xff\xff\xff",
     bad("not UTF-8: byte 0xff at offset 7", b"8 <13>x\xff\xff\xff", "unstructured", 13,
         message="x\\xff\\xff\\xff", raw_base64=b64(b"8 <13>x\xff\xff\xff"))),
    ("octet count not matching", b"9 <13>x",
     bad("no PRI: the message does not start with '<'", b"9 <13>x", message="9 <13>x")),
    # -- RFC 5424 header -------------------------------------------------------------------------
    ("5424 unsupported version", b"<13>2 - - - - - -",
     bad("RFC 5424 VERSION 2 is not supported (only 1)", b"<13>2 - - - - - -", "rfc5424", 13,
         message="2 - - - - - -")),
    ("5424 version only", b"<13>1 ",
     bad("RFC 5424 TIMESTAMP is empty", b"<13>1 ", "rfc5424", 13, message="1 ")),
    ("5424 header cut short", b"<13>1 - host",
     bad("RFC 5424 header has no APP-NAME", b"<13>1 - host", "rfc5424", 13,
         message="1 - host")),
    ("5424 no SD", b"<13>1 - h a p m",
     bad("RFC 5424 header has no STRUCTURED-DATA", b"<13>1 - h a p m", "rfc5424", 13,
         message="1 - h a p m")),
    ("5424 double space", b"<13>1 -  a p m -",
     bad("RFC 5424 HOSTNAME is empty", b"<13>1 -  a p m -", "rfc5424", 13,
         message="1 -  a p m -")),
    ("5424 empty SD", b"<13>1 - h a p m ",
     bad("RFC 5424 STRUCTURED-DATA is empty", b"<13>1 - h a p m ", "rfc5424", 13,
         message="1 - h a p m ")),
]  # fmt: skip

BAD_TIMES = [
    "2026-11-24 00:28:37",  # split by the space: TIMESTAMP is "2026-11-24"
    "2026-11-24t00:28:37Z",
    "2026-11-24T00:28:37z",
    "2026-11-24T00:28:37",
    "2026-13-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
    "2026-11-24T23:59:60Z",
    "2026-11-24T00:28:37.1234567Z",
    "26-11-24T00:28:37Z",
    "2026-11-24T00:28:37+0100",
]
for ts in BAD_TIMES:
    data = f"<13>1 {ts} h a p m -".encode()
    MALFORMED.append((
        f"5424 timestamp {ts}", data,
        bad(f"RFC 5424 TIMESTAMP {ts.split(' ')[0]!r} is not valid", data, "rfc5424", 13,
            message=data.decode()[4:]),
    ))  # fmt: skip

_HEADER_BAD = [
    ("host 256", b"<13>1 - " + b"h" * 256 + b" a p m -", "RFC 5424 HOSTNAME longer than 255 characters"),
    ("app 49", b"<13>1 - h " + b"a" * 49 + b" p m -", "RFC 5424 APP-NAME longer than 48 characters"),
    ("procid 129", b"<13>1 - h a " + b"p" * 129 + b" m -", "RFC 5424 PROCID longer than 128 characters"),
    ("msgid 33", b"<13>1 - h a p " + b"m" * 33 + b" -", "RFC 5424 MSGID longer than 32 characters"),
    ("non-ASCII app", "<13>1 - h ápp p m -".encode(), "RFC 5424 APP-NAME 'ápp' has characters outside ASCII 33..126"),
    ("control char host", b"<13>1 - h\x01 a p m -", "RFC 5424 HOSTNAME 'h\\x01' has characters outside ASCII 33..126"),
    ("SD garbage", b"<13>1 - h a p m x", "RFC 5424 STRUCTURED-DATA is neither '-' nor '[...]'"),
    ("nil SD glued", b"<13>1 - h a p m -x", "RFC 5424 STRUCTURED-DATA is not followed by a space"),
    ("SD glued to MSG", b'<13>1 - h a p m [a b="1"]x', "RFC 5424 STRUCTURED-DATA is not followed by a space"),
    ("SD no SD-ID", b"<13>1 - h a p m []", "RFC 5424 SD-ELEMENT has no SD-ID"),
    ("SD space before SD-ID", b"<13>1 - h a p m [ a]", "RFC 5424 SD-ELEMENT has no SD-ID"),
    ("SD not closed", b"<13>1 - h a p m [a", "RFC 5424 SD-ELEMENT 'a' is not closed by ']'"),
    ("SD not closed after param", b'<13>1 - h a p m [a b="1"', "RFC 5424 SD-ELEMENT 'a' is not closed by ']'"),
    ("SD param without value", b"<13>1 - h a p m [a b]", "RFC 5424 SD-PARAM in 'a' is not NAME=\"VALUE\" at ' b]'"),
    ("SD param unquoted", b"<13>1 - h a p m [a b=1]", "RFC 5424 SD-PARAM in 'a' is not NAME=\"VALUE\" at ' b=1]'"),
    ("SD double space", b'<13>1 - h a p m [a  b="1"]', "RFC 5424 SD-PARAM in 'a' is not NAME=\"VALUE\" at '  b=\"1\"]'"),
    ("SD value unterminated", b'<13>1 - h a p m [a b="1]', "RFC 5424 PARAM-VALUE of 'b' has no closing '\"'"),
    ("SD-ID twice", b"<13>1 - h a p m [a][a]", "RFC 5424 SD-ID 'a' appears twice"),
    ("SD-ID 33", b"<13>1 - h a p m [" + b"i" * 33 + b"]", "RFC 5424 SD-ID longer than 32 characters"),
    ("PARAM-NAME 33", b'<13>1 - h a p m [a ' + b"n" * 33 + b'="1"]', "RFC 5424 PARAM-NAME longer than 32 characters"),
]  # fmt: skip
for name, data, reason in _HEADER_BAD:
    MALFORMED.append(
        (f"5424 {name}", data, bad(reason, data, "rfc5424", 13, message=data.decode()[4:]))
    )

MALFORMED += [
    ("3164 Feb 30", b"<13>Feb 30 00:00:00 h app: x",
     bad("RFC 3164 TIMESTAMP 'Feb 30 00:00:00' is not a valid date",
         b"<13>Feb 30 00:00:00 h app: x", "rfc3164", 13, timestamp="Feb 30 00:00:00",
         host="h", app="app", message="x")),
    ("3164 hour 25", b"<13>Nov 24 25:00:00 app: x",
     bad("RFC 3164 TIMESTAMP 'Nov 24 25:00:00' is not a valid date",
         b"<13>Nov 24 25:00:00 app: x", "local", 13, timestamp="Nov 24 25:00:00",
         app="app", message="x")),
]  # fmt: skip


@pytest.mark.parametrize(("data", "expected"), [r[1:] for r in MALFORMED],
                         ids=[r[0] for r in MALFORMED])  # fmt: skip
def test_parse_malformed(data: bytes, expected: dict[str, Any]) -> None:
    assert parse(data, NOW) == expected


@pytest.mark.parametrize(
    ("pri", "facility", "severity"),
    [(0, "kern", "emerg"), (13, "user", "notice"), (34, "auth", "crit"),
     (85, "authpriv", "notice"), (99, "ntp", "err"), (111, "security", "debug"),
     (114, "console", "crit"), (126, "solaris-cron", "info"), (128, "local0", "emerg"),
     (156, "local3", "warning"), (191, "local7", "debug")],
)  # fmt: skip
def test_priority_names(pri: int, facility: str, severity: str) -> None:
    rec = parse(b"<%d>x" % pri, NOW)
    assert (rec["facility"], rec["severity"]) == (pri // 8, pri % 8)
    assert (rec["facility_name"], rec["severity_name"]) == (facility, severity)


@pytest.mark.parametrize(
    ("today", "stamp", "iso"),
    [
        ((2027, 1, 2), b"Dec 31 23:59:59", "2026-12-31T23:59:59"),  # last year's message
        ((2026, 12, 31), b"Jan  1 00:00:01", "2027-01-01T00:00:01"),  # the sender is ahead
        ((2026, 7, 1), b"Jan  1 00:00:00", "2026-01-01T00:00:00"),  # six months: same year
        ((2026, 7, 1), b"Dec 31 00:00:00", "2026-12-31T00:00:00"),
        ((2028, 3, 1), b"Feb 29 12:00:00", "2028-02-29T12:00:00"),  # a leap year
    ],
)
def test_rfc3164_year_is_the_nearest(today: tuple[int, int, int], stamp: bytes, iso: str) -> None:
    now = time.mktime((*today, 12, 0, 0, 0, 0, -1))
    rec = parse(b"<13>" + stamp + b" app: x", now)
    assert rec["time"] == iso and "malformed" not in rec


def test_parse_at_every_truncation_never_raises() -> None:
    """Every prefix of every table input parses to a record (malformed or not)."""
    for _, data, _ in WELL_FORMED + MALFORMED:
        for i in range(len(data) + 1):
            rec = parse(data[:i], NOW)
            assert set(fields()) <= set(rec)


def test_parse_random_garbage_never_raises() -> None:
    rng = random.Random(5424)
    alphabet = b'<>0123456789 -[]="\\:TZ.\xef\xbb\xbf\xff\nabcNovJan'
    for _ in range(3000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        rec = parse(b"<13>1 " + data if rng.random() < 0.5 else data, NOW)
        assert set(fields()) <= set(rec)


def test_structured_data_fast_path_agrees_with_the_detailed_parser() -> None:
    """The one-regex-per-element path and the character-by-character one give the same result
    (or the detailed one names a problem) on random structured data."""
    rng = random.Random(6587)
    pieces = ["[", "]", " ", "a", "b@1", '="', '"', "=", "\\", '\\"', "\\]", "x", "é", "-"]
    for _ in range(5000):
        s = "[" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        try:
            slow: Any = syslog._parse_sd_slowly(s)
        except syslog._Malformed as exc:
            slow = str(exc)
        try:
            fast: Any = syslog._parse_sd(s)
        except syslog._Malformed as exc:
            fast = str(exc)
        assert fast == slow, s


@pytest.mark.parametrize(
    ("now", "received"),
    [
        (0.0, "1970-01-01T00:00:00.000000+00:00"),
        (1795000000.25, "2026-11-18T11:06:40.250000+00:00"),
        (1795000000.999999, "2026-11-18T11:06:40.999999+00:00"),
        (1795000001.5, "2026-11-18T11:06:41.500000+00:00"),
    ],
)
def test_received_is_utc_with_microseconds(tmp_path: Path, now: float, received: str) -> None:
    sink = SyslogSink(tmp_path / "r.jsonl", clock=lambda: now)
    assert sink.receive(b"<13>x", None)["received"] == received
    sink.close()


# -- the datagram machine -------------------------------------------------------------------------
class Harness:
    """A simulator of datagram or stream receivers writing to a file, with a fixed clock."""

    def __init__(
        self, path: Path, *, datagram: bool = True, max_message: int = MAX_MESSAGE
    ) -> None:
        self.path = path
        self.sink = SyslogSink(path, max_message=max_message, clock=lambda: NOW)
        self.sim = Simulator(build(datagram=datagram, sink=self.sink), raise_errors=True)
        self.read = 0

    def records(self) -> list[dict[str, Any]]:
        """Records written since the last call."""
        with open(self.path, "rb") as f:
            f.seek(self.read)
            data = f.read()
        self.read += len(data)
        assert data == b"" or data.endswith(b"\n")
        return [json.loads(line) for line in data.splitlines()]


def send_datagram(conn: SimConnection, data: bytes) -> None:
    conn.receive_datagram(data)
    conn.sim.run_ready()


MakeHarness = Callable[..., Harness]


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[MakeHarness]:
    """``make_harness(datagram=..., max_message=...)``; every sink is closed after the test."""
    made: list[Harness] = []

    def make(**kw: Any) -> Harness:
        h = Harness(tmp_path / f"syslog{len(made)}.jsonl", **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.sink.close()


@pytest.fixture
def harness(make_harness: MakeHarness) -> Harness:
    return make_harness()


def test_datagram_record_is_one_json_line(harness: Harness) -> None:
    conn = harness.sim.connect(("127.0.0.1", 40000))
    send_datagram(conn, b"<13>Nov 24 00:28:37 root: hello")
    with open(harness.path, "rb") as f:
        line = f.read()
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert list(json.loads(line)) == [
        "received", "peer", "format", "pri", "facility", "facility_name", "severity",
        "severity_name", "timestamp", "time", "host", "app", "procid", "msgid",
        "structured_data", "message",
    ]  # fmt: skip
    assert json.loads(line) == {
        "received": RECEIVED,
        "peer": "127.0.0.1:40000",
        **fields("local", 13, **BSD_TS, app="root", message="hello"),
    }
    assert conn.received() == b""  # syslog never replies
    assert harness.sink.counts() == {
        "received": 1,
        "malformed": 0,
        "too_long": 0,
        "write_errors": 0,
    }


def test_non_ascii_is_written_as_utf8(harness: Harness) -> None:
    conn = harness.sim.connect()
    send_datagram(conn, '<13>1 - - - - - - ✓ "quoted"\n\ttab'.encode())
    raw = harness.path.read_bytes()
    assert "✓".encode() in raw and b'\\"quoted\\"\\n\\ttab' in raw


def test_every_table_input_is_recorded_and_the_session_lives(harness: Harness) -> None:
    """Well-formed and malformed alike: one record each, counted, never closing the session."""
    conn = harness.sim.connect()
    table = WELL_FORMED + MALFORMED
    for _, data, _ in table:
        send_datagram(conn, data)
        assert not conn.closed and conn.state_name == "receiving"
    records = harness.records()
    assert [{k: v for k, v in r.items() if k not in ("received", "peer")} for r in records] == [
        expected for _, _, expected in table
    ]
    assert harness.sink.counts() == {
        "received": len(table), "malformed": len(MALFORMED), "too_long": 0, "write_errors": 0,
    }  # fmt: skip
    assert harness.sim.errors == []


@pytest.mark.parametrize(
    ("peer", "text"),
    [
        (("127.0.0.1", 514), "127.0.0.1:514"),
        (("::1", 5514, 0, 0), "[::1]:5514"),
        ("/tmp/client.sock", "/tmp/client.sock"),
        (b"\0abstract", "\x00abstract"),
        ("", None),
        (None, None),
    ],
)
def test_format_peer(peer: Any, text: str | None) -> None:
    assert format_peer(peer) == text


def test_unbound_unix_peer_is_null(harness: Harness) -> None:
    conn = harness.sim.connect(None)
    send_datagram(conn, b"<13>x")
    assert harness.records()[0]["peer"] is None


def test_message_longer_than_max_message_is_truncated_and_flagged(harness: Harness) -> None:
    conn = harness.sim.connect()
    head = b"<13>1 - h a - - - "
    data = head + b"x" * (MAX_MESSAGE + 100 - len(head))
    send_datagram(conn, data)
    (rec,) = harness.records()
    assert rec["truncated_from"] == MAX_MESSAGE + 100
    assert rec["message"] == "x" * (MAX_MESSAGE - len(head))
    assert "malformed" not in rec and rec["host"] == "h"
    assert harness.sink.counts()["too_long"] == 1 and harness.sink.counts()["malformed"] == 0


def test_message_of_exactly_max_message_is_whole(harness: Harness) -> None:
    conn = harness.sim.connect()
    data = b"<13>" + b"y" * (MAX_MESSAGE - 4)
    send_datagram(conn, data)
    (rec,) = harness.records()
    assert "truncated_from" not in rec and len(rec["message"]) == MAX_MESSAGE - 4


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_truncation_inside_a_utf8_character_is_not_malformed(harness: Harness, cut: int) -> None:
    """The head ends inside a 4-byte character: the partial character is dropped quietly."""
    conn = harness.sim.connect()
    head = b"<13>"
    pad = b"p" * (MAX_MESSAGE - len(head) - cut)
    send_datagram(conn, head + pad + "😀".encode() + b"tail")
    (rec,) = harness.records()
    assert "malformed" not in rec
    assert rec["message"] == pad.decode() and rec["truncated_from"] == MAX_MESSAGE - cut + 8


def test_truncated_5424_may_be_malformed_too(harness: Harness) -> None:
    conn = harness.sim.connect()
    data = b'<13>1 - h a - - [big v="' + b"v" * MAX_MESSAGE + b'"] msg'
    send_datagram(conn, data)
    (rec,) = harness.records()
    assert rec["malformed"] == "RFC 5424 PARAM-VALUE of 'v' has no closing '\"'"
    assert rec["truncated_from"] == len(data) and len(rec["raw"]) == MAX_MESSAGE
    assert harness.sink.counts() == {
        "received": 1,
        "malformed": 1,
        "too_long": 1,
        "write_errors": 0,
    }


def test_datagram_longer_than_max_datagram_is_recorded_without_content(harness: Harness) -> None:
    """The framing limit (what a datagram server reads at most) gives FrameTooLong: recorded."""
    conn = harness.sim.connect()
    send_datagram(conn, b"<13>" + b"z" * MAX_DATAGRAM)
    send_datagram(conn, b"<13>after")
    big, after = harness.records()
    assert big == {
        "received": RECEIVED,
        "peer": "127.0.0.1:40000",
        **fields(),
        "malformed": f"datagram longer than {MAX_DATAGRAM} bytes",
        "truncated_from": MAX_DATAGRAM + 4,
    }
    assert after["message"] == "after" and not conn.closed
    assert harness.sink.counts() == {
        "received": 2,
        "malformed": 1,
        "too_long": 1,
        "write_errors": 0,
    }


def test_random_datagrams_each_give_one_record(harness: Harness) -> None:
    rng = random.Random(3164)
    conn = harness.sim.connect()
    n = 400
    for _ in range(n):
        send_datagram(conn, rng.randbytes(rng.randint(0, 64)))
    assert len(harness.records()) == n and harness.sink.received == n
    assert not conn.closed and harness.sim.errors == []


def test_datagram_machine_takes_every_declared_edge(harness: Harness) -> None:
    conn = harness.sim.connect()
    send_datagram(conn, b"<13>x")
    send_datagram(conn, b"x" * (MAX_DATAGRAM + 1))
    assert harness.sim.stats.untaken(SyslogReceiver.spec) == []


def test_idle_datagram_session_closes_quietly(harness: Harness) -> None:
    conn = harness.sim.connect()
    send_datagram(conn, b"<13>x")
    harness.sim.advance(301)
    assert conn.close_reason is CloseReason.IDLE
    assert len(harness.records()) == 1


# -- the stream machine ---------------------------------------------------------------------------
STREAM = (
    b"<13>Nov 24 00:28:37 root: one\n"
    b"35 <13>Nov 24 00:28:37 root: two\nstill"
    b"<13>Nov 24 00:28:37 root: three\r\n"
    b"17 <13>1 - - - - - -"
    b"<13>Nov 24 00:28:37 root: four\n"
)
STREAM_MESSAGES = ["one", "two\nstill", "three", None, "four"]


@pytest.mark.parametrize("chunks", list(chunkings(STREAM)), ids=lambda c: f"{len(c)} chunks")
def test_stream_frames_octet_counted_and_lines_at_every_split(make_harness: MakeHarness, chunks: list[bytes]) -> None:  # fmt: skip
    h = make_harness(datagram=False)
    conn = h.sim.connect()
    for chunk in chunks:
        conn.send(chunk)
    assert [r["message"] for r in h.records()] == STREAM_MESSAGES
    assert not conn.closed and h.sink.malformed == 0


def test_stream_peer_closed_records_the_last_line_without_lf(make_harness: MakeHarness) -> None:  # fmt: skip
    h = make_harness(datagram=False)
    conn = h.sim.connect()
    conn.send(b"<13>Nov 24 00:28:37 root: one\n<13>Nov 24 00:28:37 root: last")
    conn.send_eof()
    assert [r["message"] for r in h.records()] == ["one", "last"]
    assert conn.close_reason is CloseReason.PEER_CLOSED and h.sink.malformed == 0


def test_stream_peer_closed_inside_an_octet_counted_message(make_harness: MakeHarness) -> None:
    h = make_harness(datagram=False)
    conn = h.sim.connect()
    conn.send(b"38 <13>Nov 24 00:28:37 root: cut")
    conn.send_eof()
    (rec,) = h.records()
    assert rec["malformed"] == "connection closed after 29 of 38 octet-counted bytes"
    assert rec["message"] == "cut" and rec["raw"] == "<13>Nov 24 00:28:37 root: cut"
    assert h.sink.malformed == 1


OVERSIZED = (
    b"80 <13>1 - - - - - - " + b"o" * 62  # octet-counted, 80 bytes
    + b"<13>1 - - - - - - " + b"l" * 70 + b"\n"  # a line of 88 bytes
    + b"<13>1 - - - - - - ok\n"
)  # fmt: skip


@pytest.mark.parametrize("chunks", [*chunkings(OVERSIZED), *random_chunkings(OVERSIZED, 30)])
def test_stream_oversized_messages_keep_their_head(
    make_harness: MakeHarness, chunks: list[bytes]
) -> None:
    h = make_harness(datagram=False, max_message=32)
    conn = h.sim.connect()
    for chunk in chunks:
        conn.send(chunk)
    first, second, third = h.records()
    assert (first["message"], first["truncated_from"]) == ("o" * 14, 80)
    assert (second["message"], second["truncated_from"]) == ("l" * 14, 88)
    assert third["message"] == "ok" and "truncated_from" not in third
    assert h.sink.counts() == {"received": 3, "malformed": 0, "too_long": 2, "write_errors": 0}


def test_stream_oversized_line_cut_by_eof_is_recorded(make_harness: MakeHarness) -> None:
    h = make_harness(datagram=False, max_message=16)
    conn = h.sim.connect()
    conn.send(b"<13>" + b"w" * 30)
    conn.send(b"w" * 10)
    conn.send_eof()
    (rec,) = h.records()
    assert (rec["message"], rec["truncated_from"]) == ("w" * 12, 44)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"12345678901 <13>x\n", "12345678901 <13>x"),  # 11 digits: not a count, a line
        (b"12abc\n", "12abc"),
        (b"0 <13>x\n", "0 <13>x"),  # a count never starts with 0
    ],
)
def test_stream_digits_that_are_not_an_octet_count_are_a_line(make_harness: MakeHarness, data: bytes, message: str) -> None:  # fmt: skip
    h = make_harness(datagram=False)
    conn = h.sim.connect()
    for ch in chunkings(data):
        for c in ch:
            conn.send(c)
    records = h.records()
    assert {r["message"] for r in records} == {message}
    assert all(r["malformed"] == "no PRI: the message does not start with '<'" for r in records)


def test_stream_machine_takes_every_declared_edge(make_harness: MakeHarness) -> None:
    h = make_harness(datagram=False)
    conn = h.sim.connect()
    conn.send(b"<13>x\n<13>y")
    conn.send_eof()
    assert h.sim.stats.untaken(SyslogStreamReceiver.spec) == []


# -- the sink ---------------------------------------------------------------------------------------
def test_output_is_appended_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"earlier":1}\n')
    sink = SyslogSink(path, clock=lambda: NOW)
    sink.receive(b"<13>x", None)
    sink.close()
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"earlier":1}' and json.loads(lines[1])["message"] == "x"


def test_new_output_file_is_not_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    SyslogSink(path).close()
    assert path.stat().st_mode & 0o007 == 0


def test_stdout_is_the_default(capfd: pytest.CaptureFixture[str]) -> None:
    sink = SyslogSink(clock=lambda: NOW)
    sink.receive(b"<13>Nov 24 00:28:37 root: to stdout", "127.0.0.1:9")
    out = capfd.readouterr().out
    assert json.loads(out)["message"] == "to stdout" and out.endswith("\n")
    sink.close()  # does not close standard output
    os.fstat(1)


def test_write_errors_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        sink = SyslogSink(fd)
        with caplog.at_level(logging.ERROR, logger="statemachines.syslog"):
            sink.receive(b"<13>x", None)
            sink.receive(b"<13>y", None)
        assert sink.counts() == {"received": 2, "malformed": 0, "too_long": 0, "write_errors": 2}
        assert len(caplog.records) == 1
        assert caplog.records[0].getMessage().startswith(f"syslog record not written to {fd}: ")
    finally:
        os.close(fd)


def test_a_failing_sink_does_not_close_the_session() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        sim = Simulator(build(datagram=True, sink=SyslogSink(fd)))
        conn = sim.connect()
        send_datagram(conn, b"<13>x")
        assert not conn.closed and sim.errors == []
    finally:
        os.close(fd)


@pytest.mark.parametrize("bad_limit", [0, -1])
def test_max_message_must_be_positive(bad_limit: int) -> None:
    with pytest.raises(ValueError, match=f"max_message must be positive, not {bad_limit}"):
        build(max_message=bad_limit)


LONG = b"<13>1 - h a - - - " + b"L" * 6000  # longer than PIPE_BUF: still one line


def _check_whole_lines(path: Path, expected: int) -> None:
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert len(lines) - 1 == expected
    for line in lines[:-1]:
        assert json.loads(line)["message"] == "L" * 6000


def test_threads_sharing_a_sink_write_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    sink = SyslogSink(path)
    threads = [
        threading.Thread(target=lambda: [sink.receive(LONG, None) for _ in range(100)])
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sink.close()
    _check_whole_lines(path, 800)
    assert sink.received == 800


def test_forked_processes_sharing_the_file_write_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    sink = SyslogSink(path)
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # the child writes and leaves without running the test's teardown
            try:
                for _ in range(100):
                    sink.receive(LONG, None)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    sink.close()
    _check_whole_lines(path, 400)
    assert sink.received == 0  # counters are per process


# -- the service ------------------------------------------------------------------------------------
def test_service_description(tmp_path: Path) -> None:
    assert SERVICE.name == "syslog" and SERVICE.stream and SERVICE.datagram
    assert SERVICE.default_port == DEFAULT_PORT == 5514
    assert {o.dest: o.default for o in SERVICE.options} == {
        "output": None, "max_message": MAX_MESSAGE,
    }  # fmt: skip
    path = tmp_path / "svc.jsonl"
    dgram = SERVICE.build(datagram=True, output=str(path), max_message=100)
    stream = SERVICE.build(datagram=False, output=str(path))
    assert dgram.func is SyslogReceiver and stream.func is SyslogStreamReceiver
    assert dgram.keywords["sink"].max_message == 100
    assert dgram.keywords["sink"] is not stream.keywords["sink"]
    one, two = dgram(), dgram()
    assert one.sink is two.sink  # every session shares the server's sink
    assert not SyslogReceiver.shares_memory and not SyslogStreamReceiver.shares_memory
    assert SERVICE.connect_hint_datagram.format(host="127.0.0.1", port=5514) == (
        "logger -d -n 127.0.0.1 -P 5514 hello"
    )
    dgram.keywords["sink"].close()
    stream.keywords["sink"].close()
