"""External load generators: command lines for ``wrk`` and ``redis-benchmark`` and parsers of
what they print.

``wrk`` is time-bounded (``-d``) and prints its latency distribution with ``--latency``.
``redis-benchmark`` is bounded by a request count, so the benchmark sizes ``-n`` from a short
calibration run to last about the asked duration, and kills it past a hard timeout.
"""

from __future__ import annotations

import csv
import io
import re
import shutil

__all__ = [
    "have",
    "wrk_command",
    "parse_wrk",
    "redis_benchmark_command",
    "parse_redis_benchmark",
    "RESP_TESTS",
    "parse_duration_ms",
]

#: redis-benchmark tests making up the RESP workload (PING in its multibulk form, SET, GET)
RESP_TESTS = ("ping_mbulk", "set", "get")

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def wrk_command(url: str, conns: int, seconds: int, threads: int = 1) -> list[str]:
    """``wrk`` for ``seconds`` (whole seconds: wrk takes no fractions) with ``conns``
    keep-alive connections; ``--latency`` prints the percentiles."""
    threads = max(1, min(threads, conns))
    return [
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, int(seconds))}s",
        "--latency", "--timeout", "10s", url,
    ]  # fmt: skip


def parse_duration_ms(text: str) -> float:
    """``'1.23ms'``, ``'456.00us'``, ``'1.2s'`` -> milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(output: str) -> dict[str, float | int]:
    """requests, elapsed, p50_ms, p99_ms and errors from ``wrk --latency`` output."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output)
    if not m:
        raise ValueError("wrk printed no 'N requests in T' line:\n" + output)
    result: dict[str, float | int] = {
        "requests": int(m.group(1)),
        "elapsed": parse_duration_ms(m.group(2) + m.group(3)) / 1000,
    }
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        pm = re.search(rf"^\s*{pct}%\s+(\S+)", output, re.M)
        result[key] = parse_duration_ms(pm.group(1)) if pm else 0.0
    errors = 0
    em = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if em:
        errors += sum(int(x) for x in em.groups())
    nm = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if nm:
        errors += int(nm.group(1))
    result["errors"] = errors
    return result


def redis_benchmark_command(
    port: int, conns: int, requests: int, pipeline: int = 1, tests: tuple[str, ...] = RESP_TESTS
) -> list[str]:
    """``redis-benchmark`` running ``tests`` one after the other, ``requests`` each."""
    return [
        "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(conns),
        "-n", str(requests), "-P", str(pipeline), "-t", ",".join(tests), "--csv",
    ]  # fmt: skip


def parse_redis_benchmark(output: str) -> list[dict[str, float | str]]:
    """One dict per test (test, rps, p50_ms, p99_ms) from ``redis-benchmark --csv``."""
    rows = []
    lines = [line for line in output.splitlines() if line.startswith('"')]
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        rows.append(
            {
                "test": row["test"],
                "rps": float(row["rps"]),
                "p50_ms": float(row.get("p50_latency_ms") or 0),
                "p99_ms": float(row.get("p99_latency_ms") or 0),
            }
        )
    if not rows:
        raise ValueError("redis-benchmark printed no CSV results:\n" + output)
    return rows
