"""Where the multiplexing server's time goes: read a cProfile dump of the server under load,
write the top functions to a text file, and rank the statemux functions by cost per request.

cProfile measures wall-clock time and slows Python code down (every call is timed), so
absolute figures are inflated; the shares are what to read. Time blocked in the selector
waiting for readiness is not work: it is shown on its own line and left out of the shares.
"""

from __future__ import annotations

import io
import os
import pstats
from typing import Any

__all__ = [
    "summarise", "by_file", "layers", "memory_per_connection", "LAYERS", "OWN_DIRS", "WAITING",
]  # fmt: skip

#: path fragments of the code whose hot spots are reported
OWN_DIRS = (f"{os.sep}statemux{os.sep}", f"{os.sep}statemachines{os.sep}")
#: builtins that block waiting for readiness (idle time, not work)
WAITING = (
    "<method 'poll' of 'select.epoll' objects>",
    "<method 'poll' of 'select.poll' objects>",
    "<built-in method select.select>",
)

Func = tuple[str, int, str]


def _name(func: Func) -> str:
    filename, line, name = func
    if filename == "~":
        return name  # a builtin, e.g. <method 'send' of '_socket.socket' objects>
    parts = filename.split(os.sep)
    short = os.sep.join(parts[-2:]) if len(parts) > 1 else filename
    return f"{short}:{line}({name})"


def _file(func: Func) -> str:
    filename = func[0]
    if filename == "~":
        return "builtins (C)"
    parts = filename.split(os.sep)
    return os.sep.join(parts[-2:]) if len(parts) > 1 else filename


#: layer -> path fragments (or builtin names) whose own time belongs to it; first match wins
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("socket calls", ("<method 'send' of", "<method 'recv' of", "<method 'sendall' of",
                      "<method 'recv_into' of", "<method '_accept' of")),
    ("event loop", (f"statemux{os.sep}loop.py", f"statemux{os.sep}timers.py", "selectors.py",
                    f"asyncio{os.sep}base_events.py", f"asyncio{os.sep}events.py",
                    "<method 'register' of 'select.epoll'", "<method 'modify' of 'select.epoll'",
                    "<method 'unregister' of 'select.epoll'")),
    ("connection / transport", (f"statemux{os.sep}connection.py", f"statemux{os.sep}multiplex.py",
                                f"statemux{os.sep}machine.py", f"statemux{os.sep}framing.py",
                                f"statemux{os.sep}host.py", f"asyncio{os.sep}selector_events.py",
                                f"asyncio{os.sep}transports.py")),
    ("machine / protocol", ("statemachines", f"bench{os.sep}machines.py", f"bench{os.sep}baselines.py")),
)  # fmt: skip


def layers(stats: dict[Func, Any]) -> dict[str, float]:
    """Own time per layer (socket calls, event loop, connection runner or transport, machine
    or protocol, other), waiting excluded."""
    totals = {name: 0.0 for name, _ in LAYERS}
    totals["other"] = 0.0
    for func, (_cc, _nc, tt, _ct, _callers) in stats.items():
        if func[0] == "~" and func[2] in WAITING:
            continue
        where = func[2] if func[0] == "~" else func[0]
        for name, fragments in LAYERS:
            if any(f in where for f in fragments):
                totals[name] += tt
                break
        else:
            totals["other"] += tt
    return totals


