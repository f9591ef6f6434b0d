"""The HTTP/1.1 machine in memory: transcripts split every way, malformed input, every limit,
static files, the built-in routes, and every explicit transition of its table."""

from __future__ import annotations

import functools
import os
import random
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from statemachines.http import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    HTTP,
    SERVICE,
    HTTPLimits,
    Site,
    build,
    parse_head,
)
from statemachines.http_site import http_date
from statemux import CloseReason
from statemux.testing import SimConnection, Simulator, chunkings, random_chunkings, transcript

BIG = random.Random(1).randbytes(300_000)
MTIME = 1_000_000_000  # Sun, 09 Sep 2001 01:46:40 GMT
MTIME_TEXT = "Sun, 09 Sep 2001 01:46:40 GMT"


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def parse_responses(data: bytes, methods: list[bytes] | None = None) -> list[Response]:
    """Split a byte stream into responses; ``methods[i]`` is the i-th request's method
    (a HEAD response has no body). Interim (1xx) responses are listed too."""
    out: list[Response] = []
    i = k = 0
    while i < len(data):
        end = data.index(b"\r\n\r\n", i)
        lines = data[i:end].decode("latin-1").split("\r\n")
        version, code, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), line
            headers[name.lower()] = value.strip()
        i = end + 4
        if status < 200:
            out.append(Response(status, headers, b""))
            continue
        method = methods[k] if methods is not None and k < len(methods) else b"GET"
        k += 1
        n = 0 if method == b"HEAD" or status in (204, 304) else int(headers["content-length"])
        body = data[i : i + n]
        assert len(body) == n, f"body cut short: {len(body)} of {n}"
        i += n
        out.append(Response(status, headers, body))
    return out


def one(data: bytes, method: bytes = b"GET") -> Response:
    (response,) = parse_responses(data, [method])
    return response


