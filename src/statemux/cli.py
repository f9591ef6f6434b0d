"""The ``statemux`` command: ``serve``, ``diagram``, ``table`` and ``bench``.

``statemux serve NAME`` serves a ready service (``statemachines.NAME.SERVICE``);
``statemux serve module:Class`` serves any machine class or zero-argument factory. One process
serves every address it is given (``--tcp``, ``--unix``, ``--udp``, ``--unix-dgram``, or the
services of a ``--config`` file) from one multiplexing loop, or under the threading, forking
or sync model. ``--workers N`` forks N processes after binding, each running its own loop on
the shared listening sockets. The first SIGINT or SIGTERM stops accepting and drains open
connections (bounded by ``drain_timeout``); a second one forces the exit.

``statemux diagram`` prints a machine's transition table as Mermaid, DOT or Markdown;
``statemux table PATH`` prints a running server's connection table from its admin socket
(``serve --admin PATH``). ``docs/operations.md`` is the reference.

Callers may use :func:`main` (``main(argv) -> exit status``); everything else is internal.
Mistakes on the command line or in a config file print one line on stderr and exit with
status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import importlib
import inspect
import json
import logging
import os
import pkgutil
import re
import selectors
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import attrs

from . import __version__
from .admin import Admin, AdminView, listen_url, unix_text
from .blocking import peer_state_reason
from .framing import Datagram
from .host import MachineHostMixIn, machine_class_of
from .hub import Hub
from .limits import Limits
from .loop import Loop
from .machine import Machine
from .service import Service
from .trace import LoggingTracer

__all__ = ["main", "refusal", "UsageError", "MODELS", "TRANSPORTS"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_FORCED = 130

#: the concurrency models ``--model`` chooses from
MODELS = ("multiplex", "threading", "forking", "sync")
#: the transports, each an option (``--tcp`` …) and a config file key (``unix_dgram``)
TRANSPORTS = ("tcp", "unix", "udp", "unix-dgram")
_CLASS_PREFIX = {
    "multiplex": "Multiplexing",
    "threading": "Threading",
    "forking": "Forking",
    "sync": "",
}
_CLASS_SUFFIX = {
    "tcp": "TCPServer",
    "udp": "UDPServer",
    "unix": "UnixStreamServer",
    "unix-dgram": "UnixDatagramServer",
}
#: the longest Unix socket path the kernel takes (sun_path is 108 bytes with its NUL)
MAX_UNIX_PATH = 107
#: a worker that dies is restarted, unless this many restarts happened in the window
WORKER_RESTARTS = 5
WORKER_RESTART_WINDOW = 10.0
#: the admin socket's own bounds: a few local operators, replies up to the table's size
ADMIN_LIMITS = {"max_connections": 8, "idle_timeout": 600.0, "output_limit": 256 * 1024 * 1024}


class UsageError(Exception):
    """A mistake on the command line or in a config file: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (raised as :class:`UsageError`)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# -- what to serve ------------------------------------------------------------------------------


@attrs.frozen
class Target:
    """A machine to serve: a ready service, or a class/factory named ``module:attr``."""

    label: str
    service: Service

    @property
    def options(self) -> dict[str, Any]:
        return {opt.dest: opt for opt in self.service.options}


def ready_services() -> list[str]:
    """Names of the modules in ``statemachines/`` that define ``SERVICE`` (read, not imported:
    listing them must not run them)."""
    try:
        package = importlib.import_module("statemachines")
    except ImportError:
        return []
    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        path = os.path.join(getattr(info.module_finder, "path", ""), info.name + ".py")
        try:
            with open(path, encoding="utf-8") as f:
                if re.search(r"^SERVICE\s*[:=]", f.read(), re.MULTILINE):
                    names.append(info.name)
        except OSError:
            names.append(info.name)
    return sorted(names)


def _unknown(name: str) -> UsageError:
    names = ", ".join(ready_services()) or "none installed"
    return UsageError(f"unknown machine {name!r}; ready services: {names}; or give module:Class")


