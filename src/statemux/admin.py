"""The admin socket: a running server's connection table, on request.

``statemux serve --admin PATH`` opens a Unix stream socket (mode 0600, never TCP) served by
:class:`Admin` on the same loop as the services, so every answer is a consistent snapshot
taken between two loop passes. The protocol is a line per command; every reply is zero or
more JSON objects, one per line, followed by an empty line:

``table``
    one object per open connection of every served server: ``service``, ``listen``, ``id``,
    ``peer``, ``machine``, ``state``, ``age`` (seconds), ``bytes_in``, ``bytes_out``,
    ``buffered_in``, ``buffered_out``, ``closing`` (the close reason while it flushes, or null)
``stats``
    one object per server: ``service``, ``listen``, ``connections``, ``close_reasons``
    (reason -> count) and ``transitions`` (``[machine, from, event, to, count]`` lists)
``help``
    one object listing the commands

A large reply is sent a piece at a time, each piece when the previous one has drained, so
the table of a server with many connections never sits whole in an output buffer. Commands
sent while a reply is under way wait their turn (at most :data:`MAX_PENDING`); when the peer
finishes sending, what it is still owed is sent at once and the connection closes. ``statemux
table PATH`` is the client.
"""

from __future__ import annotations

import json
import socket
from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs

from .events import Drained, Frame, FrameTooLong, PeerClosed
from .framing import Line
from .machine import Machine, State

__all__ = [
    "Admin",
    "AdminView",
    "COMMANDS",
    "MAX_COMMAND",
    "MAX_PENDING",
    "ROWS_PER_PIECE",
    "listen_url",
    "peer_text",
    "unix_text",
]

#: Longest command line, in bytes.
MAX_COMMAND = 256
#: Commands that may wait while a reply is being sent; one more closes the connection.
MAX_PENDING = 16
#: Rows encoded per piece of a reply (about 25 KB: below the output high-water mark).
ROWS_PER_PIECE = 128
#: What the admin socket answers.
COMMANDS = ("table", "stats", "help")

_END = b"\n"  # the empty line that ends every reply


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unix_text(address: str | bytes) -> str:
    """A Unix socket address for people: its path, or ``@NAME`` in the abstract namespace."""
    if isinstance(address, bytes):
        address = address.decode(errors="replace")
    return "@" + address[1:] if address.startswith("\0") else address


def listen_url(server: Any) -> str:
    """Where ``server`` listens, as ``tcp://HOST:PORT``, ``udp://[::1]:PORT``,
    ``unix:PATH`` or ``unix-dgram:PATH``."""
    sock = server.socket
    address = server.server_address
    datagram = sock.type == socket.SOCK_DGRAM
    if sock.family == socket.AF_UNIX:
        return ("unix-dgram:" if datagram else "unix:") + unix_text(address)
    return ("udp://" if datagram else "tcp://") + _host_port(address[0], address[1])


def peer_text(peer: Any) -> str:
    """A peer address for people: ``HOST:PORT``, ``[V6]:PORT``, a Unix path, or ``-``
    for an unnamed Unix peer."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return _host_port(str(peer[0]), peer[1])
    if isinstance(peer, str | bytes) and peer:
        return unix_text(peer)
    return str(peer) if peer else "-"


class AdminView:
    """The servers an admin socket reports on, each under a label (the service name).

    The command adds servers with :meth:`add`; the :class:`Admin` machine calls
    :meth:`table` and :meth:`stats` from the loop thread that runs those servers.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []

    def add(self, label: str, server: Any) -> None:
        self.entries.append((label, server))

    def table(self) -> list[dict[str, Any]]:
        """One row per open connection of every server, in each server's table order."""
        rows: list[dict[str, Any]] = []
        for label, server in self.entries:
            listen = listen_url(server)
            for info in getattr(server, "connections", ()):
                rows.append(
                    {
                        "service": label,
                        "listen": listen,
                        "id": info.id,
                        "peer": peer_text(info.peer),
                        "machine": info.machine,
                        "state": info.state,
                        "age": round(info.age, 3),
                        "bytes_in": info.bytes_in,
                        "bytes_out": info.bytes_out,
                        "buffered_in": info.buffered_in,
                        "buffered_out": info.buffered_out,
                        "closing": info.closing,
                    }
                )
        return rows

    def stats(self) -> list[dict[str, Any]]:
        """One row per server: open connections, close reasons, transitions taken."""
        rows: list[dict[str, Any]] = []
        for label, server in self.entries:
            stats = server.stats
            transitions = sorted(stats.transitions().items())
            rows.append(
                {
                    "service": label,
                    "listen": listen_url(server),
                    "connections": len(getattr(server, "connections", ())),
                    "close_reasons": {
                        r.value: n
                        for r, n in sorted(stats.close_reasons.items(), key=lambda rn: rn[0].value)
                    },
                    "transitions": [[*edge, n] for edge, n in transitions],
                }
            )
        return rows


