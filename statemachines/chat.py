"""Chat: a line chat for ``nc`` and ``telnet`` clients, with nicknames and rooms.

A client picks a nickname, joins a room with ``/join ROOM`` and every line it sends goes to
everyone else in that room as ``<nick> line``. Commands: ``/join ROOM``, ``/leave``, ``/who``,
``/quit``, ``/help``; ``//text`` sends a line starting with ``/``. Lines end with ``\\n`` or
``\\r\\n``; the server ends its lines with ``\\r\\n``. Notices start with ``* ``, errors with ``ERR ``.

Server-wide state (which nicknames are taken, who is in which room) lives in one
:class:`ChatRegistry` per server, created by :func:`build` and handed to every machine with
``functools.partial(Chat, registry)``. Messages travel over the server's hub, one topic per room,
so every member receives a room's messages in the order they were published. A member whose
output passes the server's ``output_limit`` (it stopped reading) is disconnected as a slow
consumer; the room is told, and everyone else goes on receiving every message.

Limits (:class:`ChatLimits`): nickname length, room name length, line length, rooms per
server, members per room. Each refusal is an ``ERR`` line naming the limit and its value; the
client may try again.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable
from typing import Any

import attrs

from statemux import CloseReason, Frame, FrameTooLong, Machine, Message, Opened, State
from statemux.framing import Framing, ReceiveBuffer
from statemux.service import Option, Service

__all__ = ["Chat", "ChatLimits", "ChatRegistry", "Room", "SERVICE", "build"]

#: Default limits (see :class:`ChatLimits`).
MAX_NICK = 16
MAX_ROOM_NAME = 32
MAX_LINE = 4096
MAX_ROOMS = 100
MAX_MEMBERS = 100

_NAME = re.compile(rb"[A-Za-z0-9_-]+")
_CHARSET = "letters, digits, '_' and '-'"
# Control bytes (terminal escapes, NUL, stray CR) in a message become '?', so one member cannot
# drive other members' terminals. Tab and bytes >= 0x80 (UTF-8) pass unchanged.
_SANITIZE = bytes(ord("?") if (b < 0x20 and b != 0x09) or b == 0x7F else b for b in range(256))

_HELP = (
    b"* commands:\r\n"
    b"*   /join ROOM  enter ROOM (leaving the room you are in)\r\n"
    b"*   /leave      leave the room you are in\r\n"
    b"*   /who        list the members of the room you are in\r\n"
    b"*   /quit       say goodbye and disconnect\r\n"
    b"*   /help       this list\r\n"
    b"*   //text      send a line that starts with '/'\r\n"
)


def _positive(inst: object, attr: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attr.name} must be positive, not {value!r}")


@attrs.frozen(kw_only=True)
class ChatLimits:
    """The chat's named limits, each with its default."""

    #: longest nickname, in characters
    max_nick: int = attrs.field(default=MAX_NICK, validator=_positive)
    #: longest room name, in characters
    max_room_name: int = attrs.field(default=MAX_ROOM_NAME, validator=_positive)
    #: longest line a client may send, in bytes, without its line end
    max_line: int = attrs.field(default=MAX_LINE, validator=_positive)
    #: rooms that may exist at once on one server (a room exists while it has members)
    max_rooms: int = attrs.field(default=MAX_ROOMS, validator=_positive)
    #: members one room may hold
    max_members: int = attrs.field(default=MAX_MEMBERS, validator=_positive)


@attrs.define(eq=False)
class Room:
    """One room: its display name, its hub topic and its members (in joining order)."""

    name: str
    topic: str
    members: dict[str, None] = attrs.field(factory=dict)