def _import(module_name: str, what: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise _unknown(what) from None
        raise UsageError(f"cannot import {module_name}: {exc}") from None
    except Exception as exc:  # a machine that fails validation, a syntax error …
        raise UsageError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None


def _machine_service(label: str, obj: Any) -> Service:
    """Wrap a machine class or factory as a service with the generic defaults."""
    cls = machine_class_of(obj)
    if cls is None:
        if not callable(obj):
            raise UsageError(f"{label} is not a machine class, a machine factory or a Service")
        try:
            made = obj()
        except Exception as exc:
            raise UsageError(f"{label}() failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(made, Machine):
            raise UsageError(
                f"{label} is not a machine class, a machine factory or a Service "
                f"(calling it returned {type(made).__name__})"
            )
        cls = type(made)
    datagram_only = isinstance(cls.spec.initial.framing, Datagram)

    def build(datagram: bool = False, **options: Any) -> Callable[[], Any]:
        return obj  # type: ignore[no-any-return]

    return Service(
        name=label,
        summary=(cls.__doc__ or cls.__name__).strip().splitlines()[0],
        build=build,
        stream=not datagram_only,
        datagram=True,
    )


def resolve(spec: str) -> Target:
    """``NAME`` (a ready service) or ``module:attr`` (a machine class, factory or Service)."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise UsageError(f"bad machine {spec!r}: expected NAME or module:Class")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: modules next to you import
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"cannot import module {module_name!r} for {spec!r}: {exc} "
                "(it is looked up in the current directory and on sys.path)"
            ) from None
        except Exception as exc:  # a machine that fails validation, a syntax error …
            raise UsageError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
        obj: Any = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise UsageError(f"{module_name} has no attribute {attr!r}") from None
        if isinstance(obj, Service):
            return Target(spec, obj)
        return Target(spec, _machine_service(spec, obj))
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", spec):
        raise _unknown(spec)
    module = _import(f"statemachines.{spec}", spec)
    service = getattr(module, "SERVICE", None)
    if not isinstance(service, Service):
        raise UsageError(f"statemachines.{spec} defines no SERVICE (a statemux.service.Service)")
    return Target(spec, service)


# -- addresses ----------------------------------------------------------------------------------


@attrs.frozen
class Endpoint:
    """One address to listen on."""

    transport: str
    address: Any
    family: int

    @property
    def datagram(self) -> bool:
        return self.transport in ("udp", "unix-dgram")

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"{self.transport}:{unix_text(self.address)}"
        host, port = self.address
        return f"{self.transport}://" + (
            f"[{host}]:{port}" if self.family == socket.AF_INET6 else f"{host}:{port}"
        )


_INET6 = re.compile(r"\[([^\[\]]+)\]:(\d+)")
_INET = re.compile(r"([^:\[\]]*):(\d+)")


def parse_address(transport: str, text: str, option: str | None = None) -> Endpoint:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``PORT`` (on 127.0.0.1) or ``:PORT`` (every
    interface) for tcp/udp; a path, or ``@NAME`` (Linux abstract namespace), for
    unix/unix-dgram. ``option`` names the flag in error messages (default ``--TRANSPORT``)."""
    option = option or "--" + transport
    if transport in ("unix", "unix-dgram"):
        if not text or text == "@" or "\0" in text:
            raise UsageError(f"bad address for {option}: expected a socket path or @NAME")
        if text.startswith("@"):
            text = "\0" + text[1:]
        size = len(os.fsencode(text))
        if size > MAX_UNIX_PATH:
            raise UsageError(
                f"bad address for {option}: path is {size} bytes, longer than {MAX_UNIX_PATH}"
            )
        return Endpoint(transport, text, socket.AF_UNIX)
    m6 = _INET6.fullmatch(text)
    m4 = _INET.fullmatch(text)
    if m6:
        host, port_text, family = m6.group(1), m6.group(2), socket.AF_INET6
        try:
            socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
        except OSError:
            raise UsageError(
                f"bad address {text!r} for {option}: {host!r} is not an IPv6 address"
            ) from None
    elif m4:
        host, port_text, family = m4.group(1) or "0.0.0.0", m4.group(2), socket.AF_INET
    elif text.isdigit():
        host, port_text, family = "127.0.0.1", text, socket.AF_INET
    else:
        raise UsageError(
            f"bad address {text!r} for {option}: expected HOST:PORT, [IPV6]:PORT or PORT"
        )
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"bad address {text!r} for {option}: port {port} is above 65535")
    return Endpoint(transport, (host, port), family)


def default_endpoint(service: Service) -> Endpoint:
    """The service's default port on 127.0.0.1, over TCP (UDP for datagram-only services)."""
    transport = "tcp" if service.stream else "udp"
    return Endpoint(transport, ("127.0.0.1", service.default_port), socket.AF_INET)


# -- limits -------------------------------------------------------------------------------------


def _limit_docs() -> dict[str, str]:
    """The ``#:`` comment above each field of :class:`Limits`, for ``--help``."""
    try:
        source = inspect.getsource(Limits)
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip().replace("``", ""))
            continue
        m = re.match(r"(\w+)\s*:", text)
        if m and pending:
            docs[m.group(1)] = " ".join(pending)
        pending = []
    return docs


_SIZE = re.compile(r"(-?\d+)\s*([kmg]i?b?)?", re.IGNORECASE)
_DURATION = re.compile(r"(-?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h)?", re.IGNORECASE)
_SIZE_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}
_TIME_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_limit(name: str, value: Any) -> Any:
    """A limit's value from the command line or a config file: sizes take K/M/G (binary),
    durations take ms/s/m/h, and a timeout that may be off takes ``off`` (or ``false``)."""
    field = attrs.fields_dict(Limits)[name]
    kind = str(field.type)
    optional = "None" in kind
    is_float = "float" in kind
    if isinstance(value, bool):
        if value is False and optional:
            return None
        raise ValueError(f"{name} must be a number, not {value!r}")
    if isinstance(value, int | float):
        if not is_float and not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, not {value!r}")
        return float(value) if is_float else value
    text = str(value).strip()
    if optional and text.lower() in ("off", "none", "false"):
        return None
    if is_float:
        m = _DURATION.fullmatch(text)
        if not m:
            raise ValueError(
                f"{name} must be a duration in seconds (30, 1.5, 500ms, 5m), not {text!r}"
            )
        return float(m.group(1)) * _TIME_UNITS[(m.group(2) or "s").lower()]
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{name} must be a whole number (4096, 64K, 4M), not {text!r}")
    return int(m.group(1)) * _SIZE_UNITS.get((m.group(2) or " ")[0].lower(), 1)


def check_limits(overrides: dict[str, Any], where: str = "") -> Limits:
    """The limits these overrides give, or a usage error naming the offending limit."""
    try:
        return Limits().evolve(**overrides)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}{exc}") from None


def _add_limit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "limits (sizes take K/M/G, durations ms/s/m/h, timeouts 'off')"
    )
    docs = _limit_docs()
    for field in attrs.fields(Limits):
        default = field.default
        shown = (
            "off" if default is None else f"{default:g}" if isinstance(default, float) else default
        )
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest="limit_" + field.name,
            metavar="N",
            type=functools.partial(_limit_arg, field.name),
            default=argparse.SUPPRESS,
            help=f"{docs.get(field.name, field.name.replace('_', ' '))} (default {shown})",
        )


