"""The HTTP machine on real sockets, against real clients: curl and Python's http.client."""

from __future__ import annotations

import functools
import http.client
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from statemachines.http import HTTP, HTTPLimits, Site
from statemux import MultiplexingTCPServer
from statemux.testing import serving

BIG = bytes(range(256)) * 2000  # 512,000 bytes: streamed in pieces
MTIME = 1_000_000_000  # Sun, 09 Sep 2001 01:46:40 GMT

curl_missing = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_bytes(b"<h1>home</h1>\n")
    (www / "a.txt").write_bytes(b"hello\n")
    (www / "digits.txt").write_bytes(b"0123456789")
    (www / "big.bin").write_bytes(BIG)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret\n")
    (www / "escape").symlink_to(secret)
    for path in www.iterdir():
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return www


@pytest.fixture
def served(root: Path) -> Iterator[tuple[str, int, Site]]:
    site = Site(str(root), limits=HTTPLimits(file_piece=16 * 1024))
    server = MultiplexingTCPServer(("127.0.0.1", 0), functools.partial(HTTP, site=site))
    with serving(server) as (host, port):
        yield host, port, site


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        timeout=30,
        check=False,
    )


# -- curl -----------------------------------------------------------------------------------------------


@curl_missing
def test_curl_reuses_one_connection_for_two_urls(served: tuple[str, int, Site]) -> None:
    host, port, site = served
    base = f"http://{host}:{port}"
    result = curl("-v", f"{base}/a.txt", f"{base}/digits.txt")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello\n0123456789"
    assert b"Re-using existing connection" in result.stderr
    assert site.connections == 1
    assert site.requests == 2


@curl_missing
def test_curl_head(served: tuple[str, int, Site]) -> None:
    host, port, _ = served
    result = curl("--head", f"http://{host}:{port}/digits.txt")
    assert result.returncode == 0, result.stderr
    head = result.stdout.decode().lower()
    assert head.startswith("http/1.1 200 ok\r\n")
    assert "content-length: 10\r\n" in head
    assert "last-modified: sun, 09 sep 2001 01:46:40 gmt\r\n" in head
    assert head.endswith("\r\n\r\n")


@curl_missing
def test_curl_range(served: tuple[str, int, Site]) -> None:
    host, port, _ = served
    result = curl(
        "--range", "2-5", "--write-out", "\n%{http_code}", f"http://{host}:{port}/digits.txt"
    )
    assert result.stdout == b"2345\n206"
    result = curl("--range", "100000-100009", f"http://{host}:{port}/big.bin")
    assert result.stdout == BIG[100000:100010]
    result = curl(
        "--range",
        "20-",
        "--write-out",
        "%{http_code}",
        "-o",
        "/dev/null",
        f"http://{host}:{port}/digits.txt",
    )
    assert result.stdout == b"416"


@curl_missing
def test_curl_if_modified_since(served: tuple[str, int, Site]) -> None:
    host, port, _ = served
    url = f"http://{host}:{port}/a.txt"
    later = curl("-z", "Mon, 10 Sep 2001 00:00:00 GMT", "--write-out", "%{http_code}", url)
    assert later.stdout == b"304"
    earlier = curl("-z", "Sat, 08 Sep 2001 00:00:00 GMT", "--write-out", "%{http_code}", url)
    assert earlier.stdout == b"hello\n200"


@curl_missing
def test_curl_large_file_arrives_whole(served: tuple[str, int, Site]) -> None:
    host, port, _ = served
    result = curl(f"http://{host}:{port}/big.bin")
    assert result.returncode == 0, result.stderr
    assert result.stdout == BIG


@curl_missing
def test_curl_cannot_leave_the_root(served: tuple[str, int, Site]) -> None:
    host, port, _ = served
    for path, code in [
        ("/../secret.txt", b"403"),
        ("/%2e%2e/secret.txt", b"403"),
        ("/escape", b"403"),
    ]:
        result = curl(
            "--path-as-is",
            "--write-out",
            "%{http_code}",
            "-o",
            "/dev/null",
            f"http://{host}:{port}{path}",
        )
        assert result.stdout == code, path


@curl_missing
def test_curl_posts_with_100_continue_and_chunked(served: tuple[str, int, Site]) -> None:
    host, port, _ = served
    url = f"http://{host}:{port}/echo"
    payload = "x" * 5000
    result = curl("-v", "-H", "Expect: 100-continue", "--data-binary", payload, url)
    assert result.stdout == payload.encode()
    assert b"HTTP/1.1 100 Continue" in result.stderr
    result = curl("-H", "Transfer-Encoding: chunked", "--data-binary", "chunky", url)
    assert result.stdout == b"chunky"


# -- http.client ----------------------------------------------------------------------------------------


def test_http_client_keeps_the_connection(served: tuple[str, int, Site]) -> None:
    host, port, site = served
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        bodies = []
        for path in ("/a.txt", "/digits.txt", "/big.bin", "/a.txt"):
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 200
            bodies.append(response.read())
            assert not response.will_close
        assert bodies == [b"hello\n", b"0123456789", BIG, b"hello\n"]
        conn.request("HEAD", "/big.bin")
        response = conn.getresponse()
        assert (response.status, response.getheader("Content-Length"), response.read()) == (
            200,
            str(len(BIG)),
            b"",
        )
    finally:
        conn.close()
    assert site.connections == 1
    assert site.requests == 5


def test_http_client_posts_to_echo(served: tuple[str, int, Site]) -> None:
    host, port, site = served
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", "/echo", body=b"with length", headers={"Content-Type": "text/x"})
        response = conn.getresponse()
        assert (response.status, response.read(), response.getheader("Content-Type")) == (
            200,
            b"with length",
            "text/x",
        )
        conn.request(
            "PUT", "/echo", body=iter([b"chunked ", b"in ", b"pieces"]), encode_chunked=True
        )
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"chunked in pieces")
        conn.request("GET", "/echo")
        response = conn.getresponse()
        assert (response.status, response.getheader("Allow")) == (405, "POST, PUT, OPTIONS")
        response.read()
        conn.request("GET", "/_status")
        status = response = conn.getresponse()
        assert status.status == 200
        assert b"requests: 4\n" in status.read()
    finally:
        conn.close()
    assert site.connections == 1


# -- raw sockets: pipelining, half-close ----------------------------------------------------------------


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_pipelined_requests_behind_a_large_file(served: tuple[str, int, Site]) -> None:
    host, port, _ = served
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /digits.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        data = read_all(sock)
    big_end = data.index(b"\r\n\r\n") + 4 + len(BIG)
    assert data[big_end - len(BIG) : big_end] == BIG
    rest = data[big_end:]
    assert rest.count(b"HTTP/1.1 200 OK") == 2
    # the two small responses, in order, after the last byte of the file
    assert b"\r\n\r\nhello\nHTTP/1.1 200 OK" in rest
    assert rest.endswith(b"\r\nConnection: close\r\n\r\n0123456789")


def test_half_closed_client_still_gets_the_whole_large_file(served: tuple[str, int, Site]) -> None:
    host, port, _ = served
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = read_all(sock)
    assert data.endswith(BIG)
    assert b"\r\nConnection: close\r\n" in data[: data.index(b"\r\n\r\n") + 2]


def test_malformed_request_gets_400_and_eof(served: tuple[str, int, Site]) -> None:
    host, port, _ = served
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost : t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert data.count(b"HTTP/1.1") == 1