def _pieces(rows: list[dict[str, Any]]) -> Iterator[bytes]:
    """Encode rows a piece at a time; the last piece carries the terminating empty line."""
    dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode
    for start in range(0, len(rows), ROWS_PER_PIECE):
        chunk = rows[start : start + ROWS_PER_PIECE]
        piece = "".join(dumps(row) + "\n" for row in chunk).encode()
        if start + ROWS_PER_PIECE >= len(rows):
            piece += _END
        yield piece
    if not rows:
        yield _END


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n" + _END


@attrs.define(eq=False)
class Admin(Machine):
    """One admin connection. Construct it with the view it reports:
    ``functools.partial(Admin, view)``.

    Subclasses may extend :meth:`answer` with more commands (calling this one for the rest).
    """

    refusal = _error("admin socket busy: too many admin connections")

    view: AdminView
    #: pieces of the reply being sent
    reply: Iterator[bytes] | None = attrs.field(default=None, init=False)
    #: commands received while a reply was being sent
    pending: deque[bytes] = attrs.field(factory=deque, init=False)

    waiting = State(Line(MAX_COMMAND, strip_cr=True), initial=True, doc="waiting for a command")
    replying = State(
        Line(MAX_COMMAND, strip_cr=True),
        doc="sending a reply a piece at a time as output drains; commands wait their turn",
    )
    done = State(final=True, doc="flushing an error, then closing")

    @waiting.on(Frame, to=(waiting, replying))
    def command(self, line: bytes) -> State:
        self.reply = self.answer(line)
        return self._pump()

    @replying.on(Frame, to=(replying, done))
    def queue_command(self, line: bytes) -> State:
        if len(self.pending) >= MAX_PENDING:
            self.send(_error(f"more than {MAX_PENDING} commands waiting for a reply"))
            return self.done
        self.pending.append(line)
        return self.replying

    @replying.on(Drained, to=(replying, waiting))
    def next_piece(self, event: Drained) -> State:
        return self._pump()

    @replying.on(PeerClosed, to=done)
    def last_command_sent(self, event: PeerClosed) -> None:
        # The connection closes once the peer has finished sending, so everything it is owed
        # goes out now (``printf 'table\n' | nc -U PATH`` gets the whole table).
        while self._pump() is self.replying:
            pass

    @waiting.on(FrameTooLong, to=done)
    @replying.on(FrameTooLong, to=done)
    def command_too_long(self, exc: FrameTooLong) -> None:
        self.send(_error(f"command longer than {MAX_COMMAND} bytes"))

    def answer(self, line: bytes) -> Iterator[bytes]:
        """The pieces of the reply to one command line (a snapshot taken now)."""
        command = line.strip().decode("ascii", errors="replace")
        if not command:
            return iter(())
        if command == "table":
            return _pieces(self.view.table())
        if command == "stats":
            return _pieces(self.view.stats())
        if command == "help":
            return _pieces([{"commands": list(COMMANDS)}])
        return iter((_error(f"unknown command {command[:40]!r}; commands: {', '.join(COMMANDS)}"),))

    def _pump(self) -> State:
        """Send the next piece; start the next waiting command when a reply is complete."""
        while True:
            assert self.reply is not None
            piece = next(self.reply, None)
            if piece is not None:
                self.send(piece)
                return self.replying
            if not self.pending:
                self.reply = None
                return self.waiting
            self.reply = self.answer(self.pending.popleft())