def _limit_arg(name: str, text: str) -> Any:
    try:
        return parse_limit(name, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {k[len("limit_") :]: v for k, v in vars(ns).items() if k.startswith("limit_")}


# -- the plan -----------------------------------------------------------------------------------


@attrs.define
class ServicePlan:
    """One service: where it listens, its options, its limit overrides."""

    target: Target
    endpoints: list[Endpoint]
    options: dict[str, Any] = attrs.field(factory=dict)
    limits: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class RunPlan:
    """Everything ``serve`` will do."""

    services: list[ServicePlan]
    model: str = "multiplex"
    workers: int = 1
    trace: bool = False
    admin: str | None = None


def _check_transports(plan: ServicePlan) -> None:
    service = plan.target.service
    for ep in plan.endpoints:
        if ep.datagram and not service.datagram:
            raise UsageError(
                f"{plan.target.label} speaks only stream transports (TCP, Unix stream); "
                f"it cannot be served on {ep}"
            )
        if not ep.datagram and not service.stream:
            raise UsageError(
                f"{plan.target.label} speaks only datagram transports (UDP, Unix datagram); "
                f"it cannot be served on {ep}"
            )


def refusal(
    model: str, workers: int, cls: type[Machine] | None, label: str, datagram: bool = False
) -> str | None:
    """Why ``model`` (run in ``workers`` processes) cannot serve machines of ``cls``, or None.

    The same rules the server classes enforce in their constructors, said before anything
    is bound and in the command's terms; ``--workers`` refuses what forking refuses.
    """
    if cls is None:
        return None
    name = cls.__qualname__
    if model == "forking" and cls.shares_memory:
        return (
            f"the forking model cannot serve {label} ({name}): it shares memory between "
            "connections (shares_memory = True), and each forked child has its own copy of "
            "memory, so a shared store or room would silently split into one per connection; "
            "use --model threading or multiplex"
        )
    if model == "sync" and cls.waits_for_peers:
        return (
            f"the sync model cannot serve {label} ({name}): its connections wait for other "
            "connections (waits_for_peers = True), and the sync model serves one connection "
            "at a time, so it would wait forever; use --model threading or multiplex"
        )
    if model == "forking" and datagram:
        reason = peer_state_reason(cls)
        if reason is not None:
            return (
                f"the forking model cannot serve {label} ({name}) on a datagram socket: it "
                f"keeps per-peer state across datagrams ({reason}), and a forking datagram "
                "server handles each datagram with a new machine in a new child; use --model "
                "threading or multiplex"
            )
    return workers_refusal(workers, cls, datagram, label)


def workers_refusal(
    workers: int, cls: type[Machine] | None, datagram: bool, label: str
) -> str | None:
    """Why ``workers`` processes cannot serve machines of ``cls``, or None. Forked workers
    refuse what forking servers refuse, for the same reasons."""
    if workers <= 1 or cls is None:
        return None
    name = cls.__qualname__
    if cls.shares_memory:
        return (
            f"--workers {workers} cannot serve {label} ({name}): it shares memory between "
            "connections (shares_memory = True), and each forked worker has its own copy of "
            "memory, so a shared store or room would silently split into one per worker; "
            "serve it with one process"
        )
    if datagram:
        reason = peer_state_reason(cls)
        if reason is not None:
            return (
                f"--workers {workers} cannot serve {label} ({name}) on a datagram socket: it "
                f"keeps per-peer state across datagrams ({reason}), and a peer's datagrams may "
                "reach any worker; declare per_peer_state = False if it keeps none, or serve "
                "it with one process"
            )
    return None


# -- servers ------------------------------------------------------------------------------------


def server_class(model: str, ep: Endpoint) -> type:
    """The statemux server class for ``model`` on ``ep``'s transport (an IPv6 host makes an
    IPv6 socket by itself)."""
    name = _CLASS_PREFIX[model] + _CLASS_SUFFIX[ep.transport]
    try:
        servers = importlib.import_module("statemux.servers")
    except ImportError as exc:  # pragma: no cover - the package is broken
        raise UsageError(f"cannot import statemux.servers: {exc}") from None
    cls = getattr(servers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, MachineHostMixIn)):
        raise UsageError(
            f"the {model} model is not available for {ep.transport}: "
            f"statemux.servers has no {name} serving machines"
        )
    return cls


@attrs.define
class Opened:
    """A bound server and what is needed to announce and clean it up."""

    label: str
    endpoint: Endpoint
    server: Any
    service: Service


def open_server(
    model: str,
    ep: Endpoint,
    factory: Any,
    *,
    tracer: Any,
    hub: Hub,
    limits: dict[str, Any],
    label: str,
) -> Any:
    """Bind ``ep`` with the model's server class; errors become one-line usage errors."""
    cls = server_class(model, ep)
    try:
        return cls(ep.address, factory, tracer=tracer, hub=hub, **limits)
    except socket.gaierror as exc:
        raise UsageError(
            f"cannot listen on {ep}: cannot resolve {ep.address[0]!r} ({exc.strerror})"
        ) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EADDRINUSE, errno.EEXIST):
            reason = "address already in use"
            if ep.family == socket.AF_UNIX:
                reason += " (a running server's socket, or a file that is not a socket)"
        raise UsageError(f"cannot listen on {ep}: {reason}") from None
    except (TypeError, ValueError) as exc:  # UnsupportedMachine, when not told in advance
        raise UsageError(f"{label} on {ep}: {exc}") from None


def open_all(plan: RunPlan, tracer: Any) -> list[Opened]:
    """Build each service's factories (once per stream/datagram) and bind every address.

    Servers of one service share its factory and its hub, so a chat served on TCP and on a
    Unix socket is one chat. Everything bound so far is closed if one address fails.
    """
    opened: list[Opened] = []
    try:
        for sp in plan.services:
            service = sp.target.service
            label = sp.target.label
            _check_transports(sp)
            limits = sp.limits
            check_limits(limits, f"{label}: ")
            hub = Hub(threading.Lock()) if plan.model != "multiplex" else Hub()
            factories: dict[bool, Any] = {}
            for ep in sp.endpoints:
                if ep.datagram not in factories:
                    try:
                        factory = service.build(datagram=ep.datagram, **sp.options)
                    except (TypeError, ValueError, OSError) as exc:
                        raise UsageError(f"{label}: {exc}") from None
                    cls = _machine_class(factory)
                    why = refusal(plan.model, plan.workers, cls, label, ep.datagram)
                    if why:
                        raise UsageError(why)
                    factories[ep.datagram] = factory
                server = open_server(
                    plan.model,
                    ep,
                    factories[ep.datagram],
                    tracer=tracer,
                    hub=hub,
                    limits=limits,
                    label=label,
                )
                opened.append(Opened(label, ep, server, service))
    except BaseException:
        close_all(opened)
        raise
    return opened


