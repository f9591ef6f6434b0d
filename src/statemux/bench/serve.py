"""One benchmark server, run in its own process: ``python -m statemux.bench.serve``.

It binds 127.0.0.1 on an ephemeral port, prints ``READY <port> <machine source>`` on stdout
and serves until SIGTERM or SIGINT, then exits at once (writing its profile first when
``--profile`` was given). The benchmark starts it in a new session and kills the whole process
group at the end, so forked children go too.

Implementations (``--impl``): the statemux models ``multiplex``, ``threading``, ``forking`` and
``sync`` (the same machine under each), and the baselines ``asyncio``, ``uvloop`` and
``stdlib-threading`` (see :mod:`.baselines`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["IMPLS", "STATEMUX_IMPLS", "BASELINE_IMPLS", "main", "machine_factory", "raise_nofile"]

#: statemux model -> server class name exported by ``statemux``
STATEMUX_IMPLS = {
    "multiplex": "MultiplexingTCPServer",
    "threading": "ThreadingTCPServer",
    "forking": "ForkingTCPServer",
    "sync": "TCPServer",
}
BASELINE_IMPLS = ("asyncio", "uvloop", "stdlib-threading")
#: children a forking server may have at once in the benchmark (the class default is 40)
FORKING_MAX_CHILDREN = 256
IMPLS = (*STATEMUX_IMPLS, *BASELINE_IMPLS)


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def machine_factory(
    workload: str, root: str, source: str = "auto"
) -> tuple[Callable[[], Any], str]:
    """The statemux machine factory for ``workload`` and where it came from.

    ``source``: ``real`` (``statemachines.http``/``statemachines.resp``; fail if absent),
    ``fallback`` (the minimal machines in :mod:`.machines`), ``auto`` (real when importable).
    """
    from . import machines

    if source != "fallback":
        try:
            return _real_factory(workload, root), f"statemachines.{workload}"
        except ImportError:
            if source == "real":
                raise
    if workload == "http":
        return machines.http_factory(root), "fallback"
    return machines.resp_factory(), "fallback"


def _real_factory(workload: str, root: str) -> Callable[[], Any]:
    import importlib

    module = importlib.import_module(f"statemachines.{workload}")
    service = module.SERVICE
    options = {opt.dest: opt.default for opt in service.options}
    if workload == "http":
        options["root"] = root
    return service.build(datagram=False, **options)


def _baseline_shared(workload: str, root: str) -> Any:
    from .machines import load_files

    return load_files(root) if workload == "http" else {}


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT."""


def _on_signal(signum: int, frame: Any) -> None:
    raise _Stop()


def _watch_parent() -> None:
    """Exit when the benchmark that started us is gone (killed with SIGKILL, say), so no
    server outlives it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)  # allowed: a once-a-second liveness check of the parent
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _trace_memory(prefix: str) -> None:
    """Trace allocations from now on; each SIGUSR1 writes the next snapshot, complete when it
    appears under its final name ``PREFIX-N.snap``."""
    import itertools
    import tracemalloc

    tracemalloc.start(1)
    numbers = itertools.count()

    def snapshot(signum: int, frame: Any) -> None:
        path = f"{prefix}-{next(numbers)}.snap"
        tracemalloc.take_snapshot().dump(path + ".part")
        os.replace(path + ".part", path)

    signal.signal(signal.SIGUSR1, snapshot)


def _announce(port: int, source: str) -> None:
    sys.stdout.write(f"READY {port} {source}\n")
    sys.stdout.flush()


def serve_statemux(
    impl: str, workload: str, root: str, source: str, max_connections: int, profiler: Any = None
) -> None:
    import statemux

    name = STATEMUX_IMPLS[impl]
    base = getattr(statemux, name, None)
    if base is None:
        raise SystemExit(f"statemux has no {name}: the {impl} model is not available")
    factory, origin = machine_factory(workload, root, source)
    # A backlog as deep as the multiplexing server's for every model, and daemon threads so
    # the process exits at once; nothing else differs from the class users get.
    attributes = {
        "request_queue_size": socket.SOMAXCONN,
        "daemon_threads": True,
        "block_on_close": False,
    }
    if impl == "forking":
        attributes["max_children"] = FORKING_MAX_CHILDREN
    cls = type(f"Bench{name}", (base,), attributes)
    server = cls(("127.0.0.1", 0), factory, max_connections=max_connections, idle_timeout=None)
    _announce(server.server_address[1], origin)
    if profiler is not None:
        profiler.enable()  # only serving is profiled, not imports and setup
    server.serve_forever()


def serve_stdlib(workload: str, root: str) -> None:
    from .baselines import BaselineThreadingServer, StreamHttp, StreamResp

    handler = StreamHttp if workload == "http" else StreamResp
    server = BaselineThreadingServer(("127.0.0.1", 0), handler, _baseline_shared(workload, root))
    _announce(server.server_address[1], "baseline")
    server.serve_forever()


def serve_asyncio(workload: str, root: str, use_uvloop: bool, profiler: Any = None) -> None:
    from .baselines import AsyncioHttp, AsyncioResp

    if use_uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    shared = _baseline_shared(workload, root)
    proto = AsyncioHttp if workload == "http" else AsyncioResp
    server = loop.run_until_complete(
        loop.create_server(lambda: proto(shared), "127.0.0.1", 0, backlog=socket.SOMAXCONN)
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    _announce(server.sockets[0].getsockname()[1], "baseline")
    if profiler is not None:
        profiler.enable()
    loop.run_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m statemux.bench.serve")
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--workload", choices=("http", "resp"), required=True)
    parser.add_argument("--root", default=".", help="directory of files the HTTP workload serves")
    parser.add_argument("--machines", choices=("auto", "real", "fallback"), default="auto")
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on")
    parser.add_argument(
        "--memory-snapshots",
        default="",
        help="trace allocations; on SIGUSR1 write a tracemalloc snapshot to PREFIX-N.snap",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="write cProfile stats of serving to this file (statemux and asyncio servers)",
    )
    args = parser.parse_args(argv)

    if args.memory_snapshots:
        _trace_memory(args.memory_snapshots)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    nofile = raise_nofile()
    _watch_parent()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    try:
        if args.impl in STATEMUX_IMPLS:
            serve_statemux(
                args.impl, args.workload, args.root, args.machines, max(nofile - 100, 1), profiler
            )
        elif args.impl == "stdlib-threading":
            serve_stdlib(args.workload, args.root)
        else:
            serve_asyncio(args.workload, args.root, args.impl == "uvloop", profiler)
    except _Stop:
        pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        sys.stdout.flush()
        sys.stderr.flush()
    # Skip interpreter teardown: thousands of threads or connections need no orderly goodbye.
    os._exit(0)


if __name__ == "__main__":
    main()
