"""Running the plan: server processes, load generators, measurements, progress.

Each :class:`Job` starts one server process (``python -m statemux.bench.serve``) in a new
session, runs its :class:`Step` s one after the other against it, and kills the whole process
group afterwards, whatever happened (``try``/``finally``, Ctrl-C included). A step is measured
between two snapshots of the server tree's CPU time taken just before the load generator starts
and just after it exits, so ``CPU µs/request`` is the server's cost per request however fast or
slow the load generator was.

Callers: :func:`statemux.bench.main` builds the plan (:func:`plan`) and hands it to
:class:`Bench`; nothing here is meant to be overridden.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import attrs

from . import proc, tools

__all__ = [
    "ServerKind",
    "SERVERS",
    "Step",
    "Job",
    "Row",
    "Settings",
    "Bench",
    "Progress",
    "plan",
    "Mode",
    "MODES",
    "split_cpus",
    "BenchError",
]


#: other work on the server's CPU above this share of the step is noted in the table
OTHER_LOAD_NOTE = 0.10


class BenchError(RuntimeError):
    """A step could not be measured (server did not start, a tool failed, a timeout)."""


@attrs.frozen
class ServerKind:
    """One server under test: an implementation of ``serve.py`` and which machines it runs."""

    key: str
    impl: str
    label: str
    machines: str = "auto"
    #: holds many connections at once (idle-connection memory is measured)
    concurrent: bool = True
    #: largest number of concurrent connections it is given
    max_conns: int | None = None


SERVERS: dict[str, ServerKind] = {
    k.key: k
    for k in (
        ServerKind("multiplex", "multiplex", "statemux multiplex"),
        ServerKind("threading", "threading", "statemux threading"),
        ServerKind("forking", "forking", "statemux forking", concurrent=False, max_conns=100),
        ServerKind("sync", "sync", "statemux sync", concurrent=False, max_conns=1),
        ServerKind(
            "multiplex-min", "multiplex", "statemux multiplex, minimal machine", machines="fallback"
        ),
        ServerKind("asyncio", "asyncio", "asyncio Protocol"),
        ServerKind("uvloop", "uvloop", "uvloop Protocol"),
        ServerKind("stdlib-threading", "stdlib-threading", "stdlib ThreadingTCPServer"),
    )
}

#: workload labels: (protocol, pipeline depth)
WORKLOADS = {"http": ("http", 1), "resp": ("resp", 1), "resp-p16": ("resp", 16)}


@attrs.frozen
class Step:
    """One measurement against a running server.

    ``conns`` active connections of ``workload`` for ``duration`` seconds, while ``idle``
    idle connections are held open (opened by the first step that asks for them, when their
    memory is measured). ``conns == 0``: only open the idle connections and measure memory.
    """

    workload: str
    conns: int
    duration: float
    idle: int = 0


@attrs.frozen
class Job:
    server: ServerKind
    protocol: str
    steps: tuple[Step, ...]
    profile: str = ""


@attrs.define
class Row:
    """One line of the results table."""

    workload: str
    server: str
    key: str
    conns: int
    idle: int = 0
    loadgen: str = ""
    requests: int = 0
    elapsed: float = 0.0
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s: float | None = None
    cpu_us: float | None = None
    peak_rss: int | None = None
    #: the server had forked: ``peak_rss`` is the highest summed PSS, not VmHWM
    peak_is_pss: bool = False
    idle_bytes: float | None = None
    errors: int = 0
    machine: str = ""
    #: share of the server CPU's time spent on anything but the server during the step
    other_load: float | None = None
    note: str = ""


@attrs.define
class Settings:
    duration: float = 2.0
    loadgen: str = "auto"  # auto | builtin | external
    procs: int = 3
    full: bool = False
    pin: bool = True
    min_pipelined_requests: int = 0
    wrk_threads: int = 1
    repeat: int = 1


def split_cpus(pin: bool = True) -> tuple[list[int], list[int]]:
    """(server CPUs, load-generator CPUs): the first CPU we may use for the server and the rest
    for the load; empty lists (no pinning) with a single CPU or when ``pin`` is false."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return [], []
    return cpus[:1], cpus[1:]