def _machine_class(factory: Any) -> type[Machine] | None:
    cls = machine_class_of(factory)
    if cls is None:
        try:
            made = factory()
        except Exception:
            return None
        cls = type(made) if isinstance(made, Machine) else None
    return cls


def close_all(opened: Sequence[Opened]) -> None:
    """Close every server (a Unix socket file goes with the process that bound it)."""
    for entry in opened:
        with contextlib.suppress(Exception):
            entry.server.server_close()


def open_admin(path: str, opened: Sequence[Opened]) -> Any:
    """The admin socket (mode 0600) reporting on ``opened``: a multiplexing Unix server."""
    from .servers import MultiplexingUnixStreamServer

    ep = parse_address("unix", path, option="--admin")
    view = AdminView()
    for entry in opened:
        view.add(entry.label, entry.server)
    try:
        return MultiplexingUnixStreamServer(
            ep.address, functools.partial(Admin, view), socket_mode=0o600, **ADMIN_LIMITS
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EADDRINUSE, errno.EEXIST):
            reason = "in use by a running server, or a file that is not a socket"
        raise UsageError(f"cannot open the admin socket {path}: {reason}") from None


# -- announcing ---------------------------------------------------------------------------------


def _shown_host(ep: Endpoint, address: Any) -> str:
    host = address[0]
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return str(host)


def connect_hint(service: Service, ep: Endpoint, address: Any) -> str:
    """How to reach a bound server, from the service's ``connect_hint*`` templates."""
    if ep.family == socket.AF_UNIX:
        template = (
            service.connect_hint_unix
            if not ep.datagram
            else getattr(service, "connect_hint_unix_datagram", "nc -uU {path}")
        )
        fields = {
            "path": unix_text(address),
            "host": "",
            "port": "",
        }
    else:
        template = service.connect_hint_datagram if ep.datagram else service.connect_hint
        host = _shown_host(ep, address)
        if ep.family == socket.AF_INET6 and "//{host}" in template:
            template = template.replace("//{host}", "//[{host}]")  # a URL needs brackets
        fields = {"host": host, "port": address[1], "path": ""}
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError):
        return (
            "nc {host} {port}".format(**fields)
            if ep.family != socket.AF_UNIX
            else f"nc -U {fields['path']}"
        )


