"""``statemux bench``: the same machines under every concurrency model, beside hand-written
baselines, on loopback; one table, a plot, and the targets reached or not.

Callers: the ``statemux`` command calls :func:`main` with its remaining arguments;
``python -m statemux.bench`` does the same. See ``docs/benchmarks.md`` for what is measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from . import plot as plotting
from . import report
from .hotspots import summarise
from .runner import (
    MODES,
    SERVERS,
    Bench,
    BenchError,
    Job,
    Progress,
    Settings,
    Step,
    plan,
    split_cpus,
)

__all__ = ["main", "build_parser", "BODY"]

#: the small file the HTTP workload fetches (13 bytes)
BODY = b"Hello, world!"
FILE_NAME = "hello.txt"
DEFAULT_SERVERS = (
    "multiplex", "threading", "forking", "sync", "multiplex-min", "asyncio", "uvloop",
    "stdlib-threading",
)  # fmt: skip
SMOKE_SERVERS = ("multiplex", "asyncio")
WORKLOADS = ("http", "resp", "resp-p16")


def build_parser(prog: str = "statemux bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure the statemux models and hand-written baselines on loopback: "
        "requests/s, latency, server CPU per request, memory.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the full sweep (1 to 1000 connections, 10,000 idle, ≥ 1M pipelined "
                      "requests, 5 s per point); takes about 8 minutes")  # fmt: skip
    size.add_argument("--smoke", action="store_true",
                      help="a few seconds: tiny durations, few connections, one workload each")  # fmt: skip
    p.add_argument("--duration", type=float, help="seconds per measurement (default: 2, 5 with "
                   "--full, 0.5 with --smoke; wrk rounds up to whole seconds)")  # fmt: skip
    p.add_argument("--servers", help=f"comma-separated, from: {', '.join(SERVERS)}")
    p.add_argument("--workloads", help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    p.add_argument(
        "--idle", type=int, help="idle connections held (default 1000; 10,000 with --full)"
    )
    p.add_argument("--loadgen", choices=("auto", "builtin", "external"),
                   help="auto: wrk and redis-benchmark when installed, else the built-in "
                   "generator (default; built-in with --smoke)")  # fmt: skip
    p.add_argument("--procs", type=int, default=3, help="processes of the built-in load generator")
    p.add_argument("--repeat", type=int, default=1, help="measure each point N times and keep "
                   "the run with the median CPU per request (for a noisy machine)")  # fmt: skip
    p.add_argument("--no-pin", action="store_true", help="do not pin server and load to CPUs")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="profile the multiplexing server when one of its targets is missed "
                   "(auto), always, or never")  # fmt: skip
    p.add_argument("--out", default="bench-results", help="directory for the table, JSON, plot, "
                   "profiles and log (default: ./bench-results)")  # fmt: skip
    return p


def _pick(
    value: str | None, allowed: tuple[str, ...] | list[str], default: tuple[str, ...], what: str
) -> list[str]:
    if not value:
        return list(default)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise SystemExit(
            f"statemux bench: unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})"
        )
    return chosen


def _available(key: str) -> str:
    """Why server ``key`` cannot run here ("" when it can)."""
    import statemux

    from .serve import STATEMUX_IMPLS

    impl = SERVERS[key].impl
    if impl in STATEMUX_IMPLS and not hasattr(statemux, STATEMUX_IMPLS[impl]):
        return f"statemux has no {STATEMUX_IMPLS[impl]} yet"
    if impl == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "uvloop is not installed (pip install 'statemux[bench]')"
    return ""


def _environment(
    mode: str, settings: Settings, bench: Bench | None, cpus: Any = None
) -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    server_cpus, client_cpus = cpus if cpus is not None else split_cpus(settings.pin)
    import statemux

    env: dict[str, Any] = {
        "mode": mode,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "statemux": statemux.__version__,
        "duration_s": settings.duration,
        "pinning": (
            f"server on CPU {server_cpus}, load generators on CPU {client_cpus}"
            if server_cpus
            else "not pinned"
        ),
    }
    if bench is not None:
        env["load_generators"] = sorted(bench.loadgens_used)
        env["machines"] = {f"{k}/{p}": m for (k, p), m in sorted(bench.machines.items())}
    return env


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _terminate_as_interrupt() -> Any:
    """Make SIGTERM clean up like Ctrl-C (main thread only); return the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and targets to stdout, progress to stderr.
    Returns the exit status (0, or 1 when nothing could be measured)."""
    args = build_parser().parse_args(argv)
    mode = "full" if args.full else "smoke" if args.smoke else "quick"
    duration = args.duration if args.duration else MODES[mode].duration
    loadgen = args.loadgen or ("builtin" if mode == "smoke" else "auto")
    servers = _pick(
        args.servers, list(SERVERS), SMOKE_SERVERS if mode == "smoke" else DEFAULT_SERVERS, "server"
    )
    workloads = _pick(args.workloads, WORKLOADS, WORKLOADS, "workload")
    settings = Settings(
        duration=duration,
        loadgen=loadgen,
        procs=max(1, args.procs),
        full=mode == "full",
        pin=not args.no_pin,
        min_pipelined_requests=1_000_000 if mode == "full" else 0,
        repeat=max(1, args.repeat),
    )
    idle = args.idle if args.idle is not None else MODES[mode].idle
    os.makedirs(args.out, exist_ok=True)

    skipped: list[tuple[str, str]] = []
    runnable = []
    for key in servers:
        why = _available(key)
        if why:
            skipped.append((SERVERS[key].label, why))
        else:
            runnable.append(key)
    jobs = plan(mode, runnable, workloads, duration, idle)
    progress = Progress(sys.stderr, total=sum(len(j.steps) for j in jobs))
    root = tempfile.mkdtemp(prefix="statemux-bench-")
    with open(os.path.join(root, FILE_NAME), "wb") as f:
        f.write(BODY)
    load_before = [round(x, 2) for x in os.getloadavg()]
    old_affinity = os.sched_getaffinity(0)
    old_sigterm = _terminate_as_interrupt()
    log_path = os.path.join(args.out, "bench.log")
    bench: Bench | None = None
    hotspots: list[dict[str, Any]] = []
    profile_notes: list[str] = []
    memory: dict[str, list[dict[str, Any]]] = {}
    try:
        with open(log_path, "wb") as log:
            bench = Bench(settings, root, "/" + FILE_NAME, log, progress)
            if bench.client_cpus:
                # the orchestrator's own sampling stays off the server's CPU
                os.sched_setaffinity(0, bench.client_cpus)
            progress.note(
                f"statemux bench ({mode}): {len(jobs)} server runs, {progress.total} measurements, "
                f"{duration:g} s each; "
                f"{_environment(mode, settings, None, (bench.server_cpus, bench.client_cpus))['pinning']}"
            )
            rows = bench.run(jobs)
            skipped += bench.skipped
            targets = report.evaluate(rows, idle, MODES[mode].active, mode)
            wanted = sorted({t.profile for t in targets if t.profile})
            if args.profile == "always":
                wanted = [w for w in ("http", "resp-p16") if w in workloads]
            if mode == "smoke" or args.profile == "never":
                wanted = []
            if args.profile != "never" and mode != "smoke":
                t3 = next((t for t in targets if t.name == "T3"), None)
                if args.profile == "always" or (t3 is not None and t3.status == "not reached"):
                    note = _memory_profile(bench, min(idle, 2000), args.out, memory)
                    if note:
                        profile_notes.append(note)
            for workload in wanted:
                # the shipped machine, the minimal one to tell the framework's share apart,
                # and the asyncio baseline with the same minimal parser for comparison
                for key in ("multiplex", "multiplex-min", "asyncio"):
                    if key in runnable:
                        spots, note = _profile(
                            bench, key, workload, max(1.0, duration / 2), args.out
                        )
                        hotspots += spots
                        if note:
                            profile_notes.append(note)
    except KeyboardInterrupt:
        progress.note("interrupted: servers and load generators stopped")
        return 130
    finally:
        if bench is not None:
            bench.kill_all()
        os.sched_setaffinity(0, old_affinity)
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)
        shutil.rmtree(root, ignore_errors=True)

    env = _environment(mode, settings, bench)
    env["load_average_before"] = load_before
    layers = bench.layers if bench else {}
    text = _render(rows, targets, env, skipped, hotspots, profile_notes, layers, memory)
    print(text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        profiles: dict[str, Any] = {f"{k[0]} / {k[1]}": v for k, v in layers.items()}
        profiles.update({f"{label} / idle memory": sites for label, sites in memory.items()})
        f.write(report.to_json(rows, targets, env, hotspots, profiles))
    written = ["results.md", "results.json", "bench.log"]
    if plotting.available():
        paths = [os.path.join(args.out, "bench.png"), os.path.join(args.out, "bench.svg")]
        plotting.plot(
            rows, paths, title=f"statemux bench ({mode}): {env['cpu']}, Python {env['python']}"
        )
        written += ["bench.png", "bench.svg"]
    else:
        print("\n(no plot: matplotlib is not installed; pip install 'statemux[bench]')")
    print(
        f"\nwritten to {args.out}/: {', '.join(written)}"
        + ("".join(f", {n}" for n in profile_notes))
    )
    return 0 if any(r.rps for r in rows) else 1


def _profile(
    bench: Bench, key: str, workload: str, duration: float, out: str
) -> tuple[list[dict[str, Any]], str]:
    """Run server ``key`` (a multiplexing one) under cProfile on ``workload``, 50 connections;
    return its hot spots and the name of the text file written."""
    protocol = "http" if workload == "http" else "resp"
    stem = f"profile-{key}-{workload}"
    dump = os.path.join(out, stem + ".prof")
    job = Job(SERVERS[key], protocol, (Step(workload, 50, duration),), profile=dump)
    bench.progress.total += 1
    before = len(bench.rows)
    repeat, bench.settings.repeat = bench.settings.repeat, 1  # one run per profile
    try:
        bench.run_job(job)
    except BenchError:
        return [], ""
    finally:
        bench.settings.repeat = repeat
    new = bench.rows[before:]
    del bench.rows[before:]
    if not new or not new[0].requests or not os.path.exists(dump):
        return [], ""
    text_path = os.path.join(out, stem + ".txt")
    title = f"cProfile of {SERVERS[key].label}, {report.WORKLOAD_TITLES[workload]}, 50 connections"
    spots, summary = summarise(dump, text_path, new[0].requests, title)
    for s in spots:
        s["workload"] = workload
        s["server"] = SERVERS[key].label
    bench.layers[(SERVERS[key].label, workload)] = summary
    return spots, os.path.basename(text_path)


def _memory_profile(bench: Bench, n: int, out: str, memory: dict[str, list[dict[str, Any]]]) -> str:
    """Where an idle connection's memory goes in the multiplexing server (shipped machine and
    minimal one), from allocation snapshots; fills ``memory``, returns the file name."""
    from .hotspots import memory_per_connection

    path = os.path.join(out, "memory-idle.txt")
    parts = []
    for key in ("multiplex", "multiplex-min"):
        kind = SERVERS[key]
        bench.progress.total += 1
        bench.progress.begin(f"{'http':<8} {kind.label:<36} +{n} idle, allocations traced")
        prefix = os.path.join(out, f"memory-{key}")
        try:
            before, after = bench.memory_profile(kind, n, prefix)
        except BenchError as exc:
            bench.progress.end(f"failed: {exc}")
            continue
        part = path + f".{key}"
        sites = memory_per_connection(
            before, after, n, part, f"{kind.label}, HTTP idle connections"
        )
        for snap in (before, after):
            os.remove(snap)
        memory[kind.label] = sites
        with open(part) as f:
            parts.append(f.read())
        os.remove(part)
        total = sum(s["bytes_per_conn"] for s in sites)
        bench.progress.end(f"{total:,.0f} B per connection in the top allocation sites")
    if not parts:
        return ""
    with open(path, "w") as f:
        f.write("\n\n".join(parts))
    return os.path.basename(path)


def _render(
    rows: list[Any],
    targets: list[report.Target],
    env: dict[str, Any],
    skipped: list[tuple[str, str]],
    hotspots: list[dict[str, Any]],
    profile_notes: list[str],
    layers: dict[tuple[str, str], dict[str, Any]] | None = None,
    memory: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    layers = layers or {}
    out = [f"## statemux bench ({env['mode']}), {env['date']}", ""]
    out.append(
        f"{env['cpu']}, {env['cpus']} CPUs, Linux {env['kernel']}, Python {env['python']}, "
        f"statemux {env['statemux']}; {env['pinning']}; {env['duration_s']:g} s per measurement; "
        f"load: {', '.join(env.get('load_generators') or ['none'])}; load average before "
        f"the run {env['load_average_before'][0]:g}, after {env['load_average'][0]:g}."
    )
    machines = env.get("machines") or {}
    if machines:
        parts = []
        for protocol in ("http", "resp"):
            used = sorted({
                v
                for k, v in machines.items()
                if k.endswith("/" + protocol) and v != "baseline" and not k.startswith("multiplex-min/")
            })  # fmt: skip
            if used:
                parts.append(f"{protocol}: {', '.join(used)}")
        if parts:
            out.append(
                f"statemux machines: {'; '.join(parts).replace('fallback', 'statemux.bench.machines')}"
                "; rows marked 'minimal machine' run statemux.bench.machines, as small as the baselines."
            )  # fmt: skip
    out += ["", report.table(rows), "", "### Targets", "", report.targets_table(targets)]
    if skipped:
        out += ["", "Not measured: " + "; ".join(f"{name} ({why})" for name, why in skipped) + "."]
    if hotspots:
        out += [
            "",
            "### Where the multiplexing server's time goes",
            "",
            "cProfile, own time; share of the busy time (waiting in the selector left out);",
            "µs per request are inflated by the profiler. Full listings: profile-*.txt.",
            "",
        ]
        for workload in dict.fromkeys(w for _, w in layers):
            servers = [s for s, w in layers if w == workload]
            got = [layers[(s, workload)] for s in servers]
            lines = [["own µs per request (profiled)", *servers]]
            for name in got[0]["layers"]:
                lines.append([name, *(f"{g['layers'][name]:.2f}" for g in got)])
            lines.append(["total", *(f"{sum(g['layers'].values()):.2f}" for g in got)])
            lines.append(["Python calls per request", *(f"{g['python_calls']:.1f}" for g in got)])
            lines.append(["builtin calls per request", *(f"{g['builtin_calls']:.1f}" for g in got)])
            title = f"By layer, {report.WORKLOAD_TITLES[workload]}, 50 connections:"
            out += [title, "", report._markdown(lines, right=range(1, len(lines[0]))), ""]
        groups = dict.fromkeys(
            (h["server"], h["workload"]) for h in hotspots if h["server"].startswith("statemux")
        )
        for server, workload in groups:
            lines = [["busy %", "µs/req", "calls/req", "function"]]
            chosen = [h for h in hotspots if (h["server"], h["workload"]) == (server, workload)]
            for h in chosen[:15]:
                lines.append(
                    [f"{h['busy_pct']:.1f}", f"{h['own_us_per_req']:.2f}", f"{h['calls_per_req']:.2f}", h["function"]]
                )  # fmt: skip
            title = f"{server}, {report.WORKLOAD_TITLES[workload]}, 50 connections:"
            out += [title, "", report._markdown(lines, right=range(3)), ""]
    if memory:
        if out[-1]:
            out.append("")
        out += [
            "### Where an idle connection's memory goes",
            "",
            "tracemalloc, Python allocations per idle HTTP connection by allocation site",
            "(kernel socket memory and allocator slack are not seen). Full list: memory-idle.txt.",
            "",
        ]
        for label, sites in memory.items():
            lines = [["B/conn", "blocks/conn", "allocation site"]]
            for site in sites[:12]:
                lines.append(
                    [
                        f"{site['bytes_per_conn']:.0f}",
                        f"{site['blocks_per_conn']:.2f}",
                        site["site"],
                    ]
                )
            out += [f"{label}:", "", report._markdown(lines, right=range(2)), ""]
    return "\n".join(out).rstrip()