@attrs.frozen
class Mode:
    """How big a run is: the HTTP connection sweep, the idle connections held (with
    ``active`` connections loaded beside them), and the RESP connections. Sweep points in
    ``brief`` are measured for half the duration (at least 1 s): they only draw the plot."""

    sweep: tuple[int, ...]
    idle: int
    active: int
    resp_conns: int
    duration: float
    brief: tuple[int, ...] = ()
    #: servers measured at fewer sweep points in this mode
    short_sweep: dict[str, tuple[int, ...]] = attrs.field(factory=dict)


MODES = {
    "smoke": Mode((1, 4), 20, 4, 4, 0.5),
    "quick": Mode(
        (1, 10, 50, 100),
        1000,
        100,
        50,
        2.0,
        brief=(1, 10),
        short_sweep={"multiplex-min": (50,), "forking": (1, 10, 50)},
    ),  # fmt: skip
    "full": Mode((1, 10, 50, 100, 1000), 10_000, 100, 50, 5.0),
}


def plan(
    mode: str, servers: list[str], workloads: list[str], duration: float, idle: int | None = None
) -> list[Job]:
    """The jobs of a run. ``mode``: ``smoke``, ``quick`` or ``full``; ``idle`` overrides the
    mode's idle connections."""
    m = MODES[mode]
    sweep, active, resp_conns = m.sweep, m.active, m.resp_conns
    idle = m.idle if idle is None else idle
    jobs = []
    for key in servers:
        kind = SERVERS[key]
        if "http" in workloads:
            points = [c for c in m.short_sweep.get(key, sweep) if c <= (kind.max_conns or c)]
            brief = max(1.0, duration / 2)
            steps = [Step("http", c, brief if c in m.brief else duration) for c in points]
            if (kind.concurrent and mode != "smoke") or key == "multiplex":
                if key in ("multiplex", "threading"):
                    # idle memory, then the same active load with the idle connections held
                    steps.append(Step("http", active, duration, idle=idle))
                else:
                    steps.append(Step("http", 0, 0.0, idle=idle))
            jobs.append(Job(kind, "http", tuple(steps)))
        resp_steps = []
        if kind.impl in ("forking", "sync"):
            # forking refuses a machine sharing a store; sync serves one client at a time
            pass
        else:
            conns = resp_conns
            for w in ("resp", "resp-p16"):
                if w in workloads:
                    resp_steps.append(Step(w, conns, duration))
        if resp_steps:
            jobs.append(Job(kind, "resp", tuple(resp_steps)))
    return jobs