class ChatRegistry:
    """Who is called what and who is in which room, shared by every connection of a server.

    Machines call its methods from handlers and ``on_closed``. Each method that reads and then
    changes the tables holds ``lock`` while it does; pass a lock when machines run on several
    threads. :func:`build` always passes one: the registry is touched only when a client picks a
    nickname, joins, leaves, asks who is there or goes, never per message, so an uncontended
    lock costs nothing measurable and the same factory is safe under every model.
    """

    __slots__ = ("limits", "nicks", "rooms", "_lock")

    def __init__(self, limits: ChatLimits | None = None, lock: Any = None) -> None:
        self.limits = limits or ChatLimits()
        #: nickname folded to lower case -> nickname as chosen
        self.nicks: dict[str, str] = {}
        #: room name folded to lower case -> room
        self.rooms: dict[str, Room] = {}
        self._lock: Any = lock if lock is not None else contextlib.nullcontext()

    def claim_nick(self, nick: str) -> bytes | None:
        """Register ``nick`` (already validated); return an error line if it is taken."""
        key = nick.lower()
        with self._lock:
            if key in self.nicks:
                return b"ERR nickname '%s' is taken\r\n" % nick.encode()
            self.nicks[key] = nick
        return None

    def release_nick(self, nick: str) -> None:
        with self._lock:
            self.nicks.pop(nick.lower(), None)

    def join(self, name: str, nick: str, leaving: Room | None = None) -> Room | bytes:
        """Add ``nick`` to room ``name`` (created if need be), leaving ``leaving`` if given.

        Returns the room, or an error line (room full, too many rooms); on error nothing
        changed, so the member stays where it was.
        """
        key = name.lower()
        limits = self.limits
        with self._lock:
            room = self.rooms.get(key)
            if room is None:
                # The room being left does not count if this member is its last.
                emptied = leaving is not None and len(leaving.members) == 1
                if len(self.rooms) - emptied >= limits.max_rooms:
                    return b"ERR too many rooms: at most %d rooms on this server\r\n" % (
                        limits.max_rooms
                    )
                room = self.rooms[key] = Room(name, "chat:" + key)
            elif len(room.members) >= limits.max_members:
                return b"ERR room '%s' is full: at most %d members per room\r\n" % (
                    room.name.encode(),
                    limits.max_members,
                )
            if leaving is not None:
                self._leave(leaving, nick)
            room.members[nick] = None
        return room

    def leave(self, room: Room, nick: str) -> None:
        """Remove ``nick`` from ``room``; an empty room is forgotten."""
        with self._lock:
            self._leave(room, nick)

    def _leave(self, room: Room, nick: str) -> None:
        room.members.pop(nick, None)
        if not room.members and self.rooms.get(room.name.lower()) is room:
            del self.rooms[room.name.lower()]

    def members(self, room: Room) -> list[str]:
        """The members of ``room``, in joining order."""
        with self._lock:
            return list(room.members)


class ChatLine(Framing):
    """One line ending in ``\\n`` (a ``\\r`` before it is dropped), bounded by the machine's
    ``max_line``.

    Only a *partial* line longer than the limit raises :class:`FrameTooLong` (the runner then
    discards what was buffered, which is part of that one line). A *complete* over-long line is
    returned as it is and the handler refuses it: raising there would make the runner drop the
    lines buffered after it too.
    """

    __slots__ = ("default",)

    def __init__(self, default: int = MAX_LINE) -> None:
        self.default = default

    @property
    def max_size(self) -> int:  # type: ignore[override]
        return self.default

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> bytes | None:
        data = buffer.data
        i = data.find(b"\n", buffer.scan)
        if i < 0:
            n = len(data)
            # + 1: a CR may be waiting for its LF
            if n > machine.max_line + 1:
                raise FrameTooLong("line", machine.max_line, n)
            buffer.scan = n
            return None
        end = i - 1 if i and data[i - 1] == 13 else i
        frame = bytes(data[:end])
        del data[: i + 1]
        buffer.scan = 0
        return frame

    def describe(self) -> str:
        return f"line ≤ max_line B (default {self.default})"


class DiscardLine(Framing):
    """Discard bytes up to and including the next ``\\n``; then one empty frame."""

    __slots__ = ()

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> bytes | None:
        data = buffer.data
        i = data.find(b"\n")
        if i < 0:
            data.clear()
            buffer.scan = 0
            return None
        buffer.skip(i + 1)
        return b""

    def describe(self) -> str:
        return "the rest of an over-long line"


_LINE = ChatLine()