def self_command() -> str:
    """How the user can run this command again: ``statemux`` when that is on PATH,
    else ``PYTHON -m statemux`` (relative to the working directory when inside it)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "statemux":
        found = shutil.which("statemux")
        if found and os.path.realpath(found) == os.path.realpath(argv0):
            return "statemux"
        return argv0
    exe = sys.executable or "python3"
    with contextlib.suppress(ValueError):
        relative = os.path.relpath(exe)
        if not relative.startswith(".."):
            exe = relative
    return f"{exe} -m statemux"


def announce_admin(path: str, out: TextIO) -> None:
    print(f"statemux: admin socket {path}  try: {self_command()} table {path}", file=out)


def announce_ready(plan: RunPlan, opened: Sequence[Opened], out: TextIO) -> None:
    """Where each server listens, the admin socket, then the ``ready`` line (flushed)."""
    announce(opened, out)
    if plan.admin:
        announce_admin(plan.admin, out)
    print(
        f"statemux: ready: {len(opened)} address(es), {plan.model} model, pid {os.getpid()}; "
        "Ctrl-C or SIGTERM stops gracefully",
        file=out,
        flush=True,
    )


def announce(opened: Sequence[Opened], out: TextIO) -> None:
    for entry in opened:
        address = entry.server.server_address
        hint = connect_hint(entry.service, entry.endpoint, address)
        print(
            f"statemux: {entry.label} listening on {listen_url(entry.server)}  try: {hint}",
            file=out,
        )


# -- signals ------------------------------------------------------------------------------------


class Signals:
    """SIGINT/SIGTERM handling: the first one calls ``on_first`` (which must not block);
    each later one calls ``on_again``, by default raising KeyboardInterrupt (a forced exit).

    A forked child that inherited these handlers gets the default action instead.
    """

    def __init__(
        self,
        on_first: Callable[[int], None],
        on_again: Callable[[int], None] | None = None,
        signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        self.on_first = on_first
        self.on_again = on_again
        self.signals = tuple(signals)
        self.count = 0
        self.pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a child forked by a forking server
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.count += 1
        if self.count == 1:
            self.on_first(signum)
        elif self.on_again is not None:
            self.on_again(signum)
        else:
            raise KeyboardInterrupt

    def install(self) -> None:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[Signals]:
        self.install()
        try:
            yield self
        finally:
            self.restore()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


# -- running ------------------------------------------------------------------------------------


def _open_connections(servers: Sequence[Any]) -> int:
    return sum(len(getattr(s, "connections", ())) for s in servers)


def _drain_timeout(opened: Sequence[Opened]) -> float:
    return max((e.server.limits.drain_timeout for e in opened), default=Limits().drain_timeout)


def refuse_new_connections(opened: Sequence[Opened]) -> None:
    """Have the kernel refuse new connections at once, so clients and a load balancer's health
    checks see the stop instead of waiting in the listen backlog to be reset at exit.

    On Linux, ``shutdown()`` of a listening socket does that (pending connections are reset,
    new ones refused); elsewhere it fails harmlessly and connections wait in the backlog.
    Called once, just before the drain, which unregisters the listeners before the loop
    waits again.
    """
    for entry in opened:
        if not entry.endpoint.datagram:
            with contextlib.suppress(OSError):
                entry.server.socket.shutdown(socket.SHUT_RD)


def run_loop(
    loop: Loop,
    opened: Sequence[Opened],
    err: TextIO,
    ready: Callable[[], None],
    *,
    refuse: bool = True,
) -> int:
    """Run ``loop`` in this thread until a signal; drain; return the exit status.
    ``ready()`` announces the server once the signal handlers are in place; ``refuse``
    makes the listeners refuse new connections when the stop begins."""
    servers = [e.server for e in opened]
    drain_timeout = _drain_timeout(opened)

    def stop(signum: int) -> None:
        if refuse:
            refuse_new_connections(opened)
        err.write(
            f"statemux: {_signal_name(signum)}: draining open connections "
            f"(up to {drain_timeout:g}s); send it again to force\n"
        )
        err.flush()
        loop.shutdown()  # from the loop thread: only asks the loop to stop

    signals = Signals(lambda signum: loop.call_soon_threadsafe(stop, signum))
    with signals.installed():
        ready()
        try:
            loop.run(None)
        except KeyboardInterrupt:
            left = _open_connections(servers)
            err.write(f"statemux: forced exit; {left} connection(s) cut off\n")
            return EXIT_FORCED
    left = _open_connections(servers)
    if left:
        err.write(f"statemux: stopped; {left} connection(s) cut off after {drain_timeout:g}s\n")
    else:
        err.write("statemux: stopped\n")
    return EXIT_OK


def serve_multiplex(plan: RunPlan, opened: list[Opened], out: TextIO, err: TextIO) -> int:
    loop = Loop()
    admin = None
    try:
        for entry in opened:
            loop.add(entry.server)
        if plan.admin:
            admin = open_admin(plan.admin, opened)
            loop.add(admin)
        ready = functools.partial(announce_ready, plan, opened, out)
        return run_loop(loop, opened, err, ready)
    finally:
        if admin is not None:
            admin.server_close()
        close_all(opened)
        loop.close()


def serve_blocking(plan: RunPlan, opened: list[Opened], out: TextIO, err: TextIO) -> int:
    """Threading, forking or sync servers: each ``serve_forever`` in a thread; this thread
    waits for a signal, then shuts them down (their own drain) and closes them."""
    wake_r, wake_w = socket.socketpair()
    admin = None
    admin_loop: Loop | None = None
    threads: list[threading.Thread] = []
    try:
        for entry in opened:
            t = threading.Thread(
                target=entry.server.serve_forever, name=str(entry.endpoint), daemon=True
            )
            t.start()
            threads.append(t)
        if plan.admin:
            admin = open_admin(plan.admin, opened)
            admin_loop = Loop()
            admin_loop.add(admin)
            threading.Thread(target=admin_loop.run, args=(None,), name="admin", daemon=True).start()
        received: list[int] = []

        def first(signum: int) -> None:
            received.append(signum)
            with contextlib.suppress(OSError):
                wake_w.send(b"\0")

        with Signals(first).installed():
            announce_ready(plan, opened, out)
            try:
                while not received:
                    wake_r.recv(1)
                err.write(
                    f"statemux: {_signal_name(received[0])}: stopping; send it again to force\n"
                )
                err.flush()
                # Side by side, so the drains overlap: the stop takes one drain_timeout at most.
                stoppers = [
                    threading.Thread(target=entry.server.shutdown, daemon=True) for entry in opened
                ]
                for t in stoppers:
                    t.start()
                for t in stoppers:
                    t.join()  # interruptible: a second signal still forces the exit
            except KeyboardInterrupt:
                err.write("statemux: forced exit\n")
                return EXIT_FORCED
        err.write("statemux: stopped\n")
        return EXIT_OK
    finally:
        if admin_loop is not None:
            admin_loop.shutdown()
        if admin is not None:
            admin.server_close()
        close_all(opened)
        if admin_loop is not None:
            admin_loop.close()
        wake_r.close()
        wake_w.close()


def _remove_dead_socket(path: str) -> None:
    """Remove a Unix stream socket file nothing accepts on any more."""
    with contextlib.suppress(OSError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)


class Supervisor:
    """Forks ``workers`` processes that each run a loop on the already bound sockets,
    restarts a worker that dies, and forwards SIGINT/SIGTERM to them as SIGTERM.

    Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group; the parent
    alone decides) and stop when the parent dies (a pipe they watch reaches end of file).
    """

    def __init__(self, plan: RunPlan, opened: list[Opened], out: TextIO, err: TextIO) -> None:
        self.plan = plan
        self.opened = opened
        self.out = out
        self.err = err
        self.children: dict[int, int] = {}  # pid -> worker number
        self.stopping = False
        self.signals_seen = 0
        self.restarts: list[float] = []
        self.failed = False
        self.death_r, self.death_w = os.pipe()

    # -- parent -----------------------------------------------------------------------------
    def _forward(self, signum: int) -> None:
        """Signal handler: every signal is forwarded as SIGTERM (a worker's second SIGTERM
        forces its exit); from the third on, SIGKILL."""
        self.signals_seen += 1
        self.stopping = True
        sig = signal.SIGTERM if self.signals_seen <= 2 else signal.SIGKILL
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def spawn(self, number: int) -> int:
        # A child would write out whatever the parent had buffered: flush before forking.
        self.out.flush()
        self.err.flush()
        mask = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, reported through its exit
                status = EXIT_FAILED
                try:
                    status = self._worker(number, old)
                except UsageError as exc:
                    print(f"statemux: error: worker {number}: {exc}", file=sys.stderr)
                    status = EXIT_USAGE
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(status)
            self.children[pid] = number
            return pid
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def run(self) -> int:
        n = self.plan.workers
        signals = Signals(self._forward, self._forward)
        with signals.installed():
            announce(self.opened, self.out)
            for number in range(1, n + 1):
                pid = self.spawn(number)
                print(f"statemux: worker {number} started (pid {pid})", file=self.out)
            if self.plan.admin:
                print(
                    f"statemux: admin sockets {self.plan.admin}.1 … {self.plan.admin}.{n}  "
                    f"try: {self_command()} table {self.plan.admin}.1",
                    file=self.out,
                )
            print(
                f"statemux: ready: {len(self.opened)} address(es), {n} workers, multiplex model, "
                f"pid {os.getpid()}; Ctrl-C or SIGTERM stops gracefully",
                file=self.out,
                flush=True,
            )
            status = self._supervise()
        return status

    def _supervise(self) -> int:
        clean = True
        while self.children:
            try:
                pid, wstatus = os.wait()
            except ChildProcessError:
                break
            number = self.children.pop(pid, None)
            if number is None:
                continue
            code = os.waitstatus_to_exitcode(wstatus)
            how = (
                f"exited with status {code}"
                if code >= 0
                else f"was killed by {_signal_name(-code)}"
            )
            if self.stopping:
                if code != 0:
                    clean = False
                    self.err.write(f"statemux: worker {number} (pid {pid}) {how}\n")
                continue
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < WORKER_RESTART_WINDOW]
            if len(self.restarts) >= WORKER_RESTARTS:
                self.err.write(
                    f"statemux: worker {number} (pid {pid}) {how}; {WORKER_RESTARTS} restarts "
                    f"within {WORKER_RESTART_WINDOW:g}s, giving up\n"
                )
                self.failed = True
                self._forward(signal.SIGTERM)
                continue
            self.restarts.append(now)
            new = self.spawn(number)
            self.err.write(f"statemux: worker {number} (pid {pid}) {how}; restarted as pid {new}\n")
            self.err.flush()
            print(f"statemux: worker {number} started (pid {new})", file=self.out, flush=True)
        if self.failed:
            return EXIT_FAILED
        if self.signals_seen > 1:
            return EXIT_FORCED
        self.err.write("statemux: stopped\n" if clean else "statemux: stopped; a worker failed\n")
        return EXIT_OK if clean else EXIT_FAILED

    def close(self) -> None:
        for fd in (self.death_r, self.death_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        close_all(self.opened)
        if self.plan.admin:  # files a killed worker could not remove
            for number in range(1, self.plan.workers + 1):
                _remove_dead_socket(f"{self.plan.admin}.{number}")

    # -- worker -----------------------------------------------------------------------------
    def _worker(self, number: int, mask: Any) -> int:  # pragma: no cover - runs in a child
        os.close(self.death_w)
        loop = Loop()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        forced = False

        def stop(signum: int) -> None:
            loop.shutdown()

        def force(signum: int) -> None:
            nonlocal forced
            forced = True
            raise KeyboardInterrupt

        signals = Signals(
            lambda s: loop.call_soon_threadsafe(stop, s), force, signals=(signal.SIGTERM,)
        )
        signals.install()  # for the worker's whole life: it ends with os._exit
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        servers = [e.server for e in self.opened]
        for server in servers:
            loop.add(server)
        admin = None
        if self.plan.admin:
            admin = open_admin(f"{self.plan.admin}.{number}", self.opened)
            loop.add(admin)

        def parent_gone(mask: int) -> None:
            loop.selector.unregister(self.death_r)
            loop.shutdown()

        loop.selector.register(self.death_r, selectors.EVENT_READ, parent_gone)
        try:
            loop.run(None)
        except KeyboardInterrupt:
            forced = True
        finally:
            if admin is not None:
                admin.server_close()
            close_all(self.opened)  # socket files stay: the parent bound them
        return EXIT_FORCED if forced else EXIT_OK


@contextlib.contextmanager
def logging_to(err: TextIO, trace: bool) -> Iterator[None]:
    """Log warnings (and with ``--trace`` every transition) from the ``statemux`` loggers to
    ``err`` while serving; the logging configuration is restored afterwards."""
    handler = logging.StreamHandler(err)
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d %(name)s: %(message)s", "%H:%M:%S")
    )
    logger = logging.getLogger("statemux")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if trace else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def execute(plan: RunPlan, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Bind everything in ``plan``, then serve until a signal. Returns the exit status."""
    if plan.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {plan.workers}")
    if plan.workers > 1 and plan.model != "multiplex":
        raise UsageError(
            f"--workers runs one multiplexing loop per process; it cannot be combined with "
            f"--model {plan.model}"
        )
    if plan.admin:
        suffix = f".{plan.workers}" if plan.workers > 1 else ""
        parse_address("unix", plan.admin + suffix, option="--admin")
    tracer = LoggingTracer() if plan.trace else None
    opened = open_all(plan, tracer)
    with logging_to(err, plan.trace):
        if plan.workers > 1:
            supervisor = Supervisor(plan, opened, out, err)
            try:
                return supervisor.run()
            finally:
                supervisor.close()
        if plan.model == "multiplex":
            return serve_multiplex(plan, opened, out, err)
        return serve_blocking(plan, opened, out, err)