class Progress:
    """Progress on stderr: one line per step, rewritten in place on a terminal."""

    def __init__(self, stream: IO[str] | None = None, total: int = 0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.done = 0
        self.label = ""
        self._lock = threading.Lock()

    def begin(self, label: str) -> None:
        self.label = label
        if self.tty:
            self._write(f"\r\x1b[K[{self.done + 1:>2}/{self.total}] {label} …")

    def update(self, text: str) -> None:
        if self.tty:
            self._write(f"\r\x1b[K[{self.done + 1:>2}/{self.total}] {self.label}  {text}")

    def end(self, summary: str) -> None:
        self.done += 1
        prefix = "\r\x1b[K" if self.tty else ""
        self._write(f"{prefix}[{self.done:>2}/{self.total}] {self.label}  {summary}\n")

    def note(self, text: str) -> None:
        prefix = "\r\x1b[K" if self.tty else ""
        self._write(f"{prefix}{text}\n")

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()


def _pinned(cmd: list[str], cpus: list[int]) -> list[str]:
    if not cpus:
        return cmd
    return ["taskset", "-c", ",".join(map(str, cpus)), *cmd] if tools.have("taskset") else cmd


class ServerProcess:
    """A benchmark server in its own session; :meth:`stop` kills its whole process group."""

    def __init__(
        self,
        job: Job,
        root: str,
        cpus: list[int],
        log: IO[bytes],
        profile: str = "",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.job = job
        cmd = [
            sys.executable, "-m", "statemux.bench.serve", "--impl", job.server.impl,
            "--workload", job.protocol, "--root", root, "--machines", job.server.machines,
        ]  # fmt: skip
        if cpus:
            cmd += ["--cpus", ",".join(map(str, cpus))]
        if profile:
            cmd += ["--profile", profile]
        cmd += extra
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        self.pid = self.proc.pid
        self.port = 0
        self.machine = ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Read the server's ``READY <port> <machine source>`` line (bounded)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY"):
            if ready:  # it wrote something else, or exited: let it finish dying
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            raise BenchError(f"{self.job.server.label} did not start")
        _, port, self.machine = line.split()
        self.port = int(port)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group (the server writes its profile), then SIGKILL what is left."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                # forked children may outlive the parent for a moment: make sure they go
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            except subprocess.TimeoutExpired:
                continue
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Bench:
    """Runs jobs and collects rows. ``log`` receives the servers' and tools' stderr."""

    def __init__(
        self, settings: Settings, root: str, path: str, log: IO[bytes], progress: Progress
    ) -> None:
        self.settings = settings
        self.root = root
        self.path = path
        self.log = log
        self.progress = progress
        self.server_cpus, self.client_cpus = split_cpus(settings.pin)
        self.rows: list[Row] = []
        self.skipped: list[tuple[str, str]] = []
        self.loadgens_used: set[str] = set()
        self._children: list[subprocess.Popen[bytes]] = []
        self._rates: dict[tuple[str, int], float] = {}
        self.machines: dict[tuple[str, str], str] = {}
        #: (server label, workload) -> profile summary (µs per layer, calls per request)
        self.layers: dict[tuple[str, str], dict[str, Any]] = {}

    # -- jobs ----------------------------------------------------------------------------------
    def run(self, jobs: list[Job]) -> list[Row]:
        for job in jobs:
            self.run_job(job)
        return self.rows

    def run_job(self, job: Job) -> None:
        server = ServerProcess(job, self.root, self.server_cpus, self.log, job.profile)
        holder: subprocess.Popen[bytes] | None = None
        try:
            try:
                server.wait_ready()
            except BenchError as exc:
                reason = self._server_error(server) or str(exc)
                self.skipped.append((f"{job.server.label} ({job.protocol})", reason))
                for _ in job.steps:
                    self.progress.begin(f"{job.protocol:<8} {job.server.label}")
                    self.progress.end(f"skipped: {reason}")
                return
            self.machines[(job.server.key, job.protocol)] = server.machine
            held = 0
            for step in job.steps:
                label = self._label(job, step)
                self.progress.begin(label)
                row = Row(
                    workload=step.workload,
                    server=job.server.label,
                    key=job.server.key,
                    conns=step.conns,
                    idle=step.idle,
                    machine=server.machine,
                )
                try:
                    if step.idle and not held:
                        holder, row.idle_bytes = self._open_idle(server, step.idle)
                        held = step.idle
                    if step.conns:
                        row = self._measure_repeated(server, job, step, row)
                        self._check_held(server, held, row)
                except BenchError as exc:
                    row.note = str(exc)
                self.rows.append(row)
                self.progress.end(_summary(row))
                if server.proc.poll() is not None:
                    reason = self._server_error(server) or "server exited"
                    self.skipped.append((f"{job.server.label} ({job.protocol})", reason))
                    break
        finally:
            if holder is not None:
                self._stop_child(holder)
            server.stop()

    def _server_error(self, server: ServerProcess) -> str:
        """The last line the server wrote to the log, if it died."""
        if server.proc.poll() is None:
            return ""
        self.log.flush()
        try:
            with open(self.log.name, "rb") as f:
                lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
            return lines[-1].strip() if lines else f"exit status {server.proc.returncode}"
        except (OSError, AttributeError):
            return f"exit status {server.proc.returncode}"

    @staticmethod
    def _label(job: Job, step: Step) -> str:
        what = f"c={step.conns}" if step.conns else ""
        if step.idle:
            what = f"{what} +{step.idle} idle".strip()
        return f"{step.workload:<8} {job.server.label:<36} {what}"

    # -- one measurement ---------------------------------------------------------------------------
    def _measure_repeated(self, server: ServerProcess, job: Job, step: Step, row: Row) -> Row:
        """Measure ``repeat`` times; keep the run with the median CPU per request."""
        runs = []
        for _ in range(max(1, self.settings.repeat)):
            run = attrs.evolve(row)
            self._measure(server, job, step, run)
            runs.append(run)
        runs.sort(key=lambda r: r.cpu_us if r.cpu_us is not None else math.inf)
        best = runs[(len(runs) - 1) // 2]
        if len(runs) > 1:
            spread = [r.cpu_us for r in runs if r.cpu_us is not None]
            if spread:
                best.note = (best.note + "; " if best.note else "") + (
                    f"{len(runs)} runs {min(spread):.1f}–{max(spread):.1f} µs"
                )
        return best

    def _measure(self, server: ServerProcess, job: Job, step: Step, row: Row) -> None:
        protocol, pipeline = WORKLOADS[step.workload]
        prepare, finish, name = self._loadgen(server, protocol, step, pipeline)
        row.loadgen = name
        cmd, timeout = prepare()
        with self._sampling(server, step) as sample:
            cpu0 = proc.tree_cpu(server.pid)
            busy0 = proc.cpus_busy(self.server_cpus)
            wall0 = time.monotonic()
            out = self._run_tool(cmd, timeout)
            # let a forking server reap its children so their CPU time is counted
            time.sleep(0.05)  # allowed: a short settle before the last snapshot
            cpu1 = proc.tree_cpu(server.pid)
            busy1 = proc.cpus_busy(self.server_cpus)
            wall = time.monotonic() - wall0
        result = finish(out)
        self.loadgens_used.add(name)
        row.requests = int(result["requests"])
        row.elapsed = float(result["elapsed"])
        row.errors = int(result.get("errors", 0))
        row.p50_ms = float(result["p50_ms"])
        row.p99_ms = float(result["p99_ms"])
        row.rps = row.requests / row.elapsed if row.elapsed else 0.0
        row.cpu_s = cpu1 - cpu0
        if self.server_cpus and wall > 0:
            # Work on the server's CPU that was not the server's (other processes, interrupts)
            row.other_load = max(0.0, (busy1 - busy0) - row.cpu_s) / (wall * len(self.server_cpus))
        row.cpu_us = row.cpu_s / row.requests * 1e6 if row.requests else None
        row.peak_rss = sample["peak"]
        row.peak_is_pss = sample["procs"] > 1
        notes = []
        if result.get("failed"):
            notes.append(str(result["failed"])[:200])
        elif row.errors:
            notes.append(f"{row.errors} errors")
        if row.other_load is not None and row.other_load >= OTHER_LOAD_NOTE:
            notes.append(f"other work {100 * row.other_load:.0f}%")
        row.note = "; ".join(notes)

    def _loadgen(
        self, server: ServerProcess, protocol: str, step: Step, pipeline: int
    ) -> tuple[Callable[[], tuple[list[str], float]], Callable[[str], dict[str, Any]], str]:
        """(prepare → (command, timeout), parse output → result, load generator name)."""
        s = self.settings
        tool = "wrk" if protocol == "http" else "redis-benchmark"
        if s.loadgen == "builtin" or (s.loadgen == "auto" and not tools.have(tool)):
            return self._builtin(server, protocol, step, pipeline)
        if not tools.have(tool):
            raise BenchError(f"{tool} is not installed (use --loadgen builtin)")
        if protocol == "http":
            url = f"http://127.0.0.1:{server.port}{self.path}"
            cmd = tools.wrk_command(url, step.conns, math.ceil(step.duration), s.wrk_threads)
            return (
                lambda: (_pinned(cmd, self.client_cpus), step.duration + 30),
                tools.parse_wrk,
                "wrk",
            )

        sized = {"n": 0}

        def prepare() -> tuple[list[str], float]:
            rate = self._calibrate(server, step.conns, pipeline)
            n = max(1000, int(rate * step.duration / len(tools.RESP_TESTS)))
            if pipeline > 1 and s.min_pipelined_requests:
                n = max(n, math.ceil(s.min_pipelined_requests / len(tools.RESP_TESTS)))
            sized["n"] = n
            cmd = tools.redis_benchmark_command(server.port, step.conns, n, pipeline)
            expected = n * len(tools.RESP_TESTS) / max(rate, 1.0)
            return _pinned(cmd, self.client_cpus), 3 * expected + 30

        return prepare, lambda out: _redis_result(out, sized["n"]), "redis-benchmark"

    def _builtin(
        self, server: ServerProcess, protocol: str, step: Step, pipeline: int
    ) -> tuple[Callable[[], tuple[list[str], float]], Callable[[str], dict[str, Any]], str]:
        cmd = [
            sys.executable, "-m", "statemux.bench.loadgen", "run", "--workload", protocol,
            "--port", str(server.port), "--conns", str(step.conns),
            "--duration", str(step.duration), "--pipeline", str(pipeline),
            "--path", self.path, "--procs", str(self.settings.procs),
        ]  # fmt: skip
        if self.client_cpus:
            cmd += ["--cpus", ",".join(map(str, self.client_cpus))]
        return (
            lambda: (cmd, step.duration + 60),
            lambda out: json.loads(out.strip().splitlines()[-1]),
            f"built-in ({self.settings.procs} procs)",
        )

    def _calibrate(self, server: ServerProcess, conns: int, pipeline: int) -> float:
        """Requests/s of a short PING run, to size redis-benchmark's ``-n`` to the duration."""
        key = (server.job.server.key, pipeline)
        if key not in self._rates:
            n = max(2000 * pipeline, conns * pipeline * 20)
            cmd = tools.redis_benchmark_command(server.port, conns, n, pipeline, ("ping_mbulk",))
            out = self._run_tool(_pinned(cmd, self.client_cpus), 60)
            self._rates[key] = tools.parse_redis_benchmark(out)[0]["rps"]  # type: ignore[assignment]
        return self._rates[key]

    def _run_tool(self, cmd: list[str], timeout: float) -> str:
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log,
            start_new_session=True,
        )  # fmt: skip
        self._children.append(p)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"{cmd[0]} ran past its {timeout:.0f} s bound and was killed"
            ) from None
        finally:
            self._stop_child(p)
        if p.returncode:
            raise BenchError(f"{os.path.basename(cmd[0])} exited with status {p.returncode}")
        return out.decode(errors="replace")

    def _stop_child(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            try:
                if p.stdin is not None:
                    p.stdin.close()
                p.wait(timeout=2)
            except (subprocess.TimeoutExpired, OSError):
                pass
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for stream in (p.stdout, p.stdin):
            if stream is not None and not stream.closed:
                stream.close()
        if p in self._children:
            self._children.remove(p)

    def kill_all(self) -> None:
        """Kill every tool still running (used on the way out, Ctrl-C included)."""
        for p in list(self._children):
            self._stop_child(p)

    @contextmanager
    def _sampling(self, server: ServerProcess, step: Step) -> Iterator[dict[str, int]]:
        """Sample the tree's memory (and show progress) every 0.25 s while the load runs.

        ``peak``: the server's ``VmHWM`` while it is one process; once it has forked, the
        highest summed PSS seen (a sum of the children's VmHWM would count every page they
        share with the parent once per child).
        """
        sample = {"hwm": 0, "pss": 0, "procs": 1, "peak": 0}

        def take() -> None:
            sample["hwm"] = max(sample["hwm"], proc.tree_memory(server.pid)[0])
            procs, pss = proc.tree_pss(server.pid)
            sample["procs"] = max(sample["procs"], procs)
            sample["pss"] = max(sample["pss"], pss)

        take()
        stop = threading.Event()
        start = time.monotonic()
        cpu_start = proc.tree_cpu(server.pid)

        def loop() -> None:
            while not stop.wait(0.25):
                take()
                elapsed = time.monotonic() - start
                cpu = proc.tree_cpu(server.pid) - cpu_start
                self.progress.update(
                    f"{elapsed:4.1f}/{step.duration:g}s  server CPU {100 * cpu / elapsed:3.0f}%"
                )

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield sample
        finally:
            stop.set()
            thread.join()
            take()
            sample["peak"] = sample["hwm"] if sample["procs"] == 1 else sample["pss"]

    # -- idle connections -------------------------------------------------------------------------
    def _open_idle(self, server: ServerProcess, n: int) -> tuple[subprocess.Popen[bytes], float]:
        """Open ``n`` idle connections from a holder process; return it and the server's RSS
        growth per connection once it has accepted them all."""
        self.progress.update(f"opening {n} idle connections")
        # connections of the previous step may still be closing: wait until they are gone
        fds_before = _settled(lambda: proc.fd_count(server.pid), exact=True)
        rss_before = _settled(lambda: proc.tree_memory(server.pid)[1])
        cmd = [
            sys.executable, "-m", "statemux.bench.loadgen", "idle",
            "--port", str(server.port), "--conns", str(n),
        ]  # fmt: skip
        if self.client_cpus:
            cmd += ["--cpus", ",".join(map(str, self.client_cpus))]
        holder = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            start_new_session=True,
        )  # fmt: skip
        self._children.append(holder)
        try:
            self._wait_accepted(server, holder, n, fds_before)
        except BaseException:
            self._stop_child(holder)
            raise
        rss = _settled(lambda: proc.tree_memory(server.pid)[1])
        return holder, (rss - rss_before) / n

    def _wait_accepted(
        self, server: ServerProcess, holder: subprocess.Popen[bytes], n: int, fds_before: int
    ) -> None:
        """Wait until the holder has connected ``n`` times and the server has accepted them
        all; give up after 20 s without progress."""
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], 120)
        line = holder.stdout.readline() if ready else b""
        if not line.startswith(b"{"):
            raise BenchError(f"could not open {n} idle connections")
        last, stalled_since = -1, time.monotonic()
        while (fds := proc.fd_count(server.pid)) < fds_before + n:
            now = time.monotonic()
            if fds > last:
                last, stalled_since = fds, now
            elif now - stalled_since > 20:
                got = fds - fds_before
                raise BenchError(f"the server accepted only {got} of {n} idle connections")
            time.sleep(0.05)  # allowed: polling another process's descriptor table

    def memory_profile(self, kind: ServerKind, n: int, prefix: str) -> tuple[str, str]:
        """Start ``kind`` (HTTP) with allocation tracing, snapshot it before and after ``n``
        idle connections are accepted; return the two snapshot paths."""
        job = Job(kind, "http", ())
        server = ServerProcess(
            job, self.root, self.server_cpus, self.log, extra=("--memory-snapshots", prefix)
        )
        holder = None
        try:
            server.wait_ready()
            before = self._snapshot(server, prefix, 0)
            holder, _ = self._open_idle(server, n)
            after = self._snapshot(server, prefix, 1)
            return before, after
        finally:
            if holder is not None:
                self._stop_child(holder)
            server.stop()

    @staticmethod
    def _snapshot(server: ServerProcess, prefix: str, number: int) -> str:
        path = f"{prefix}-{number}.snap"
        os.kill(server.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if time.monotonic() > deadline or server.proc.poll() is not None:
                raise BenchError("the server wrote no allocation snapshot")
            time.sleep(0.05)  # allowed: waiting for another process to write a file
        return path

    def _check_held(self, server: ServerProcess, held: int, row: Row) -> None:
        if held and row.note == "":
            fds = proc.fd_count(server.pid)
            if fds < held:
                row.note = f"only {fds} descriptors open after the run; idle connections closed"


def _settled(sample: Callable[[], int], exact: bool = False, timeout: float = 10.0) -> int:
    """``sample()`` once two readings 0.1 s apart agree (exactly, or within 0.5 %); bounded
    by ``timeout`` (then the last reading)."""
    last = sample()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)  # allowed: waiting for another process to settle
        now = sample()
        if now == last or (not exact and abs(now - last) <= 0.005 * max(now, 1)):
            return now
        last = now
    return last


def _redis_result(out: str, per_test: int) -> dict[str, Any]:
    """Merge redis-benchmark's per-command rows (``per_test`` requests each) into one result;
    the percentiles are the slowest command's."""
    tests = tools.parse_redis_benchmark(out)
    return {
        "requests": per_test * len(tests),
        "elapsed": sum(per_test / float(t["rps"]) for t in tests if t["rps"]),
        "p50_ms": max(float(t["p50_ms"]) for t in tests),
        "p99_ms": max(float(t["p99_ms"]) for t in tests),
        "errors": 0,
    }


def _summary(row: Row) -> str:
    if row.rps is None:
        if row.idle_bytes is not None:
            return f"{row.idle_bytes:,.0f} B per idle connection"
        return row.note or "no result"
    parts = [f"{row.rps:>9,.0f} req/s", f"p99 {row.p99_ms:6.2f} ms"]
    if row.cpu_us is not None:
        parts.append(f"{row.cpu_us:6.1f} µs CPU/req")
    if row.idle_bytes is not None:
        parts.append(f"{row.idle_bytes:,.0f} B/idle conn")
    if row.note:
        parts.append(row.note)
    return "  ".join(parts)
