"""How a ready service describes itself to the ``statemux`` command.

Each module in ``statemachines/`` defines ``SERVICE = Service(...)``: its name, a one-line
summary, its command-line options, and ``build(datagram=False, **options)`` returning the
zero-argument machine factory a server takes (shared services such as a store are created
there, once per server).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["Option", "Service"]


@attrs.frozen
class Option:
    """One service-specific command-line option (``--root DIR``, ``--max-keys N`` …)."""

    flag: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@attrs.frozen
class Service:
    """A ready machine, as the command line serves it."""

    name: str
    summary: str
    #: ``build(datagram: bool, **options) -> factory``; options are keyed by ``Option.dest``
    build: Callable[..., Callable[[], Any]]
    options: tuple[Option, ...] = ()
    #: which transports it speaks
    stream: bool = True
    datagram: bool = False
    #: default port on 127.0.0.1 when no address is given
    default_port: int = 0
    #: how to reach it, formatted with host, port and path: e.g. "curl http://{host}:{port}/"
    connect_hint: str = "nc {host} {port}"
    connect_hint_unix: str = "nc -U {path}"
    connect_hint_datagram: str = "nc -u {host} {port}"
    connect_hint_unix_datagram: str = "nc -uU {path}"