# -- serve: command line ------------------------------------------------------------------------


def _serve_parser(target: Target | None) -> _Parser:
    parser = _Parser(
        prog="statemux serve",
        usage="statemux serve [options] (NAME | module:Class | --config FILE) [service options]",
        description="Serve a ready service (statemachines/NAME.py) or any machine class, "
        "on one or more addresses, until SIGINT/SIGTERM (then drain gracefully).",
    )
    parser.add_argument("target", nargs="?", metavar="NAME|module:Class", help="what to serve")
    parser.add_argument("--config", metavar="FILE", help="serve the services of a TOML file")
    parser.add_argument("--model", choices=MODELS, help="concurrency model (default multiplex)")
    where = parser.add_argument_group(
        "addresses (several may be given; default: the service's port on 127.0.0.1)"
    )
    where.add_argument(
        "--tcp", action="append", default=[], metavar="HOST:PORT", help="TCP; [::1]:PORT for IPv6"
    )
    where.add_argument(
        "--unix", action="append", default=[], metavar="PATH", help="Unix stream socket"
    )
    where.add_argument(
        "--udp", action="append", default=[], metavar="HOST:PORT", help="UDP; [::1]:PORT for IPv6"
    )
    where.add_argument(
        "--unix-dgram", action="append", default=[], metavar="PATH", help="Unix datagram socket"
    )
    parser.add_argument(
        "--workers", type=int, metavar="N", help="fork N processes after binding (multiplex only)"
    )
    parser.add_argument(
        "--trace", action="store_true", default=None, help="log every transition to stderr"
    )
    parser.add_argument(
        "--admin", metavar="PATH", help="open an admin socket (mode 0600) for 'statemux table'"
    )
    _add_limit_options(parser)
    if target is not None and target.service.options:
        group = parser.add_argument_group(f"{target.label} options")
        for opt in target.service.options:
            help_text = opt.help + ("" if opt.default is None else f" (default {opt.default})")
            try:
                group.add_argument(
                    opt.flag,
                    dest="opt_" + opt.dest,
                    type=opt.type,
                    default=argparse.SUPPRESS,
                    metavar=opt.dest.upper(),
                    help=help_text,
                )
            except argparse.ArgumentError as exc:
                raise UsageError(
                    f"{target.label}: option {opt.flag} clashes with a statemux option ({exc})"
                ) from None
    return parser


