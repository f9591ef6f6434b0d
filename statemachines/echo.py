"""Echo: every line (stream) or datagram comes back unchanged.

Stream variant (:class:`Echo`): lines end with ``\\n``; each line is sent back byte for byte with
its ``\\n`` (a ``\\r`` before it is part of the line and comes back too). A line longer than
``max_line`` bytes (default :data:`MAX_LINE`, 64 KiB) gets ``ERR line longer than N bytes`` and
the connection closes. When the peer finishes sending, bytes after its last ``\\n`` are echoed
too, then the connection closes.

Datagram variant (:class:`DatagramEcho`): each datagram is sent back as one datagram. One larger
than :data:`MAX_DATAGRAM` gets ``ERR datagram longer than N bytes`` instead; the session stays.

``SERVICE.build(datagram=True)`` returns the datagram machine; otherwise a factory of
:class:`Echo` with the chosen ``max_line``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attrs

from statemux import Datagram, Frame, FrameTooLong, Line, Machine, PeerClosed, State
from statemux.service import Option, Service

__all__ = ["Echo", "DatagramEcho", "MAX_LINE", "MAX_DATAGRAM", "SERVICE", "build"]

#: Default longest line (without its ``\n``) the stream echo accepts.
MAX_LINE = 64 * 1024
#: Longest datagram the datagram echo accepts: the largest UDP payload over IPv4.
MAX_DATAGRAM = 65507


def _check_limit(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be positive, not {value!r}")


def _positive(inst: object, attr: attrs.Attribute, value: int) -> None:
    _check_limit(attr.name, value)


@attrs.define
class Echo(Machine):
    """Line echo over a stream. Construct it with ``max_line`` to change the line limit.

    Subclasses may override :meth:`echo` (say, to transform each line).
    """

    max_line: int = attrs.field(default=MAX_LINE, validator=_positive)

    echoing = State(Line(max_length="max_line"), initial=True, doc="waiting for a line")
    done = State(final=True, doc="flushing the last reply, then closing")

    @echoing.on(Frame, to=echoing)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")

    @echoing.on(FrameTooLong, to=done)
    def line_too_long(self, exc: FrameTooLong) -> None:
        self.send(b"ERR %s\n" % str(exc).encode())

    @echoing.on(PeerClosed, to=done)
    def finish(self, event: PeerClosed) -> None:
        # Bytes after the last newline are echoed too, so `printf abc | nc` gets "abc" back.
        if event.unterminated:
            self.send(event.unterminated)


@attrs.define
class DatagramEcho(Machine):
    """Datagram echo: each datagram goes back to its sender as one datagram.

    An empty datagram gets no reply (there is nothing to send).
    """

    echoing = State(Datagram(MAX_DATAGRAM), initial=True, doc="waiting for a datagram")

    @echoing.on(Frame, to=echoing)
    def echo(self, datagram: bytes) -> None:
        self.send(datagram)

    @echoing.on(FrameTooLong, to=echoing)
    def datagram_too_long(self, exc: FrameTooLong) -> None:
        self.send(b"ERR %s\n" % str(exc).encode())


def build(
    datagram: bool = False, *, max_line: int | None = None, **options: Any
) -> Callable[[], Machine]:
    """Return the factory a server takes: :class:`DatagramEcho` for datagram sockets, else
    :class:`Echo` with ``max_line`` (default :data:`MAX_LINE`). Called by ``statemux serve``."""
    if datagram:
        return DatagramEcho
    limit = MAX_LINE if max_line is None else max_line
    _check_limit("max_line", limit)
    return functools.partial(Echo, max_line=limit)


SERVICE = Service(
    name="echo",
    summary="send every line (or datagram) back unchanged",
    build=build,
    options=(Option("--max-line", "longest line in bytes", int, MAX_LINE),),
    stream=True,
    datagram=True,
    default_port=7007,
    connect_hint="nc {host} {port}",
    connect_hint_datagram="nc -u {host} {port}",
)