def by_file(stats: dict[Func, Any]) -> dict[str, float]:
    """Own time per source file (builtins together), waiting excluded."""
    totals: dict[str, float] = {}
    for func, (_cc, _nc, tt, _ct, _callers) in stats.items():
        if func[0] == "~" and func[2] in WAITING:
            continue
        key = _file(func)
        totals[key] = totals.get(key, 0.0) + tt
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def summarise(
    profile_path: str, out_path: str, requests: int, title: str, top: int = 40
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write the top ``top`` functions by own time, and own time per file, to ``out_path``.
    Return the statemux and statemachines functions and the builtins (socket calls…) ranked
    by own time, each with its share of the busy time and its cost per request; and a summary:
    the own µs per request of each layer (:func:`layers`) and the Python and builtin function
    calls per request."""
    ps = pstats.Stats(profile_path)
    raw: dict[Func, Any] = ps.stats  # type: ignore[attr-defined]
    waiting = sum(v[2] for f, v in raw.items() if f[0] == "~" and f[2] in WAITING)
    total = ps.total_tt  # type: ignore[attr-defined]
    busy = max(total - waiting, 1e-9)
    per = max(requests, 1)
    rows = sorted(
        ((v[2], v[3], v[1], f) for f, v in raw.items() if not (f[0] == "~" and f[2] in WAITING)),
        reverse=True,
    )
    buf = io.StringIO()
    buf.write(f"{title}\n")
    buf.write(
        f"{requests:,} requests; {total:.3f} s profiled, of which {waiting:.3f} s waiting in the\n"
        f"selector (left out below) and {busy:.3f} s busy. Times are inflated by the profiler;\n"
        "read the shares.\n\n"
    )
    buf.write(f"{'busy %':>6} {'own µs/req':>10} {'cum µs/req':>10} {'calls/req':>9}  function\n")
    for tt, ct, nc, func in rows[:top]:
        buf.write(
            f"{100 * tt / busy:6.1f} {tt / per * 1e6:10.2f} {ct / per * 1e6:10.2f} "
            f"{nc / per:9.2f}  {_name(func)}\n"
        )
    buf.write("\nOwn time per file:\n")
    for name, tt in by_file(raw).items():
        if tt / busy >= 0.002:
            buf.write(f"{100 * tt / busy:6.1f} % {tt / per * 1e6:8.2f} µs/req  {name}\n")
    per_layer = {k: v / per * 1e6 for k, v in layers(raw).items()}
    buf.write("\nOwn time per layer:\n")
    for name, us in per_layer.items():
        buf.write(f"{100 * us / (busy / per * 1e6):6.1f} % {us:8.2f} µs/req  {name}\n")
    python_calls = sum(v[1] for f, v in raw.items() if f[0] != "~") / per
    builtin_calls = sum(v[1] for f, v in raw.items() if f[0] == "~") / per
    buf.write(
        f"\nCalls per request: {python_calls:.1f} Python functions, {builtin_calls:.1f} builtins\n"
    )
    buf.write("\nFull listing (pstats, sorted by own time, waiting included):\n")
    pstats.Stats(profile_path, stream=buf).sort_stats("tottime").print_stats(top)
    with open(out_path, "w") as f:
        f.write(buf.getvalue())
    spots = []
    for tt, ct, nc, func in rows:
        if any(d in func[0] for d in OWN_DIRS) or func[0] == "~":
            spots.append(
                {
                    "function": _name(func),
                    "busy_pct": round(100 * tt / busy, 1),
                    "own_us_per_req": round(tt / per * 1e6, 3),
                    "cum_us_per_req": round(ct / per * 1e6, 3),
                    "calls_per_req": round(nc / per, 2),
                }
            )
    summary = {"layers": per_layer, "python_calls": python_calls, "builtin_calls": builtin_calls}
    return spots, summary


def memory_per_connection(
    before: str, after: str, n: int, out_path: str, title: str, top: int = 25
) -> list[dict[str, Any]]:
    """Compare two tracemalloc snapshots taken before and after ``n`` idle connections were
    accepted; write the allocation sites by bytes per connection to ``out_path`` and return
    them. tracemalloc sees Python's allocations only (not the kernel's socket buffers, nor
    allocator slack), so the sum is a little below the RSS growth."""
    import tracemalloc

    old = tracemalloc.Snapshot.load(before)
    new = tracemalloc.Snapshot.load(after)
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = new.filter_traces(ignore).compare_to(old.filter_traces(ignore), "lineno")
    total = sum(s.size_diff for s in stats)
    sites = []
    for s in stats:
        if s.size_diff <= 0:
            continue
        frame = s.traceback[0]
        parts = frame.filename.split(os.sep)
        where = f"{os.sep.join(parts[-2:])}:{frame.lineno}"
        sites.append(
            {
                "site": where,
                "bytes_per_conn": round(s.size_diff / n, 1),
                "blocks_per_conn": round(s.count_diff / n, 2),
            }
        )
    sites.sort(key=lambda x: -x["bytes_per_conn"])
    with open(out_path, "w") as f:
        f.write(f"{title}\n{n:,} idle connections; Python allocations grew by {total / n:,.0f} B ")
        f.write(
            "per connection (tracemalloc: kernel socket memory and allocator slack not seen).\n\n"
        )
        f.write(f"{'B/conn':>8} {'blocks/conn':>11}  allocation site\n")
        for site in sites[:top]:
            f.write(
                f"{site['bytes_per_conn']:8.1f} {site['blocks_per_conn']:11.2f}  {site['site']}\n"
            )
    return sites[:top]