def _endpoints(ns: argparse.Namespace) -> list[Endpoint]:
    eps = []
    for transport in TRANSPORTS:
        for text in getattr(ns, transport.replace("-", "_")):
            eps.append(parse_address(transport, text))
    return eps


def plan_from_args(argv: Sequence[str]) -> RunPlan:
    """Parse ``serve`` arguments in two steps: find the target, then parse again with its
    options added."""
    first, _ = _serve_parser(None).parse_known_args([a for a in argv if a not in ("-h", "--help")])
    target = resolve(first.target) if first.target else None
    ns = _serve_parser(target).parse_args(argv)
    overrides = _limit_overrides(ns)
    if ns.config:
        if ns.target:
            raise UsageError("give NAME or --config, not both")
        if _endpoints(ns):
            raise UsageError(
                "addresses come from the config file; remove --tcp/--unix/--udp/--unix-dgram"
            )
        plan = load_config(ns.config, cli_limits=overrides)
    else:
        if target is None:
            raise UsageError(
                "nothing to serve: give NAME, module:Class or --config FILE (see statemux serve --help)"
            )
        check_limits(overrides)
        eps = _endpoints(ns) or [default_endpoint(target.service)]
        options = {k[len("opt_") :]: v for k, v in vars(ns).items() if k.startswith("opt_")}
        plan = RunPlan([ServicePlan(target, eps, options, overrides)])
    if ns.model is not None:
        plan.model = ns.model
    if ns.workers is not None:
        plan.workers = ns.workers
    if ns.trace:
        plan.trace = True
    if ns.admin is not None:
        plan.admin = ns.admin
    return plan


def cmd_serve(argv: Sequence[str]) -> int:
    return execute(plan_from_args(argv))


# -- serve --config ------------------------------------------------------------------------------

_TOP_KEYS = {"model", "workers", "trace", "admin", "limits", "service"}
_ADDRESS_KEYS = {
    "tcp": "tcp",
    "unix": "unix",
    "udp": "udp",
    "unix_dgram": "unix-dgram",
    "unix-dgram": "unix-dgram",
}


def _config_limits(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: limits must be a table")
    known = attrs.fields_dict(Limits)
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"{where}: unknown limit {key!r}; limits: {', '.join(known)}")
        try:
            out[name] = parse_limit(name, value)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return out


