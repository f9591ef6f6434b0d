"""The results table, the targets, and the files a run writes (Markdown and JSON).

Targets are reported, never asserted: each is *reached* or *not reached* with the measured
ratio, or *n/a* when a figure it needs is missing (a model not available, a step that failed).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from .runner import Row

__all__ = ["Target", "evaluate", "table", "targets_table", "find", "to_json", "WORKLOAD_TITLES"]

WORKLOAD_TITLES = {
    "http": "HTTP GET keep-alive",
    "resp": "RESP PING/SET/GET",
    "resp-p16": "RESP pipelined -P 16",
}


@attrs.frozen
class Target:
    """One performance target and what this run measured for it."""

    name: str
    text: str
    status: str  # "reached", "not reached", "n/a"
    ratio: float | None = None
    detail: str = ""
    #: the workload a profile of the multiplexing server would explain ("" for none)
    profile: str = ""


def find(rows: list[Row], workload: str, key: str, conns: int, idle: int = 0) -> Row | None:
    """The measured row of ``key`` on ``workload`` at ``conns`` active connections."""
    for row in rows:
        if (row.workload, row.key, row.conns, row.idle) == (workload, key, conns, idle):
            if row.cpu_us is not None or row.idle_bytes is not None:
                return row
    return None


def _ratio_target(
    name: str,
    text: str,
    a: Row | None,
    b: Row | None,
    attr: str,
    limit: float,
    at_most: bool,
    profile: str = "",
    names: tuple[str, str] = ("", ""),
) -> Target:
    va = getattr(a, attr, None) if a is not None else None
    vb = getattr(b, attr, None) if b is not None else None
    if not va or not vb:
        missing = [who for who, v in zip(names, (va, vb), strict=True) if not v]
        return Target(name, text, "n/a", None, "not measured: " + ", ".join(missing))
    ratio = va / vb
    ok = ratio <= limit if at_most else ratio >= limit
    sign = "≤" if at_most else "≥"
    unit, spec = ("µs", ",.1f") if attr == "cpu_us" else ("req/s", ",.0f")
    detail = f"{va:{spec}} vs {vb:{spec}} {unit}: {ratio:.2f}× (target {sign} {limit:g}×)"
    return Target(
        name, text, "reached" if ok else "not reached", ratio, detail, "" if ok else profile
    )


def evaluate(rows: list[Row], idle: int, active: int = 100, mode: str = "quick") -> list[Target]:
    """Evaluate every target on ``rows`` (``idle``: the idle connections held in this mode)."""
    out = []
    http_mux = find(rows, "http", "multiplex", 50)
    out.append(
        _ratio_target(
            "T1a", "HTTP keep-alive, 50 conns: multiplex CPU/request ≤ 0.8 × asyncio",
            http_mux, find(rows, "http", "asyncio", 50), "cpu_us", 0.8, True, "http",
            ("multiplex http c=50", "asyncio http c=50"),
        )
    )  # fmt: skip
    out.append(
        _ratio_target(
            "T1b", "HTTP keep-alive, 50 conns: multiplex CPU/request ≤ uvloop",
            http_mux, find(rows, "http", "uvloop", 50), "cpu_us", 1.0, True, "http",
            ("multiplex http c=50", "uvloop http c=50"),
        )
    )  # fmt: skip
    p16 = find(rows, "resp-p16", "multiplex", 50)
    t2 = _ratio_target(
        "T2", "RESP pipelined -P 16: multiplex CPU/request ≤ 0.75 × asyncio",
        p16, find(rows, "resp-p16", "asyncio", 50), "cpu_us", 0.75, True, "resp-p16",
        ("multiplex resp-p16 c=50", "asyncio resp-p16 c=50"),
    )  # fmt: skip
    if p16 is not None and mode == "full" and p16.requests < 1_000_000:
        t2 = attrs.evolve(t2, detail=t2.detail + f"; only {p16.requests:,} requests (< 1,000,000)")
    out.append(t2)
    held = find(rows, "http", "multiplex", active, idle)
    if held is None or held.idle_bytes is None:
        out.append(Target("T3", f"≤ 1 KB RSS per idle connection ({idle:,} held)", "n/a"))
    else:
        b = held.idle_bytes
        out.append(
            Target(
                "T3",
                f"multiplex: ≤ 1 KB RSS per idle connection ({idle:,} held)",
                "reached" if b <= 1024 else "not reached",
                b / 1024,
                f"{b:,.0f} B per connection: {b / 1024:.2f}× (target ≤ 1×)",
            )
        )
    out.append(
        _ratio_target(
            "T4",
            f"multiplex CPU/request with {idle:,} idle held within 10% of none ({active} active)",
            held if held is not None and held.cpu_us else None,
            find(rows, "http", "multiplex", active), "cpu_us", 1.10, True, "http",
            (f"multiplex http c={active} + {idle} idle", f"multiplex http c={active}"),
        )
    )  # fmt: skip
    out.append(
        _ratio_target(
            "T5", "RESP -P 16: statemux threading ≥ 3 × stdlib ThreadingTCPServer req/s",
            find(rows, "resp-p16", "threading", 50),
            find(rows, "resp-p16", "stdlib-threading", 50), "rps", 3.0, False, "",
            ("threading resp-p16 c=50", "stdlib-threading resp-p16 c=50"),
        )
    )  # fmt: skip
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _conns(row: Row) -> str:
    if row.conns and row.idle:
        return f"{row.conns} + {row.idle:,} idle"
    if row.idle:
        return f"{row.idle:,} idle"
    return str(row.conns)


def table(rows: list[Row]) -> str:
    """The results as a Markdown table (readable as plain text too)."""
    head = [
        "workload", "server", "conns", "req/s", "p50 ms", "p99 ms", "CPU µs/req",
        "peak RSS MB", "B/idle conn", "load", "notes",
    ]  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(
            [
                r.workload,
                r.server,
                _conns(r),
                _fmt(r.rps, ",.0f"),
                _fmt(r.p50_ms, ".2f"),
                _fmt(r.p99_ms, ".2f"),
                _fmt(r.cpu_us, ".1f"),
                _fmt(r.peak_rss / 2**20 if r.peak_rss else None, ".1f")
                + ("*" if r.peak_is_pss else ""),
                _fmt(r.idle_bytes, ",.0f"),
                r.loadgen or "—",
                r.note,
            ]
        )
    text = _markdown(lines, right=range(2, 9))
    notes = []
    if any(r.peak_is_pss for r in rows):
        notes.append(
            "\\* peak of the tree's summed PSS while it had forked children (pages shared "
            "with the parent counted once); otherwise peak RSS is the server's VmHWM."
        )
    if any("other work" in r.note for r in rows):
        notes.append(
            "'other work N%': the server's CPU spent N% of the run on other processes; "
            "its req/s and latency are unreliable, CPU µs/req less so."
        )
    if any(" runs " in r.note for r in rows):
        notes.append(
            "'N runs a–b µs': measured N times; the row is the run with the median CPU "
            "per request, a–b the range."
        )
    return text + "".join("\n\n" + n for n in notes)


def targets_table(targets: list[Target]) -> str:
    lines = [["", "target", "result", "measured"]]
    for t in targets:
        mark = {"reached": "reached", "not reached": "NOT reached"}.get(t.status, "n/a")
        lines.append([t.name, t.text, mark, t.detail or "—"])
    return _markdown(lines, right=())


def _markdown(lines: list[list[str]], right: Any) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    right = set(right)

    def fmt(line: list[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)
    ) + "|"  # fmt: skip
    return "\n".join([fmt(lines[0]), rule, *(fmt(line) for line in lines[1:])])


def to_json(
    rows: list[Row],
    targets: list[Target],
    environment: dict[str, Any],
    hotspots: list[Any],
    profiles: dict[str, Any] | None = None,
) -> str:
    """Everything a run measured, for other tools."""
    return json.dumps(
        {
            "environment": environment,
            "rows": [attrs.asdict(r) for r in rows],
            "targets": [attrs.asdict(t) for t in targets],
            "hotspots": hotspots,
            "profiles": profiles or {},
        },
        indent=2,
    )