@attrs.define(eq=False)
class Chat(Machine):
    """One chat member. Construct it with the server's registry:
    ``functools.partial(Chat, registry)`` (what :func:`build` returns).

    Subclasses may override :meth:`on_closed` (and must call this one).
    """

    shares_memory = True
    waits_for_peers = True
    refusal = b"ERR server full: too many connections\r\n"

    registry: ChatRegistry
    nick: str | None = attrs.field(default=None, init=False)
    room: Room | None = attrs.field(default=None, init=False)
    #: state to return to once the rest of an over-long line has been discarded
    resume: str = attrs.field(default="naming", init=False)
    max_line: int = attrs.field(init=False)
    #: ``b"<nick> "``, built once: every broadcast line starts with it
    prefix: bytes = attrs.field(default=b"", init=False)

    def __attrs_post_init__(self) -> None:
        self.max_line = self.registry.limits.max_line

    naming = State(_LINE, initial=True, doc="waiting for a nickname")
    outside = State(_LINE, doc="named, in no room: waiting for a command")
    chatting = State(_LINE, doc="in a room: waiting for a line to broadcast or a command")
    discarding = State(DiscardLine(), doc="discarding the rest of an over-long line")
    done = State(final=True, doc="said goodbye: flushing, then closing")

    # -- naming ----------------------------------------------------------------------------------
    @naming.on(Opened, to=naming)
    def welcome(self, event: Opened) -> None:
        self.send(
            b"* welcome to statemux chat; choose a nickname (1-%d letters, digits, '_' or '-')\r\n"
            % self.registry.limits.max_nick
        )

    @naming.on(Frame, to=(naming, outside, done))
    def choose_nick(self, line: bytes) -> State:
        if len(line) > self.max_line:
            return self._too_long(self.naming)
        name = line.strip()
        if name == b"/quit":
            return self._quit()
        if name == b"/help":
            self.send(_HELP)
            return self.naming
        error = self._check_name(name, "nickname", self.registry.limits.max_nick)
        if error is None:
            nick = name.decode("ascii")
            error = self.registry.claim_nick(nick)
            if error is None:
                self.nick = nick
                self.prefix = b"<%s> " % name
                self.send(b"* hello %s; /join ROOM to enter a room, /help for commands\r\n" % name)
                return self.outside
        self.send(error)
        return self.naming

    # -- outside a room ----------------------------------------------------------------------------
    @outside.on(Frame, to=(outside, chatting, done))
    def command_outside(self, line: bytes) -> State:
        if len(line) > self.max_line:
            return self._too_long(self.outside)
        if line[:1] == b"/" and line[:2] != b"//":
            return self._command(line, self.outside)
        if line.strip():
            self.send(b"ERR not in a room; /join ROOM first\r\n")
        return self.outside

    # -- in a room ---------------------------------------------------------------------------------
    @chatting.on(Frame, to=(chatting, outside, done))
    def say(self, line: bytes) -> State:
        if len(line) > self.max_line:
            return self._too_long(self.chatting)
        if line[:1] == b"/":
            if line[:2] != b"//":
                return self._command(line, self.chatting)
            line = line[1:]
        if line and not line.isspace():
            assert self.room is not None
            self.publish(self.room.topic, b"%s%s\r\n" % (self.prefix, line.translate(_SANITIZE)))
        return self.chatting

    @chatting.on(Message, to=chatting)
    def hear(self, message: Message) -> None:
        # A message of a room just left may still be queued: it is not for this room.
        room = self.room
        if room is not None and message.topic == room.topic:
            self.send(message.payload)  # type: ignore[arg-type]

    # -- over-long lines ---------------------------------------------------------------------------
    @naming.on(FrameTooLong, to=discarding)
    @outside.on(FrameTooLong, to=discarding)
    @chatting.on(FrameTooLong, to=discarding)
    def line_too_long(self, exc: FrameTooLong) -> None:
        self.resume = self.state
        self.send(b"ERR line longer than %d bytes\r\n" % self.max_line)

    @discarding.on(Frame, to=(naming, outside, chatting))
    def line_discarded(self, frame: bytes) -> str:
        return self.resume

    @discarding.on(Message, to=discarding)
    def hear_while_discarding(self, message: Message) -> None:
        room = self.room
        if room is not None and message.topic == room.topic:
            self.send(message.payload)  # type: ignore[arg-type]

    # -- the end -------------------------------------------------------------------------------------
    def on_closed(self, reason: CloseReason) -> None:
        """Free the nickname, leave the room and tell its members why. Subclasses overriding it
        must call it."""
        room, nick = self.room, self.nick
        if nick is None:
            return
        if room is not None:
            self.room = None
            self.registry.leave(room, nick)
            why = "quit" if reason is CloseReason.NORMAL else reason.value
            self.publish(
                room.topic,
                b"* %s left %s (%s)\r\n" % (nick.encode(), room.name.encode(), why.encode()),
            )
        self.nick = None
        self.registry.release_nick(nick)

    # -- helpers -------------------------------------------------------------------------------------
    def _too_long(self, stay: State) -> State:
        self.send(b"ERR line longer than %d bytes\r\n" % self.max_line)
        return stay

    def _quit(self) -> State:
        if self.nick is None:
            self.send(b"* bye\r\n")
        else:
            self.send(b"* bye %s\r\n" % self.nick.encode())
        return self.done

    @staticmethod
    def _check_name(name: bytes, what: str, limit: int) -> bytes | None:
        """An error line if ``name`` is not an acceptable nickname or room name."""
        if not name:
            return b"ERR %s must not be empty\r\n" % what.encode()
        if len(name) > limit:
            return b"ERR %s longer than %d characters\r\n" % (what.encode(), limit)
        if _NAME.fullmatch(name) is None:
            return b"ERR %s may contain only %s\r\n" % (what.encode(), _CHARSET.encode())
        return None

    def _command(self, line: bytes, here: State) -> State:
        """Run a ``/command`` in state ``here`` (outside or chatting); return the next state."""
        parts = line.split(None, 1)
        word = parts[0]
        arg = parts[1].strip() if len(parts) > 1 else b""
        if word == b"/join":
            if not arg:
                self.send(b"ERR usage: /join ROOM\r\n")
                return here
            return self._join(arg, here)
        if word in (b"/leave", b"/who", b"/quit", b"/help") and arg:
            self.send(b"ERR usage: %s\r\n" % word)
            return here
        if word == b"/quit":
            return self._quit()
        if word == b"/help":
            self.send(_HELP)
            return here
        if word in (b"/leave", b"/who"):
            room = self.room
            if room is None:
                self.send(b"ERR not in a room; /join ROOM first\r\n")
                return here
            if word == b"/who":
                names = ", ".join(self.registry.members(room)).encode()
                self.send(b"* members of %s: %s\r\n" % (room.name.encode(), names))
                return here
            self._leave_room(room)
            self.send(b"* you left %s\r\n" % room.name.encode())
            return self.outside
        self.send(b"ERR unknown command '%s'; /help lists commands\r\n" % word.translate(_SANITIZE))
        return here

    def _join(self, name: bytes, here: State) -> State:
        error = self._check_name(name, "room name", self.registry.limits.max_room_name)
        if error is not None:
            self.send(error)
            return here
        old = self.room
        if old is not None and old.name.lower() == name.lower().decode("ascii"):
            self.send(b"ERR already in %s\r\n" % old.name.encode())
            return here
        assert self.nick is not None
        joined = self.registry.join(name.decode("ascii"), self.nick, old)
        if isinstance(joined, bytes):
            self.send(joined)
            return here
        nick = self.nick.encode()
        if old is not None:
            # registry.join already took us out of the old room
            self.unsubscribe(old.topic)
            self.publish(old.topic, b"* %s left %s\r\n" % (nick, old.name.encode()))
        self.room = joined
        self.subscribe(joined.topic)
        room = joined.name.encode()
        self.publish(joined.topic, b"* %s joined %s\r\n" % (nick, room))
        names = ", ".join(self.registry.members(joined)).encode()
        self.send(b"* you joined %s; members: %s\r\n" % (room, names))
        return self.chatting

    def _leave_room(self, room: Room) -> None:
        assert self.nick is not None
        self.room = None
        self.registry.leave(room, self.nick)
        self.unsubscribe(room.topic)
        self.publish(room.topic, b"* %s left %s\r\n" % (self.nick.encode(), room.name.encode()))