def _option_value(opt: Any, value: Any, where: str) -> Any:
    if isinstance(value, str) or opt.type in (int, float):
        try:
            return opt.type(value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{where}: bad value {value!r} for {opt.dest}: {exc}") from None
    return value


def load_config(path: str, cli_limits: dict[str, Any] | None = None) -> RunPlan:
    """Read a ``serve --config`` file (schema in docs/operations.md).

    Limits: the file's ``[limits]``, then the command line's limit options, then each
    service's own ``limits`` table, the later winning.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: {exc}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise UsageError(
            f"{path}: unknown key {unknown[0]!r}; top-level keys: {', '.join(sorted(_TOP_KEYS))}"
        )
    model = data.get("model", "multiplex")
    if model not in MODELS:
        raise UsageError(f"{path}: model must be one of {', '.join(MODELS)}, not {model!r}")
    workers = data.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool):
        raise UsageError(f"{path}: workers must be a whole number, not {workers!r}")
    trace = data.get("trace", False)
    if not isinstance(trace, bool):
        raise UsageError(f"{path}: trace must be true or false, not {trace!r}")
    admin = data.get("admin")
    if admin is not None and not isinstance(admin, str):
        raise UsageError(f"{path}: admin must be a socket path, not {admin!r}")
    base = _config_limits(data.get("limits", {}), f"{path}: [limits]")
    base.update(cli_limits or {})
    entries = data.get("service")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: no [[service]] entries")
    services = []
    for i, entry in enumerate(entries, 1):
        where = f"{path}: [[service]] #{i}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: must be a table")
        name, machine = entry.get("name"), entry.get("machine")
        if (name is None) == (machine is None):
            raise UsageError(
                f'{where}: give exactly one of name = "NAME" or machine = "module:Class"'
            )
        spec = name if name is not None else machine
        if not isinstance(spec, str):
            raise UsageError(f"{where}: name/machine must be a string")
        target = resolve(spec)
        where = f"{path}: [[service]] #{i} ({target.label})"
        eps: list[Endpoint] = []
        options: dict[str, Any] = {}
        limits = dict(base)
        known = target.options
        for key, value in entry.items():
            if key in ("name", "machine"):
                continue
            if key in _ADDRESS_KEYS:
                values = value if isinstance(value, list) else [value]
                for text in values:
                    if not isinstance(text, str):
                        raise UsageError(
                            f"{where}: {key} must be an address string or a list of them"
                        )
                    try:
                        eps.append(parse_address(_ADDRESS_KEYS[key], text))
                    except UsageError as exc:
                        raise UsageError(f"{where}: {exc}") from None
            elif key == "limits":
                limits.update(_config_limits(value, f"{where}: limits"))
            else:
                opt = known.get(key.replace("-", "_"))
                if opt is None:
                    choices = ", ".join(known) or "none"
                    raise UsageError(
                        f"{where}: unknown option {key!r}; {target.label} options: {choices}"
                    )
                options[opt.dest] = _option_value(opt, value, where)
        check_limits(limits, f"{where}: ")
        services.append(
            ServicePlan(target, eps or [default_endpoint(target.service)], options, limits)
        )
    return RunPlan(services, model=model, workers=workers, trace=trace, admin=admin)


# -- diagram ------------------------------------------------------------------------------------


def cmd_diagram(argv: Sequence[str]) -> int:
    from .diagram import FORMATS, render

    parser = _Parser(
        prog="statemux diagram", description="Print a machine's states and transitions."
    )
    parser.add_argument("target", metavar="NAME|module:Class")
    parser.add_argument(
        "--format", choices=sorted(FORMATS), default="mermaid", help="default mermaid"
    )
    parser.add_argument("--datagram", action="store_true", help="the service's datagram machine")
    ns = parser.parse_args(argv)
    target = resolve(ns.target)
    service = target.service
    datagram = ns.datagram or not service.stream
    if datagram and not service.datagram:
        raise UsageError(f"{target.label} has no datagram machine")
    try:
        factory = service.build(datagram=datagram)
    except (TypeError, ValueError, OSError) as exc:
        raise UsageError(f"{target.label}: {exc}") from None
    cls = _machine_class(factory)
    if cls is None:
        raise UsageError(f"{target.label} does not build a statemux machine")
    sys.stdout.write(render(cls, ns.format))
    return EXIT_OK


# -- table --------------------------------------------------------------------------------------


def admin_request(path: str, command: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send one command to an admin socket; return the JSON rows of its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise UsageError(
                f"no admin socket at {path} (start the server with --admin {path})"
            ) from None
        except OSError as exc:
            raise UsageError(
                f"cannot connect to the admin socket {path}: {exc.strerror or exc}"
            ) from None
        try:
            sock.sendall(command.encode() + b"\n")
            buf = bytearray()
            while not (buf == b"\n" or buf.endswith(b"\n\n")):
                data = sock.recv(65536)
                if not data:
                    raise UsageError(f"{path}: the admin socket closed before the reply ended")
                buf += data
        except TimeoutError:
            raise UsageError(f"{path}: no reply within {timeout:g}s") from None
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror or exc}") from None
    rows = [json.loads(line) for line in buf.decode().splitlines() if line]
    for row in rows:
        if "error" in row:
            raise UsageError(f"{path}: {row['error']}")
    return rows


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rows(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: set[int]) -> str:
    """Align columns: numbers (indices in ``right``) to the right, text to the left."""
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ("SERVICE", "ID", "PEER", "STATE", "AGE", "IN", "OUT", "BUF-IN", "BUF-OUT", "CLOSING")
    body = [
        (
            r["service"],
            r["id"],
            r["peer"],
            r["state"],
            _age(r["age"]),
            r["bytes_in"],
            r["bytes_out"],
            r["buffered_in"],
            r["buffered_out"],
            r["closing"] or "",
        )
        for r in rows
    ]
    text = format_rows(headers, body, right={1, 4, 5, 6, 7, 8})
    return text if rows else text + "(no open connections)\n"


def format_stats(rows: Sequence[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        reasons = ", ".join(f"{k} {v}" for k, v in r["close_reasons"].items()) or "none yet"
        parts.append(
            f"{r['service']} on {r['listen']}: {r['connections']} open; closed: {reasons}\n"
        )
        if r["transitions"]:
            body = [(m, src, event, dst, n) for m, src, event, dst, n in r["transitions"]]
            parts.append(format_rows(("MACHINE", "FROM", "EVENT", "TO", "TIMES"), body, right={4}))
        parts.append("\n")
    return "".join(parts)


def cmd_table(argv: Sequence[str]) -> int:
    parser = _Parser(
        prog="statemux table",
        description="Show a running server's connection table, from its admin socket (serve --admin PATH).",
    )
    parser.add_argument("path", metavar="PATH", help="the admin socket")
    parser.add_argument(
        "--stats", action="store_true", help="transition counts and close reasons instead"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON rows as received")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    parser.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N views")
    ns = parser.parse_args(argv)
    if ns.watch is not None and ns.watch <= 0:
        raise UsageError(f"--watch must be positive, not {ns.watch:g}")
    if ns.count is not None and ns.count < 1:
        raise UsageError(f"--count must be at least 1, not {ns.count}")
    views = 1 if ns.watch is None else ns.count
    clear = ns.watch is not None and sys.stdout.isatty() and not ns.json
    shown = 0
    try:
        while views is None or shown < views:
            if shown:
                time.sleep(ns.watch)  # allowed: the refresh period the user asked for
            rows = admin_request(ns.path, "stats" if ns.stats else "table")
            if ns.json:
                text = "".join(json.dumps(r) + "\n" for r in rows)
            else:
                text = format_stats(rows) if ns.stats else format_table(rows)
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            elif ns.watch is not None and not ns.json:
                text = time.strftime("%H:%M:%S") + "\n" + text + "\n"
            sys.stdout.write(text)
            sys.stdout.flush()
            shown += 1
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


# -- bench --------------------------------------------------------------------------------------


def cmd_bench(argv: Sequence[str]) -> int:
    try:
        from statemux.bench import main as bench_main
    except ImportError as exc:
        raise UsageError(f"statemux bench is not available in this installation ({exc})") from None
    return int(bench_main(list(argv)) or 0)


# -- entry point ----------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "serve": (cmd_serve, "serve a ready service or a machine class"),
    "diagram": (cmd_diagram, "print a machine's diagram (mermaid, dot, table)"),
    "table": (cmd_table, "show a running server's connection table (admin socket)"),
    "bench": (cmd_bench, "compare the concurrency models under load"),
}


def _top_parser() -> _Parser:
    parser = _Parser(
        prog="statemux",
        description="Explicit per-connection state machines behind the socketserver interface.",
        epilog="'statemux COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"statemux {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``statemux`` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in COMMANDS:
            func = COMMANDS[args[0]][0]
            return func(args[1:])
        if not args:
            _top_parser().print_help(sys.stderr)
            return EXIT_USAGE
        _top_parser().parse_args(args)
        return EXIT_USAGE  # pragma: no cover - parse_args exits or raises
    except UsageError as exc:
        print(f"statemux: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `statemux diagram … | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return EXIT_FAILED
