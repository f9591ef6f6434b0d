"""The built-in load generator and the idle-connection holder: ``python -m statemux.bench.loadgen``.

``run``: closed-loop load from several processes (``--procs``), each driving its share of the
connections with non-blocking sockets and one selector. A connection sends one request (or a
batch of ``--pipeline`` requests), waits for every reply, records the round-trip latency, and
sends the next, until ``--duration`` seconds have passed. Prints one JSON object: requests,
elapsed seconds, errors, and a latency histogram in microseconds.

``idle``: opens ``--conns`` connections that never send, prints ``{"held": n}`` once all are
connected, and holds them until its standard input closes or it is killed.

Used when ``wrk``/``redis-benchmark`` are absent or ``--loadgen builtin`` is asked for; its own
CPU cost per request is close to the server's, so it is usually the bottleneck; the server's
CPU per request stays honest either way.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import sys
import time
from collections import Counter
from typing import Any

from .serve import raise_nofile

__all__ = [
    "http_request",
    "resp_batches",
    "count_http",
    "count_resp",
    "drive",
    "run",
    "hold_idle",
    "percentile",
    "main",
]

_EVENT_READ = selectors.EVENT_READ


def http_request(host: str, port: int, path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (path.encode(), host.encode(), port)


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def resp_batches(key: bytes, pipeline: int) -> list[bytes]:
    """Request batches cycling PING, SET key xxx, GET key; batch ``i`` starts at command
    ``i * pipeline`` of the cycle, so a connection sends ``batches[k % len(batches)]``."""
    cycle = [_resp(b"PING"), _resp(b"SET", key, b"xxx"), _resp(b"GET", key)]
    batches = []
    for start in range(3):
        batch = [cycle[(start * pipeline + j) % 3] for j in range(pipeline)]
        batches.append(b"".join(batch))
        if (start + 1) * pipeline % 3 == 0:
            break
    return batches


def count_http(buf: bytearray) -> tuple[int, int, bool]:
    """Remove the complete responses at the front of ``buf``; return (responses, non-2xx,
    whether the last one announced ``Connection: close``)."""
    n = bad = 0
    close = False
    while True:
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            return n, bad, close
        head = bytes(buf[:i]).lower()
        j = head.find(b"content-length:")
        length = 0
        if j >= 0:
            k = head.find(b"\r\n", j)
            length = int(head[j + 15 : k if k >= 0 else len(head)])
        end = i + 4 + length
        if len(buf) < end:
            return n, bad, close
        if head[9:10] != b"2":
            bad += 1
        close = b"connection: close" in head
        del buf[:end]
        n += 1


def count_resp(buf: bytearray) -> tuple[int, int, bool]:
    """Remove the complete simple replies at the front of ``buf``; return (replies, errors,
    False)."""
    n = bad = 0
    pos = 0
    size = len(buf)
    while pos < size:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            break
        kind = buf[pos]
        if kind == 36:  # '$' bulk
            length = int(buf[pos + 1 : eol])
            end = eol + 2 if length < 0 else eol + 4 + length
            if end > size:
                break
            pos = end
        else:
            if kind == 45:  # '-' error
                bad += 1
            pos = eol + 2
        n += 1
    del buf[:pos]
    return n, bad, False


class _Conn:
    __slots__ = ("sock", "buf", "expect", "sent_at", "k", "batches")

    def __init__(self, sock: socket.socket, batches: list[bytes]) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.expect = 0
        self.sent_at = 0.0
        self.k = 0
        self.batches = batches


def drive(
    host: str,
    port: int,
    workload: str,
    conns: int,
    duration: float,
    pipeline: int = 1,
    path: str = "/",
    start_at: float | None = None,
    tag: int = 0,
) -> dict[str, Any]:
    """Drive ``conns`` connections for ``duration`` seconds from this process. A connection
    the server closes (``Connection: close`` after its request limit, say) is replaced."""
    sel = selectors.DefaultSelector()
    clock = time.perf_counter
    http = workload == "http"
    counter = count_http if http else count_resp
    errors = reconnects = 0

    def connect(batches: list[bytes]) -> _Conn:
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        c = _Conn(sock, batches)
        sel.register(sock, _EVENT_READ, c)
        return c

    def send(c: _Conn, now: float) -> None:
        c.expect = pipeline
        c.sent_at = now
        c.sock.send(c.batches[c.k % len(c.batches)])
        c.k += 1

    def drop(c: _Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()

    live: list[_Conn] = []
    try:
        for i in range(conns):
            if http:
                batches = [http_request(host, port, path) * pipeline]
            else:
                batches = resp_batches(b"key:%d:%d" % (tag, i), pipeline)
            live.append(connect(batches))
        if start_at is not None:
            delay = start_at - time.time()
            if delay > 0:
                time.sleep(delay)  # allowed: every process starts sending at the same moment
        start = clock()
        deadline = start + duration
        for c in live:
            send(c, clock())
        hist: Counter[int] = Counter()
        done = 0
        last = start
        active = conns
        while active:
            if clock() > deadline + 10:  # replies stopped coming: give up on the stragglers
                errors += active
                break
            for key, _ in sel.select(1.0):
                c = key.data
                try:
                    data = c.sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                closing = False
                if data:
                    c.buf += data
                    n, bad, closing = counter(c.buf)
                    errors += bad
                    c.expect -= n
                    if c.expect > 0:
                        continue
                    now = clock()
                    hist[int((now - c.sent_at) * 1e6)] += 1
                    done += pipeline
                    last = now
                else:
                    errors += 1  # closed with replies outstanding
                    closing = True
                    now = clock()
                if now >= deadline:
                    drop(c)
                    active -= 1
                    continue
                try:
                    if closing:
                        drop(c)
                        c = connect(c.batches)
                        reconnects += 1
                    send(c, now)
                except OSError:
                    errors += 1
                    active -= 1
        return {
            "requests": done,
            "elapsed": last - start,
            "errors": errors,
            "reconnects": reconnects,
            "hist": {str(k): v for k, v in hist.items()},
        }
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()


def run(
    host: str,
    port: int,
    workload: str,
    conns: int,
    duration: float,
    pipeline: int = 1,
    path: str = "/",
    procs: int = 2,
) -> dict[str, Any]:
    """Drive ``conns`` connections from ``procs`` forked processes; merge their results."""
    procs = max(1, min(procs, conns))
    start_at = time.time() + 0.2 + 0.0005 * conns
    children = []
    for p in range(procs):
        share = conns // procs + (1 if p < conns % procs else 0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drive its share, report, exit without running parent cleanup
            os.close(r)
            status = 0
            try:
                result = drive(host, port, workload, share, duration, pipeline, path, start_at, p)
                payload = json.dumps(result).encode()
            except BaseException as exc:  # reported to the parent, which decides
                payload = json.dumps({"failed": repr(exc)}).encode()
                status = 1
            with os.fdopen(w, "wb") as out:
                out.write(payload)
            os._exit(status)
        os.close(w)
        children.append((pid, r))
    merged: dict[str, Any] = {
        "requests": 0, "elapsed": 0.0, "errors": 0, "reconnects": 0, "procs": procs,
    }  # fmt: skip
    hist: Counter[int] = Counter()
    failures = []
    for pid, r in children:
        with os.fdopen(r, "rb") as inp:
            data = inp.read()
        os.waitpid(pid, 0)
        result = json.loads(data or b'{"failed": "no result"}')
        if "failed" in result:
            failures.append(result["failed"])
            continue
        merged["requests"] += result["requests"]
        merged["errors"] += result["errors"]
        merged["reconnects"] += result["reconnects"]
        merged["elapsed"] = max(merged["elapsed"], result["elapsed"])
        hist.update({int(k): v for k, v in result["hist"].items()})
    if failures:
        merged["failed"] = "; ".join(failures)
    merged["p50_ms"] = percentile(hist, 50) / 1000
    merged["p99_ms"] = percentile(hist, 99) / 1000
    return merged


def percentile(hist: Counter[int] | dict[int, int], pct: float) -> float:
    """The ``pct`` percentile of a histogram ``{value: count}`` (0 when empty)."""
    total = sum(hist.values())
    if not total:
        return 0.0
    rank = pct / 100 * total
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return float(value)
    return float(max(hist))


def hold_idle(host: str, port: int, conns: int, batch: int = 500) -> list[socket.socket]:
    """Open ``conns`` connections, ``batch`` at a time (each batch connected before the next,
    so the listen backlog never overflows); return them."""
    held: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        while len(held) < conns:
            pending = []
            for _ in range(min(batch, conns - len(held))):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex((host, port))
                if err not in (0, errno.EINPROGRESS):
                    sock.close()
                    raise OSError(err, f"connect: {os.strerror(err)}")
                sel.register(sock, selectors.EVENT_WRITE)
                pending.append(sock)
            deadline = time.monotonic() + 30
            left = len(pending)
            while left:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{left} connections still pending after 30 s")
                for key, _ in sel.select(1.0):
                    sock = key.fileobj  # type: ignore[assignment]
                    sel.unregister(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, f"connect: {os.strerror(err)}")
                    left -= 1
            held.extend(pending)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    finally:
        sel.close()
    return held


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m statemux.bench.loadgen")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="closed-loop load; prints JSON")
    p_run.add_argument("--workload", choices=("http", "resp"), required=True)
    p_run.add_argument("--conns", type=int, default=10)
    p_run.add_argument("--duration", type=float, default=2.0)
    p_run.add_argument("--pipeline", type=int, default=1)
    p_run.add_argument("--path", default="/")
    p_run.add_argument("--procs", type=int, default=2)
    p_idle = sub.add_parser("idle", help="hold idle connections until stdin closes")
    p_idle.add_argument("--conns", type=int, required=True)
    for p in (p_run, p_idle):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cpus", default="")
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    raise_nofile()
    if args.command == "run":
        result = run(
            args.host, args.port, args.workload, args.conns, args.duration,
            args.pipeline, args.path, args.procs,
        )  # fmt: skip
        print(json.dumps(result), flush=True)
        return
    held = hold_idle(args.host, args.port, args.conns)
    print(json.dumps({"held": len(held)}), flush=True)
    sys.stdin.read()  # hold until the benchmark closes our stdin (or kills us)
    for sock in held:
        sock.close()


if __name__ == "__main__":
    main()