def undated(data: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*", b"Date: -", data)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_bytes(b"<h1>home</h1>\n")
    (www / "a.txt").write_bytes(b"hello\n")
    (www / "data.json").write_bytes(b'{"a": 1}\n')
    (www / "digits.txt").write_bytes(b"0123456789")
    (www / "with space.txt").write_bytes(b"spaced\n")
    (www / "big.bin").write_bytes(BIG)
    (www / "sub").mkdir()
    (www / "sub" / "index.html").write_bytes(b"sub index\n")
    (www / "empty").mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret\n")
    (www / "escape").symlink_to(secret)
    (www / "escape_dir").symlink_to(tmp_path)
    (www / "inner").symlink_to(www / "a.txt")
    os.mkfifo(www / "fifo")
    for path in www.iterdir():
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return www


def factory(root: Path, **limits: Any) -> functools.partial[HTTP]:
    return functools.partial(HTTP, site=Site(str(root), limits=HTTPLimits(**limits)))


def connect(root: Path, **limits: Any) -> tuple[Simulator, SimConnection]:
    sim = Simulator(factory(root, **limits), raise_errors=True)
    return sim, sim.connect()


def ask(root: Path, data: bytes, **limits: Any) -> tuple[bytes, SimConnection]:
    sim, conn = connect(root, **limits)
    conn.send(data)
    return conn.received(), conn


def get(path: str, *extra: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: test", *extra, "", ""]
    return "\r\n".join(lines).encode("latin-1")


# -- transcripts: whole, byte by byte, every split ------------------------------------------------


def test_get_is_answered_the_same_however_the_request_is_split(root: Path) -> None:
    request = get("/a.txt", "User-Agent: t")
    expected: bytes | None = None
    for chunks in [*chunkings(request), *random_chunkings(request)]:
        out, conn = transcript(factory(root), chunks, raise_errors=True)
        out = undated(out)
        if expected is None:
            expected = out
        assert out == expected, chunks
        assert not conn.closed
    assert expected is not None
    response = one(expected)
    assert response.status == 200
    assert response.body == b"hello\n"
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["content-length"] == "6"
    assert response.headers["last-modified"] == MTIME_TEXT
    assert response.headers["server"] == "statemux"
    assert response.headers["date"] == "-"
    assert "connection" not in response.headers


def test_head_has_the_headers_of_get_and_no_body(root: Path) -> None:
    for path in ("/a.txt", "/big.bin", "/missing", "/_status"):
        get_out, _ = ask(root, get(path))
        head_out, conn = ask(root, get(path, method="HEAD"))
        got, head = one(get_out), one(head_out, b"HEAD")
        assert head.status == got.status
        assert head.body == b""
        assert head.headers["content-length"] == got.headers["content-length"]
        assert not conn.closed
        assert head_out.endswith(b"\r\n\r\n")


def test_pipelined_requests_are_answered_in_order_however_they_arrive(root: Path) -> None:
    requests = (
        get("/a.txt")
        + get("/sub/", method="HEAD")
        + get("/missing")
        + b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        + b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n"
        + get("/digits.txt")
    )
    methods = [b"GET", b"HEAD", b"GET", b"POST", b"POST", b"GET"]
    for chunks in [[requests], *random_chunkings(requests, count=40)]:
        out, conn = transcript(factory(root), chunks, raise_errors=True)
        responses = parse_responses(out, methods)
        assert [r.status for r in responses] == [200, 200, 404, 200, 200, 200]
        assert [r.body for r in responses] == [
            b"hello\n",
            b"",
            responses[2].body,
            b"abc",
            b"xy",
            b"0123456789",
        ]
        assert responses[1].headers["content-length"] == "10"
        assert not conn.closed


def test_pipelined_byte_by_byte(root: Path) -> None:
    requests = get("/a.txt") + get("/digits.txt")
    out, _ = transcript(factory(root), [requests[i : i + 1] for i in range(len(requests))])
    assert [r.body for r in parse_responses(out)] == [b"hello\n", b"0123456789"]


def test_bare_lf_line_ends_and_leading_blank_lines_are_accepted(root: Path) -> None:
    out, conn = ask(
        root, b"\r\n\r\nGET /a.txt HTTP/1.1\nHost: t\n\nGET /digits.txt HTTP/1.1\r\nHost: t\n\r\n"
    )
    assert [r.body for r in parse_responses(out)] == [b"hello\n", b"0123456789"]


def test_chunked_body_is_echoed_however_it_is_split(root: Path) -> None:
    request = (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\nContent-Type: text/x\r\n\r\n"
        b"5;name=value\r\nhello\r\n1 \r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    for chunks in [*chunkings(request), *random_chunkings(request)]:
        out, conn = transcript(factory(root), chunks, raise_errors=True)
        response = one(out)
        assert response.status == 200, chunks
        assert response.body == b"hello 0123456789"
        assert response.headers["content-type"] == "text/x"
        assert not conn.closed


def test_content_length_body_is_echoed_however_it_is_split(root: Path) -> None:
    request = b"PUT /echo?x=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world" + get(
        "/a.txt"
    )
    for chunks in chunkings(request):
        out, _ = transcript(factory(root), chunks, raise_errors=True)
        echoed, after = parse_responses(out)
        assert echoed.body == b"hello world"
        assert echoed.headers["content-type"] == "application/octet-stream"
        assert after.body == b"hello\n"


# -- Expect: 100-continue ---------------------------------------------------------------------------


def test_100_continue_comes_before_the_body_is_read(root: Path) -> None:
    sim, conn = connect(root)
    conn.send(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n"
    )
    assert conn.received() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert conn.state_name == "body"
    conn.send(b"hello")
    assert one(conn.received()).body == b"hello"


def test_100_continue_for_a_chunked_body(root: Path) -> None:
    sim, conn = connect(root)
    conn.send(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert conn.received() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.send(b"3\r\nabc\r\n0\r\n\r\n")
    assert one(conn.received()).body == b"abc"


def test_expectation_of_a_refused_request_is_answered_at_once_and_closes(root: Path) -> None:
    out, conn = ask(
        root,
        b"POST /a.txt HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    response = one(out)
    assert response.status == 405
    assert response.headers["connection"] == "close"
    assert b"100 Continue" not in out
    assert conn.closed


def test_expect_without_a_body_needs_no_100(root: Path) -> None:
    out, conn = ask(
        root, b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n"
    )
    assert one(out).status == 200
    assert b"100 Continue" not in out


def test_expect_is_ignored_from_http_1_0(root: Path) -> None:
    out, _ = ask(
        root, b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
    )
    assert b"100 Continue" not in out
    assert one(out).body == b"hi"


# -- malformed input: one table, the exact status each gets -----------------------------------------

H = b"Host: t\r\n"
MALFORMED = [
    ("two-part request line", b"GET /\r\n" + H + b"\r\n", 400),
    ("double space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("tab separator", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("lower-case version", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("garbage version", b"GET / HTTP/one\r\n" + H + b"\r\n", 400),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 505),
    ("HTTP/0.9", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505),
    ("unknown method", b"BREW /pot HTTP/1.1\r\n" + H + b"\r\n", 501),
    ("lower-case method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 501),
    ("method not a token", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("control byte in target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target not a path", b"GET a.txt HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("asterisk with GET", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("missing Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Host fields", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("field without colon", b"GET / HTTP/1.1\r\n" + H + b"Bogus\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", 400),
    ("empty field name", b"GET / HTTP/1.1\r\n" + H + b": x\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n  continued\r\n\r\n", 400),
    ("bare CR in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r2\r\n\r\n", 400),
    ("NUL in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\x002\r\n\r\n", 400),
    ("DEL in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: \x7f\r\n\r\n", 400),
    (
        "conflicting Content-Length",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
    ),
    (
        "Content-Length not a number",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 1a\r\n\r\n",
        400,
    ),
    (
        "negative Content-Length",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
        400,
    ),
    ("Content-Length list", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 1, 1\r\n\r\nx", 400),
    ("empty Content-Length", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\n", 400),
    (
        "Content-Length with Transfer-Encoding",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    (
        "Transfer-Encoding in HTTP/1.0",
        b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    (
        "unknown transfer coding",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n",
        501,
    ),
    (
        "coding before chunked",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
        501,
    ),
    (
        "chunk size not hex",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nxyz\r\n",
        400,
    ),
    (
        "chunk size with 0x",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\n",
        400,
    ),
    (
        "chunk size signed",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n+5\r\n",
        400,
    ),
    (
        "empty chunk size",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n;x\r\n",
        400,
    ),
    (
        "chunk size of 17 digits",
        b"POST /echo HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"0" * 16
        + b"1\r\n",
        400,
    ),
    (
        "chunk data without CRLF",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXY",
        400,
    ),
    (
        "malformed trailer",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n",
        400,
    ),
    ("unknown expectation", b"GET / HTTP/1.1\r\n" + H + b"Expect: tea\r\n\r\n", 417),
]


@pytest.mark.parametrize(
    "request_bytes, status", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_requests_get_their_status_and_close(
    root: Path, request_bytes: bytes, status: int
) -> None:
    out, conn = ask(root, request_bytes + get("/a.txt"))
    response = one(out)  # the request after it is never answered
    assert response.status == status
    assert response.headers["connection"] == "close"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.body.startswith(b"%d " % status)
    assert conn.closed
    assert conn.close_reason is CloseReason.NORMAL


@pytest.mark.parametrize("name, request_bytes, status", MALFORMED[:6] + MALFORMED[32:38])
def test_malformed_requests_byte_by_byte(
    root: Path, name: str, request_bytes: bytes, status: int
) -> None:
    out, conn = transcript(
        factory(root), [request_bytes[i : i + 1] for i in range(len(request_bytes))]
    )
    assert one(out).status == status
    assert conn.closed


KEPT = [
    ("missing file", get("/nope.txt"), 404),
    ("POST to a file", b"POST /a.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi", 405),
    ("DELETE", get("/a.txt", method="DELETE"), 405),
    ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    ("GET /echo", get("/echo"), 405),
    ("HEAD /echo", get("/echo", method="HEAD"), 405),
    ("POST /_status", b"POST /_status HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405),
    ("range beyond the end", get("/digits.txt", "Range: bytes=10-"), 416),
    ("directory without slash", get("/sub"), 301),
    ("NUL in path", get("/a%00.txt"), 400),  # well framed: the connection can go on
]


@pytest.mark.parametrize("request_bytes, status", [k[1:] for k in KEPT], ids=[k[0] for k in KEPT])
def test_refusals_that_keep_the_connection(root: Path, request_bytes: bytes, status: int) -> None:
    method = request_bytes.split(b" ", 1)[0]
    out, conn = ask(root, request_bytes + get("/a.txt"))
    first, second = parse_responses(out, [method, b"GET"])
    assert first.status == status
    assert "connection" not in first.headers
    assert second.body == b"hello\n"
    assert not conn.closed


def test_405_names_what_is_allowed(root: Path) -> None:
    out, _ = ask(
        root, get("/echo") + get("/a.txt", method="PUT") + get("/_status", method="DELETE")
    )
    allows = [r.headers["allow"] for r in parse_responses(out)]
    assert allows == ["POST, PUT, OPTIONS", "GET, HEAD, OPTIONS", "GET, HEAD, OPTIONS"]


def test_options(root: Path) -> None:
    out, conn = ask(
        root,
        get("*", method="OPTIONS")
        + get("/echo", method="OPTIONS")
        + get("/a.txt", method="OPTIONS"),
    )
    responses = parse_responses(out)
    assert [r.status for r in responses] == [204, 204, 204]
    assert responses[0].headers["allow"] == "GET, HEAD, POST, PUT, OPTIONS"
    assert responses[1].headers["allow"] == "POST, PUT, OPTIONS"
    assert responses[2].headers["allow"] == "GET, HEAD, OPTIONS"
    assert "content-length" not in responses[0].headers
    assert not conn.closed


def test_error_to_head_has_no_body_and_the_next_request_still_parses(root: Path) -> None:
    out, conn = ask(root, get("/missing", method="HEAD") + get("/a.txt"))
    head, after = parse_responses(out, [b"HEAD", b"GET"])
    assert head.status == 404
    assert int(head.headers["content-length"]) > 0
    assert after.body == b"hello\n"


def test_peer_closing_mid_head_closes_quietly(root: Path) -> None:
    sim, conn = connect(root)
    conn.send(b"GET /a.txt HTTP/1.1\r\nHo")
    conn.send_eof()
    assert conn.received() == b""
    assert conn.close_reason is CloseReason.PEER_CLOSED


def test_peer_closing_after_pipelined_requests_gets_every_answer(root: Path) -> None:
    sim, conn = connect(root)
    conn.send(get("/a.txt") + get("/digits.txt"))
    conn.send_eof()
    assert [r.body for r in parse_responses(conn.received())] == [b"hello\n", b"0123456789"]
    assert conn.closed


# -- persistence -------------------------------------------------------------------------------------


def test_http_1_0_closes_unless_keep_alive_is_asked(root: Path) -> None:
    out, conn = ask(root, b"GET /a.txt HTTP/1.0\r\n\r\n" + get("/a.txt"))
    assert one(out).headers["connection"] == "close"
    assert conn.closed
    out, conn = ask(root, b"GET /a.txt HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert one(out).headers["connection"] == "keep-alive"
    assert not conn.closed


def test_connection_close_ends_after_the_response(root: Path) -> None:
    out, conn = ask(root, get("/a.txt", "Connection: TE, close") + get("/a.txt"))
    response = one(out)
    assert response.headers["connection"] == "close"
    assert conn.closed and conn.close_reason is CloseReason.NORMAL


def test_connection_header_mentioning_close_in_another_token_keeps(root: Path) -> None:
    out, conn = ask(root, get("/a.txt", "Connection: x-closed"))
    assert "connection" not in one(out).headers
    assert not conn.closed


# -- static files -------------------------------------------------------------------------------------

PATHS = [
    ("/a.txt", 200, b"hello\n"),
    ("/", 200, b"<h1>home</h1>\n"),
    ("/index.html", 200, b"<h1>home</h1>\n"),
    ("/sub/", 200, b"sub index\n"),
    ("/sub/./../a.txt", 200, b"hello\n"),
    ("/sub/%2e%2e/a.txt", 200, b"hello\n"),
    ("/with%20space.txt", 200, b"spaced\n"),
    ("/%61.txt", 200, b"hello\n"),
    ("/inner", 200, b"hello\n"),
    ("/a.txt?query=1", 200, b"hello\n"),
    ("http://test/a.txt", 200, b"hello\n"),
    ("/..", 403, None),
    ("/../secret.txt", 403, None),
    ("/%2e%2e/secret.txt", 403, None),
    ("/sub/../../secret.txt", 403, None),
    ("/..%2fsecret.txt", 403, None),
    ("/escape", 403, None),
    ("/escape_dir/secret.txt", 403, None),
    ("//etc/passwd", 404, None),
    ("/%2Fetc%2Fpasswd", 404, None),
    ("/empty/", 404, None),
    ("/a.txt/", 404, None),
    ("/fifo", 404, None),
    ("/missing/deeper", 404, None),
    ("/a%00.txt", 400, None),
]


@pytest.mark.parametrize("path, status, body", PATHS, ids=[p[0] for p in PATHS])
def test_paths_stay_inside_the_root(root: Path, path: str, status: int, body: bytes | None) -> None:
    out, _ = ask(root, get(path))
    response = one(out)
    assert response.status == status
    if body is not None:
        assert response.body == body
    else:
        assert b"secret" not in response.body


def test_directory_without_slash_redirects(root: Path) -> None:
    out, _ = ask(root, get("/sub") + get("/sub/.."))
    first, second = parse_responses(out)
    assert (first.status, first.headers["location"]) == (301, "/sub/")
    assert (second.status, second.headers["location"]) == (301, "/")


def test_content_types(root: Path) -> None:
    out, _ = ask(root, get("/") + get("/data.json") + get("/big.bin") + get("/with%20space.txt"))
    types = [r.headers["content-type"] for r in parse_responses(out)]
    assert types == ["text/html", "application/json", "application/octet-stream", "text/plain"]


@pytest.mark.parametrize(
    "since, status",
    [
        (MTIME_TEXT, 304),
        (http_date(MTIME + 3600), 304),
        (http_date(MTIME - 1), 200),
        ("Sunday, 09-Sep-01 01:46:40 GMT", 304),  # RFC 850 form
        ("not a date", 200),
    ],
)
def test_if_modified_since(root: Path, since: str, status: int) -> None:
    out, conn = ask(root, get("/a.txt", f"If-Modified-Since: {since}") + get("/digits.txt"))
    first, second = parse_responses(out)
    assert first.status == status
    if status == 304:
        assert first.body == b""
        assert "content-length" not in first.headers
        assert first.headers["last-modified"] == MTIME_TEXT
    assert second.body == b"0123456789"


def test_if_none_match_disables_if_modified_since(root: Path) -> None:
    out, _ = ask(root, get("/a.txt", f"If-Modified-Since: {MTIME_TEXT}", 'If-None-Match: "x"'))
    assert one(out).status == 200


@pytest.mark.parametrize(
    "spec, status, body, content_range",
    [
        ("bytes=0-3", 206, b"0123", "bytes 0-3/10"),
        ("bytes=4-", 206, b"456789", "bytes 4-9/10"),
        ("bytes=-3", 206, b"789", "bytes 7-9/10"),
        ("bytes=-30", 206, b"0123456789", "bytes 0-9/10"),
        ("bytes=8-100", 206, b"89", "bytes 8-9/10"),
        ("bytes=2-2", 206, b"2", "bytes 2-2/10"),
        ("bytes = 2-2", 200, b"0123456789", None),  # no spaces around "=" in the grammar
        ("bytes=10-", 416, None, "bytes */10"),
        ("bytes=10-20", 416, None, "bytes */10"),
        ("bytes=-0", 416, None, "bytes */10"),
        ("bytes=0-1,4-5", 200, b"0123456789", None),  # several ranges: the whole file
        ("bytes=5-2", 200, b"0123456789", None),  # malformed: ignored
        ("bytes=a-b", 200, b"0123456789", None),
        ("lines=1-2", 200, b"0123456789", None),
        ("bytes=", 200, b"0123456789", None),
    ],
)
def test_single_byte_ranges(
    root: Path, spec: str, status: int, body: bytes | None, content_range: str | None
) -> None:
    out, conn = ask(root, get("/digits.txt", f"Range: {spec}"))
    response = one(out)
    assert response.status == status
    if body is not None:
        assert response.body == body
    assert response.headers.get("content-range") == content_range
    assert not conn.closed


def test_range_is_ignored_for_head_and_with_if_range(root: Path) -> None:
    out, _ = ask(
        root,
        get("/digits.txt", "Range: bytes=0-1", method="HEAD")
        + get("/digits.txt", "Range: bytes=0-1", 'If-Range: "x"'),
    )
    head, full = parse_responses(out, [b"HEAD", b"GET"])
    assert (head.status, head.headers["content-length"]) == (200, "10")
    assert (full.status, full.body) == (200, b"0123456789")


def test_range_of_a_large_file_is_streamed(root: Path) -> None:
    out, _ = ask(
        root, get("/big.bin", "Range: bytes=1000-250999"), small_file_size=1000, file_piece=4096
    )
    response = one(out)
    assert response.status == 206
    assert response.headers["content-range"] == f"bytes 1000-250999/{len(BIG)}"
    assert response.body == BIG[1000:251000]


def test_small_range_of_a_large_file_is_sent_at_once(root: Path) -> None:
    sim, conn = connect(root, small_file_size=1000)
    conn.send(get("/big.bin", "Range: bytes=-5"))
    assert one(conn.received()).body == BIG[-5:]
    assert ("HTTP", "request_head", "frame", "sending_file") in sim.stats.transitions()


# -- large files: backpressure and pipelining behind them ---------------------------------------


def test_large_file_waits_for_the_reader_and_holds_back_pipelined_requests(root: Path) -> None:
    sim, conn = connect(root, file_piece=4096)
    conn.stop_reading(0)
    conn.send(get("/big.bin") + get("/a.txt"))
    assert conn.state_name == "sending_file"
    limits = sim.limits
    # Only what the last drain allowed is buffered, never the whole file.
    assert conn.buffered <= limits.output_low_water + 4096 + 512
    conn.resume_reading()
    big, small = parse_responses(conn.received())
    assert big.body == BIG
    assert big.headers["content-length"] == str(len(BIG))
    assert small.body == b"hello\n"
    assert conn.state_name == "request_head"


def test_large_file_is_sent_whole_to_a_fast_reader(root: Path) -> None:
    out, conn = ask(root, get("/big.bin"))
    assert one(out).body == BIG


def test_large_file_with_connection_close_closes_after_the_last_piece(root: Path) -> None:
    out, conn = ask(root, get("/big.bin", "Connection: close"))
    response = one(out)
    assert response.body == BIG
    assert response.headers["connection"] == "close"
    assert conn.closed and conn.close_reason is CloseReason.NORMAL


def test_large_file_that_shrinks_while_sent_aborts(root: Path) -> None:
    sim, conn = connect(root, file_piece=4096)
    conn.stop_reading(0)
    conn.send(get("/big.bin"))
    (root / "big.bin").write_bytes(b"short")
    conn.resume_reading()
    assert conn.closed
    assert conn.close_reason is CloseReason.ABORTED


def test_a_deleted_large_file_is_404(root: Path) -> None:
    sim, conn = connect(root)
    conn.send(get("/big.bin", method="HEAD"))
    assert one(conn.received(), b"HEAD").status == 200
    (root / "big.bin").unlink()
    conn.send(get("/big.bin"))  # still cached as a large file: opening it fails
    assert one(conn.received()).status == 404


# -- built-in routes -----------------------------------------------------------------------------------


def test_status_page_counts_connections_and_requests(root: Path) -> None:
    sim = Simulator(factory(root), raise_errors=True)
    first = sim.connect()
    first.send(get("/a.txt") + get("/a.txt"))
    first.send_eof()
    second = sim.connect()
    second.received()
    second.send(get("/_status"))
    text = one(second.received()).body.decode()
    fields = dict(line.split(": ") for line in text.splitlines())
    assert fields["connections"] == "2"
    assert fields["open_connections"] == "1"
    assert fields["requests"] == "3"
    assert float(fields["uptime_seconds"]) >= 0
    assert fields["pid"] == str(os.getpid())


def test_echo_returns_the_body_and_its_type(root: Path) -> None:
    out, _ = ask(
        root,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    )
    response = one(out)
    assert (response.status, response.body, response.headers["content-type"]) == (
        200,
        b"{}",
        "application/json",
    )


def test_get_with_a_body_reads_and_drops_it(root: Path) -> None:
    out, conn = ask(
        root,
        b"GET /a.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nJUNK" + get("/digits.txt"),
    )
    assert [r.body for r in parse_responses(out)] == [b"hello\n", b"0123456789"]


# -- Date ----------------------------------------------------------------------------------------------


def test_date_is_formatted_once_per_second(root: Path) -> None:
    now = [1_000_000_000.2]
    site = Site(str(root), wallclock=lambda: now[0])
    first = site.date_header()
    now[0] += 0.5
    assert site.date_header() is first
    assert first == b"Date: Sun, 09 Sep 2001 01:46:40 GMT\r\nServer: statemux\r\n"
    now[0] += 1
    assert site.date_header() == b"Date: Sun, 09 Sep 2001 01:46:41 GMT\r\nServer: statemux\r\n"


def test_every_response_has_date_and_server(root: Path) -> None:
    out, _ = ask(
        root,
        get("/a.txt")
        + get("/missing")
        + get("/echo")
        + get("/digits.txt", "Range: bytes=1-1")
        + b"BREW / HTTP/1.1\r\n\r\n",
    )
    responses = parse_responses(out)
    assert len(responses) == 5
    for response in responses:
        assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", response.headers["date"])
        assert response.headers["server"] == "statemux"


# -- limits: each has a default, a status, and a boundary ---------------------------------------------


def test_limit_defaults() -> None:
    limits = HTTPLimits()
    assert (limits.max_request_line, limits.max_header_line, limits.max_head_size) == (
        8192,
        8192,
        65536,
    )
    assert (limits.max_headers, limits.max_body, limits.max_chunk_line) == (100, 1 << 20, 1024)
    assert limits.max_requests_per_connection == 1000
    assert (limits.small_file_size, limits.file_piece) == (128 * 1024, 64 * 1024)
    assert (limits.cache_ttl, limits.cache_entries, limits.cache_bytes) == (1.0, 1024, 16 << 20)
    assert (HEADER_TIMEOUT, BODY_TIMEOUT) == (30.0, 60.0)
    with pytest.raises(ValueError, match="max_body must be positive"):
        HTTPLimits(max_body=0)


def test_request_line_limit_414(root: Path) -> None:
    line = b"GET /" + b"a" * 22 + b" HTTP/1.1"  # 36 bytes
    assert len(line) == 36
    out, conn = ask(root, line + b"\r\n" + H + b"\r\n", max_request_line=36)
    assert one(out).status == 404
    out, conn = ask(root, line + b"\r\n" + H + b"\r\n", max_request_line=35)
    response = one(out)
    assert response.status == 414
    assert b"request line longer than 35 bytes" in response.body
    assert conn.closed


def test_request_line_limit_414_before_the_line_ends(root: Path) -> None:
    sim, conn = connect(root, max_request_line=35)
    conn.send(b"GET /" + b"a" * 31)  # 36 bytes, no LF yet: not decided
    assert conn.received() == b""
    conn.send(b"a")  # 37 bytes without LF: even a CR next could not save it
    assert one(conn.received()).status == 414
    assert conn.closed


def test_header_line_limit_431(root: Path) -> None:
    field = b"X-Long: " + b"v" * 56  # 64 bytes
    out, _ = ask(root, get("/a.txt", field.decode()), max_header_line=64)
    assert one(out).status == 200
    out, conn = ask(root, get("/a.txt", field.decode() + "v"), max_header_line=64)
    response = one(out)
    assert response.status == 431
    assert b"header line longer than 64 bytes" in response.body
    assert conn.closed


def test_head_size_limit_431_whole_and_trickled(root: Path) -> None:
    request = get("/a.txt", "X-Pad: " + "p" * 40)
    size = len(request)
    out, _ = ask(root, request, max_head_size=size)
    assert one(out).status == 200
    out, conn = ask(root, request, max_head_size=size - 1)
    response = one(out)
    assert (response.status, conn.closed) == (431, True)
    assert b"request head longer than %d bytes" % (size - 1) in response.body
    out, conn = transcript(
        factory(root, max_head_size=size - 1), [request[i : i + 1] for i in range(size)]
    )
    assert one(out).status == 431


def test_header_count_limit_431(root: Path) -> None:
    fields = [f"X-{i}: {i}" for i in range(4)]  # with Host: 5
    out, _ = ask(root, get("/a.txt", *fields), max_headers=5)
    assert one(out).status == 200
    out, conn = ask(root, get("/a.txt", *fields, "X-4: 4"), max_headers=5)
    response = one(out)
    assert response.status == 431
    assert b"more than 5 header fields" in response.body
    assert conn.closed


def test_body_limit_413_content_length(root: Path) -> None:
    out, _ = ask(
        root, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n0123456789", max_body=10
    )
    assert one(out).body == b"0123456789"
    out, conn = ask(
        root,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n",
        max_body=10,
    )
    response = one(out)  # no 100 Continue first
    assert response.status == 413
    assert b"body longer than 10 bytes" in response.body
    assert conn.closed


def test_body_limit_413_chunked(root: Path) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    out, _ = ask(root, head + b"5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n", max_body=10)
    assert one(out).body == b"0123456789"
    out, conn = ask(root, head + b"5\r\n01234\r\n6\r\n", max_body=10)
    response = one(out)
    assert response.status == 413
    assert b"body longer than 10 bytes" in response.body
    assert conn.closed


def test_chunk_line_limit_400(root: Path) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    out, _ = ask(root, head + b"1;a=1234\r\nx\r\n0\r\n\r\n", max_chunk_line=8)
    assert one(out).body == b"x"
    out, conn = ask(root, head + b"1;a=12345\r\nx\r\n0\r\n\r\n", max_chunk_line=8)
    response = one(out)
    assert response.status == 400
    assert b"chunk-size line longer than 8 bytes" in response.body
    assert conn.closed
    out, conn = ask(root, head + b"1;a=123456", max_chunk_line=8)  # no LF yet
    assert one(out).status == 400


def test_trailer_limits_431(root: Path) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    out, _ = ask(root, head + b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n", max_headers=5)
    assert one(out).status == 200
    out, conn = ask(root, head + b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", max_headers=5)
    assert one(out).status == 431
    assert conn.closed
    out, conn = ask(root, head + b"A: " + b"1" * 30 + b"\r\n\r\n", max_header_line=32)
    response = one(out)
    assert response.status == 431
    assert b"trailer line longer than 32 bytes" in response.body


def test_requests_per_connection_limit(root: Path) -> None:
    out, conn = ask(root, get("/a.txt") * 4, max_requests_per_connection=3)
    responses = parse_responses(out)
    assert len(responses) == 3
    assert "connection" not in responses[1].headers
    assert responses[2].headers["connection"] == "close"
    assert conn.closed


def test_header_timeout_408_for_a_partial_head(root: Path) -> None:
    sim, conn = connect(root)
    conn.send(b"GET /a.txt HTTP/1.1\r\nHost")
    sim.advance(HEADER_TIMEOUT - 0.1)
    assert not conn.closed
    sim.advance(0.2)
    response = one(conn.received())
    assert response.status == 408
    assert b"request head not received within 30 s" in response.body
    assert conn.closed


def test_idle_persistent_connection_closes_without_a_response(root: Path) -> None:
    sim, conn = connect(root)
    sim.advance(HEADER_TIMEOUT)
    assert conn.received() == b""
    assert conn.closed and conn.close_reason is CloseReason.NORMAL


def test_a_connection_idle_after_a_head_that_came_in_pieces_still_closes_silently(
    root: Path,
) -> None:
    sim, conn = connect(root)
    head = get("/a.txt")
    conn.send(head[:10])  # a partial head...
    conn.send(head[10:])  # ...completed and answered: nothing is pending any more
    assert conn.received().startswith(b"HTTP/1.1 200 OK")
    sim.advance(HEADER_TIMEOUT)
    assert conn.received() == b""  # no 408: no request was under way
    assert conn.closed and conn.close_reason is CloseReason.NORMAL


def test_header_timeout_counts_from_the_last_response(root: Path) -> None:
    sim, conn = connect(root)
    sim.advance(20)
    conn.send(get("/a.txt"))  # answered at t=20: waiting for the next head starts then
    sim.advance(10)  # the state's timeout (t=30) finds only 10 s waited
    assert not conn.closed
    sim.advance(15)  # t=45
    conn.send(get("/a.txt"))
    sim.advance(5)  # t=50: the re-armed check finds 5 s waited
    assert not conn.closed
    sim.advance(HEADER_TIMEOUT - 5 - 0.1)
    assert not conn.closed
    sim.advance(0.2)
    assert conn.closed
    assert len(parse_responses(conn.received())) == 2


def test_body_timeout_408(root: Path) -> None:
    sim, conn = connect(root)
    conn.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01234")
    sim.advance(BODY_TIMEOUT)
    response = one(conn.received())
    assert response.status == 408
    assert b"request body not received within 60 s" in response.body
    assert conn.closed


@pytest.mark.parametrize(
    "partial", [b"", b"5\r\nab", b"0\r\nX-T: 1\r\n"], ids=["size", "data", "trailer"]
)
def test_chunked_body_timeout_408(root: Path, partial: bytes) -> None:
    sim, conn = connect(root)
    conn.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + partial)
    sim.advance(BODY_TIMEOUT)
    assert one(conn.received()).status == 408
    assert conn.closed


def test_small_files_are_cached_for_cache_ttl(root: Path) -> None:
    sim, conn = connect(root)
    conn.send(get("/a.txt"))
    assert one(conn.received()).body == b"hello\n"
    (root / "a.txt").write_bytes(b"changed\n")
    sim.advance(0.9)
    conn.send(get("/a.txt"))
    assert one(conn.received()).body == b"hello\n"
    sim.advance(0.2)
    conn.send(get("/a.txt"))
    assert one(conn.received()).body == b"changed\n"


def test_cache_is_bounded_by_entries_and_bytes(root: Path) -> None:
    paths = ["/a.txt", "/digits.txt", "/", "/data.json", "/missing", "/sub/"]
    sim, conn = connect(root, cache_entries=3)
    site = conn.machine.site  # type: ignore[attr-defined]
    for path in paths:
        conn.send(get(path))
        assert len(site.cache) <= 3
    sim, conn = connect(root, cache_bytes=20)
    site = conn.machine.site  # type: ignore[attr-defined]
    for path in paths:
        conn.send(get(path))
        assert site.cached_bytes <= 20
        assert site.cached_bytes == sum(len(e.body or b"") for e in site.cache.values())
    assert len(parse_responses(conn.received())) == len(paths)


# -- the table: every explicit transition taken ---------------------------------------------------


def test_every_explicit_transition_is_taken(root: Path) -> None:
    sim = Simulator(factory(root, small_file_size=1000), raise_errors=True)
    chunked = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
    scripts: list[tuple[bytes, float]] = [
        (get("/a.txt") + get("/a.txt", "Connection: close"), 0),
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx" + get("/big.bin"), 0),
        (b"GET /big.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx", 0),
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", 0),
        (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nx", BODY_TIMEOUT),
        (chunked + b"X-A: 1\r\n\r\n1\r\nx\r\n0\r\nT: 1\r\n\r\n", 0),
        (b"GET /big.bin HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0),
        (chunked + b"Connection: close\r\n\r\n0\r\n\r\n", 0),
        (chunked + b"\r\n" + b"1" * 2000 + b"\r\n", 0),
        (chunked + b"\r\nz\r\n", 0),
        (chunked + b"\r\n", BODY_TIMEOUT),
        (chunked + b"\r\n1\r\nxyz", 0),
        (chunked + b"\r\n1\r\n", BODY_TIMEOUT),
        (chunked + b"\r\n0\r\nX" + b"1" * 9000 + b"\r\n", 0),
        (chunked + b"\r\n0\r\nbad\r\n", 0),
        (chunked + b"\r\n0\r\n", BODY_TIMEOUT),
        (get("/big.bin", "Connection: close"), 0),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 0),
        (b"GET / HTTP/1.1\r\n\r\n", 0),
        (b"GET /\r\n\r\n", 0),
        (b"GET / HTT", HEADER_TIMEOUT),
    ]
    for data, wait in scripts:
        conn = sim.connect()
        conn.send(data)
        sim.advance(wait)
    conn = sim.connect()  # timer -> request_head, then timer -> closing
    sim.advance(20)
    conn.send(get("/a.txt"))
    sim.advance(10)
    sim.advance(15)
    conn.send(get("/a.txt"))
    sim.advance(5)
    sim.advance(HEADER_TIMEOUT)
    assert conn.closed
    assert sim.stats.untaken(HTTP.spec) == []


# -- the parser alone, and the service -----------------------------------------------------------------


def test_parse_head_joins_repeated_fields_and_lowers_names() -> None:
    req = parse_head(
        b"GET /x HTTP/1.1\nHost: h\nAccept: a\nACCEPT:  b \nContent-Length: 3\ncontent-length: 3\n",
        HTTPLimits(),
    )
    assert (req.method, req.target, req.http11) == (b"GET", b"/x", True)
    assert req.headers == {b"host": b"h", b"accept": b"a, b", b"content-length": b"3"}
    assert repr(req) == "<Request GET b'/x' HTTP/1.1>"


def test_service_builds_a_factory_for_its_root(root: Path) -> None:
    assert SERVICE.name == "http" and SERVICE.default_port == 8080
    assert SERVICE.stream and not SERVICE.datagram
    assert [o.dest for o in SERVICE.options] == ["root", "max_body"]
    assert (
        SERVICE.connect_hint.format(host="127.0.0.1", port=8080)
        == "curl -v http://127.0.0.1:8080/_status"
    )
    make = SERVICE.build(root=str(root), max_body=5)
    out, _ = transcript(make, [b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\n"])
    assert one(out).status == 413
    out, _ = transcript(make, [get("/a.txt")])
    assert one(out).body == b"hello\n"
    with pytest.raises(ValueError, match="streams only"):
        build(datagram=True)
    with pytest.raises(ValueError, match="not a directory"):
        build(root=str(root / "a.txt"))


def test_build_defaults_to_the_current_directory(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(root)
    out, _ = transcript(build(), [get("/digits.txt")])
    assert one(out).body == b"0123456789"


def test_status_counters_fall_when_connections_close(root: Path) -> None:
    sim = Simulator(factory(root))
    conns = [sim.connect() for _ in range(3)]
    site = conns[0].machine.site  # type: ignore[attr-defined]
    assert (site.connections, site.open_connections) == (3, 3)
    conns[0].send_eof()
    sim.advance(HEADER_TIMEOUT)
    assert (site.connections, site.open_connections) == (3, 0)