def build(
    datagram: bool = False,
    *,
    max_nick: int | None = None,
    max_room_name: int | None = None,
    max_line: int | None = None,
    max_rooms: int | None = None,
    max_members: int | None = None,
    **options: Any,
) -> Callable[[], Machine]:
    """Create the server's registry (with a lock: see :class:`ChatRegistry`) and return the
    machine factory. Called by ``statemux serve chat``; ``None`` means the default."""
    if datagram:
        raise ValueError("chat needs a stream transport (TCP or a Unix stream socket)")
    given = {
        "max_nick": max_nick,
        "max_room_name": max_room_name,
        "max_line": max_line,
        "max_rooms": max_rooms,
        "max_members": max_members,
    }
    limits = ChatLimits(**{k: v for k, v in given.items() if v is not None})
    registry = ChatRegistry(limits, lock=threading.Lock())
    return functools.partial(Chat, registry)


SERVICE = Service(
    name="chat",
    summary="line chat with nicknames and rooms, for nc and telnet",
    build=build,
    options=(
        Option("--max-nick", "longest nickname, in characters", int, MAX_NICK),
        Option("--max-room-name", "longest room name, in characters", int, MAX_ROOM_NAME),
        Option("--max-line", "longest line a client may send, in bytes", int, MAX_LINE),
        Option("--max-rooms", "rooms on the server at once", int, MAX_ROOMS),
        Option("--max-members", "members per room", int, MAX_MEMBERS),
    ),
    stream=True,
    datagram=False,
    default_port=7070,
    connect_hint="nc {host} {port}",
)
