"""What every statemux server has, whatever its concurrency model.

:class:`MachineHostMixIn` gives a ``socketserver`` class the machine-facing side: the named
limits, the tracer, the broadcast hub, per-server counters, the error funnel into
``handle_error``, and the connection-table snapshot. The model-specific mix-ins build on it.
"""

from __future__ import annotations

import functools
import logging
import socketserver
import sys
import time
from typing import Any

import attrs

from .connection import Connection, Stats, Tracer
from .events import CloseReason
from .hub import Hub
from .limits import Limits
from .machine import Machine

__all__ = [
    "MachineHostMixIn",
    "ConnectionInfo",
    "datagram_bufsize",
    "machine_class_of",
    "is_handler_class",
    "log",
]

log = logging.getLogger("statemux")


def is_handler_class(factory: Any) -> bool:
    """True for a stdlib ``socketserver.BaseRequestHandler`` subclass."""
    return isinstance(factory, type) and issubclass(factory, socketserver.BaseRequestHandler)


def machine_class_of(factory: Any) -> type[Machine] | None:
    """The machine class a factory makes, when it can be told without calling it:
    a Machine subclass, or a ``functools.partial`` of one (nested partials too)."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    if isinstance(factory, type) and issubclass(factory, Machine):
        return factory
    return None


def datagram_bufsize(cls: type[Machine]) -> int:
    """Bytes to ask of a datagram socket for this machine: one more than the largest frame
    any state accepts, so an oversized datagram is seen (cut to this size) as too long."""
    sizes = [st.framing.max_size for st in cls.spec.states.values() if st.framing is not None]
    return (max(sizes) if sizes else 65535) + 1


@attrs.frozen
class ConnectionInfo:
    """One row of the connection table, as ``server.connections`` reports it."""

    id: int
    peer: Any
    machine: str
    state: str
    age: float
    bytes_in: int
    bytes_out: int
    buffered_in: int
    buffered_out: int
    closing: str | None


class MachineHostMixIn:
    """Machine hosting shared by every model. Subclasses call :meth:`_init_host` first.

    Class attributes a subclass may override: ``limits`` (a :class:`Limits`),
    ``tracer`` (a tracer callable or None).
    """

    limits: Limits = Limits()
    tracer: Tracer | None = None
    RequestHandlerClass: Any

    def _init_host(
        self, factory: Any, tracer: Tracer | None, hub: Hub | None, limits: dict[str, Any]
    ) -> None:
        self.limits = type(self).limits.evolve(**limits) if limits else type(self).limits
        if tracer is not None:
            self.tracer = tracer
        self.hub = hub if hub is not None else Hub()
        self.stats = Stats()
        self.machine_class = machine_class_of(factory)
        self._next_cid = 1
        self.time = time.monotonic

    def _new_cid(self) -> int:
        cid = self._next_cid
        self._next_cid = cid + 1
        return cid

    def make_machine(self) -> Machine:
        """Instantiate a machine from the factory (``RequestHandlerClass``) and check it."""
        machine = self.RequestHandlerClass()
        if not isinstance(machine, Machine):
            raise TypeError(
                f"the factory {self.RequestHandlerClass!r} returned {type(machine).__qualname__}, "
                "not a statemux Machine"
            )
        if self.machine_class is None:
            self.machine_class = type(machine)
        return machine

    def _serve_request(self, request: Any, client_address: Any) -> None:
        """``socketserver``'s sequence for one accepted request: ``verify_request``, then
        ``process_request``; an exception goes to ``handle_error``; a refused or failed
        request is shut down."""
        if self.verify_request(request, client_address):  # type: ignore[attr-defined]
            try:
                self.process_request(request, client_address)  # type: ignore[attr-defined]
            except (KeyboardInterrupt, SystemExit):
                self.shutdown_request(request)  # type: ignore[attr-defined]
                raise
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)  # type: ignore[attr-defined]
        else:
            self._count_refused()
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def _count_refused(self) -> None:
        self.stats.close_reasons[CloseReason.REFUSED] += 1

    def report_error(self, conn: Connection) -> None:
        """Runner's error funnel: called inside ``except`` with the exception current."""
        self.handle_error(getattr(conn, "sock", None), conn.peer)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log the current exception with its traceback on the ``statemux`` logger.

        May be overridden (as in ``socketserver``); it runs inside the ``except`` block, so
        ``sys.exc_info()`` is the exception. The connection it concerns is closed afterwards;
        the server goes on.
        """
        exc = sys.exc_info()[1]
        log.error(
            "error while handling a connection from %s: %r", client_address, exc, exc_info=True
        )

    def _snapshot(self, conns: Any) -> list[ConnectionInfo]:
        now = time.monotonic()
        rows = []
        for conn in list(conns):
            rows.append(
                ConnectionInfo(
                    id=conn.cid,
                    peer=conn.peer,
                    machine=conn.spec.name,
                    state=conn.state.name,
                    age=now - conn.opened_at,
                    bytes_in=conn.bytes_in,
                    bytes_out=conn.bytes_out,
                    buffered_in=len(conn.rbuf.data),
                    buffered_out=conn._buffered(),
                    closing=conn.closing.value if conn.closing is not None else None,
                )
            )
        return rows
