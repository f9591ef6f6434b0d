"""RESP: a Redis-protocol (RESP2) key-value store that ``redis-cli``, ``redis-benchmark`` and
the ``redis`` Python client talk to.

Each frame is one whole command (inline or multibulk), cut by
:class:`~statemachines.resp_protocol.RespCommand`, so a pipelined command costs one handler
call. :meth:`Resp.execute` looks the command up in :data:`COMMANDS` (a dict keyed by the name as
sent, then lowercased), checks its arity and calls it; commands return their reply as bytes,
preformatted constants where possible. Errors use Redis's wording. A protocol error (or a
limit passed while parsing) gets its ``-ERR Protocol error: ...`` reply and the connection
closes after it, as in Redis.

Strings and lists are stored (lists only so that ``WRONGTYPE`` is real); keys may have a TTL,
expired lazily on access and actively by a bounded timer pass (see
:mod:`statemachines.resp_store`). One :class:`~statemachines.resp_store.Keyspace` is shared by
the connections of a server, so the machine sets ``shares_memory`` and forking servers refuse
it. Limits are :class:`~statemachines.resp_protocol.RespLimits`.

``SERVICE`` serves it as ``statemux serve resp`` (port 6380 by default, beside a real Redis).
"""

from __future__ import annotations

import functools
import re
import threading
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

import attrs

import statemux
from statemux import CloseReason, Frame, FrameTooLong, Machine, ProtocolError, State, TimerFired
from statemux.service import Option, Service

from .resp_protocol import (
    EMPTY_ARRAY,
    INT_MAX,
    INT_MIN,
    MAX_ARGS,
    MAX_BULK,
    MAX_COMMAND,
    MAX_INLINE,
    MAX_KEYS,
    MAX_MEMORY,
    NIL,
    NIL_ARRAY,
    OK,
    PONG,
    Glob,
    RespCommand,
    RespLimits,
    array,
    bulk,
    error,
    integer,
    to_int,
)
from .resp_store import ELEMENT_OVERHEAD, KEY_OVERHEAD, Keyspace

__all__ = ["Resp", "COMMANDS", "register", "build", "size", "SERVICE", "REDIS_VERSION"]

#: The Redis version whose commands and replies this server follows (HELLO, INFO).
REDIS_VERSION = b"7.0.0"
#: Name of the machine timer that runs active expiry.
EXPIRE_TIMER = "expire"

WRONGTYPE = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
NOT_INTEGER = b"-ERR value is not an integer or out of range\r\n"
SYNTAX = b"-ERR syntax error\r\n"
OVERFLOW = b"-ERR increment or decrement would overflow\r\n"
OOM = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
#: The same refusal for the key-count ceiling, naming its limit.
OOM_KEYS = "OOM command not allowed when the number of keys reached 'max-keys' ({})."
NOPROTO = b"-NOPROTO unsupported protocol version\r\n"
OUT_OF_RANGE_DB = b"-ERR DB index is out of range\r\n"
BAD_CLIENT_NAME = b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"

#: Longest TTL, in milliseconds; beyond it Redis's absolute deadline would overflow, and it
#: answers "invalid expire time".
_MAX_TTL_MS = INT_MAX // 2


def _wrong_args(name: str) -> bytes:
    return b"-ERR wrong number of arguments for '%s' command\r\n" % name.encode()


def _invalid_expire(name: str) -> bytes:
    return b"-ERR invalid expire time in '%s' command\r\n" % name.encode()


def _unknown_command(args: list[bytes]) -> bytes:
    # Redis shows at most 128 bytes of the name and about 128 of the arguments.
    shown = bytearray()
    for arg in islice(args, 1, None):
        if len(shown) >= 128:
            break
        shown += b"'%b' " % arg[: 128 - len(shown)]
    return error(
        b"ERR unknown command '%b', with args beginning with: %b" % (args[0][:128], bytes(shown))
    )


def _unknown_subcommand(container: str, sub: bytes) -> bytes:
    return error(b"ERR unknown subcommand '%b'. Try %b HELP." % (sub[:128], container.encode()))


#: Name as sent (lowercase and uppercase spellings) -> ``(func, arity, name, locked)``: the
#: function (``func(machine, args) -> reply``), its Redis arity (``n``: exactly ``n`` arguments
#: counting the name; ``-n``: at least ``n``), its lowercase name, and whether it runs with the
#: keyspace lock held.
COMMANDS: dict[bytes, tuple[Callable[[Any, list[bytes]], bytes], int, str, bool]] = {}


def register(
    name: str, arity: int, *, locked: bool = True
) -> Callable[[Callable[..., bytes]], Callable[..., bytes]]:
    """Decorator adding a command: ``func(machine, args) -> reply bytes``. Anyone may call it to
    add or replace a command; the table is module-wide, so every server sees the change.

    ``locked=False`` runs it without the keyspace lock: only for commands that do not touch the
    keyspace, or read it with single dict operations (atomic in CPython) and take the lock
    themselves for anything more (as ``GET`` does to remove an expired key).
    """

    def decorate(func: Callable[..., bytes]) -> Callable[..., bytes]:
        entry = (func, arity, name.lower(), locked)
        COMMANDS[name.lower().encode()] = entry
        COMMANDS[name.upper().encode()] = entry
        return func

    return decorate


@attrs.define
class Resp(Machine):
    """One client connection of the key-value store.

    Construct it with the server's :class:`~statemachines.resp_store.Keyspace` (``store``);
    its limits come from ``store.limits``. Commands live in :data:`COMMANDS`; add one with
    :func:`register`. Subclasses may override :meth:`on_closed` (calling this one).
    """

    shares_memory = True

    store: Keyspace
    #: the server's limits (``store.limits``), read by the command cutter
    limits: RespLimits = attrs.field(init=False, repr=False)
    #: CLIENT SETNAME / HELLO SETNAME
    client_name: bytes | None = attrs.field(default=None, init=False)
    # Parse state of a partly received multibulk command (see RespCommand).
    _argv: list[bytes] | None = attrs.field(default=None, init=False, repr=False)
    _need: int = attrs.field(default=0, init=False, repr=False)
    _bulk: int = attrs.field(default=-1, init=False, repr=False)
    _size: int = attrs.field(default=0, init=False, repr=False)
    # Commands parsed by the cutter's fast path, not yet handed out (last first), and their
    # size in bytes; None between batches, so an idle connection holds no list.
    _ready: list[list[bytes]] | None = attrs.field(default=None, init=False, repr=False)
    _batched: int = attrs.field(default=0, init=False, repr=False)

    commands = State(RespCommand(), initial=True, doc="waiting for a command")
    closing = State(final=True, doc="flushing the protocol-error reply, then closing")

    def __attrs_post_init__(self) -> None:
        self.limits = self.store.limits

    # -- transitions ------------------------------------------------------------------------------
    @commands.on(Frame, to=commands)
    def execute(self, args: list[bytes]) -> None:
        """Run one command and queue its reply (QUIT also asks to close after it)."""
        # The per-command hot path: replies go straight onto the output list ``send`` uses.
        entry = COMMANDS.get(args[0])
        if entry is None:
            entry = COMMANDS.get(args[0].lower())
            if entry is None:
                self._out.append(_unknown_command(args))
                return
        func, arity, name, locked = entry
        n = len(args)
        if n != arity and (arity > 0 or n < -arity):
            self._out.append(_wrong_args(name))
            return
        if not locked:
            self._out.append(func(self, args))
            return
        store = self.store
        lock = store.lock
        if lock is None:
            self._out.append(func(self, args))
        else:
            # acquire/try/finally costs half of ``with lock:`` on this hot path.
            lock.acquire()
            try:
                self._out.append(func(self, args))
            finally:
                lock.release()
        if store.heap and store.sweeper is None:
            # Keys have a TTL and no connection runs active expiry (it was never needed, or
            # the one that did has gone): this one takes the duty on.
            self._adopt_expiry()

    @commands.on(ProtocolError, to=closing)
    def protocol_error(self, exc: ProtocolError) -> None:
        """Malformed input: reply in Redis's words, then close."""
        if exc.reply is not None:
            self.send(exc.reply)
        else:
            self.send(error("ERR Protocol error: " + exc.message))

    @commands.on(FrameTooLong, to=closing)
    def too_long(self, exc: FrameTooLong) -> None:
        """A size limit was passed while parsing: Redis's words, then the limit."""
        words = {
            "inline request": "too big inline request",
            "mbulk count string": "too big mbulk count string",
            "bulk count string": "too big bulk count string",
            "bulk": "invalid bulk length",
            "command": "too big command",
        }.get(exc.what, "too big request")
        self.send(error(f"ERR Protocol error: {words} ({exc})"))

    @commands.on(TimerFired, to=commands)
    def expire_keys(self, event: TimerFired) -> None:
        """Active expiry: remove at most ``expire_batch`` due keys, then come back."""
        store = self.store
        lock = store.lock
        if lock is None:
            self._sweep()
        else:
            with lock:
                self._sweep()

    def on_closed(self, reason: CloseReason) -> None:
        """Give up the active-expiry duty if this connection had it; the next connection to
        run a command that takes the keyspace lock takes it over (meanwhile expired keys are
        still never served: they are removed when read)."""
        store = self.store
        if store.sweeper is self:
            lock = store.lock
            if lock is None:
                store.sweeper = None
            else:
                with lock:
                    store.sweeper = None

    # -- helpers (called with the lock held) ---------------------------------------------------------
    def _sweep(self) -> None:
        store = self.store
        if store.sweeper is not self:
            return
        now = self.now()
        limits = store.limits
        store.sweep(now, limits.expire_batch)
        nxt = store.next_deadline()
        if nxt is None:
            store.sweeper = None
        else:
            self.start_timer(EXPIRE_TIMER, min(max(nxt - now, 0.0), limits.expire_interval))

    def _adopt_expiry(self) -> None:
        store = self.store
        lock = store.lock
        if lock is None:
            self._arm_expiry()
        else:
            with lock:
                self._arm_expiry()

    def _arm_expiry(self) -> None:
        store = self.store
        nxt = store.next_deadline()
        if store.sweeper is None and nxt is not None:
            store.sweeper = self
            delay = min(max(nxt - self.now(), 0.0), store.limits.expire_interval)
            self.start_timer(EXPIRE_TIMER, delay)

    def _lookup(self, key: bytes) -> Any:
        """The live value of ``key`` or ``None`` (an expired key is removed on the way)."""
        store = self.store
        value = store.data.get(key)
        if value is not None and store.expires:
            deadline = store.expires.get(key)
            if deadline is not None and deadline <= self.now():
                store.remove(key)
                return None
        return value

    def _refuse(self, new_keys: int) -> bytes | None:
        """The -OOM reply if a write adding ``new_keys`` keys must be refused, else None.
        Expired keys are reclaimed (a bounded pass) before refusing."""
        store = self.store
        for attempt in (0, 1):
            over_memory = store.used > store.max_memory
            over_keys = new_keys and len(store.data) + new_keys > store.max_keys
            if not (over_memory or over_keys):
                return None
            if attempt == 0 and store.heap:
                store.sweep(self.now(), store.limits.expire_batch)
        if over_memory:
            return OOM
        return error(OOM_KEYS.format(store.max_keys))

    # -- connection and server commands -------------------------------------------------------------
    @register("ping", -1, locked=False)
    def cmd_ping(self, args: list[bytes]) -> bytes:
        if len(args) == 1:
            return PONG
        if len(args) == 2:
            return bulk(args[1])
        return _wrong_args("ping")

    @register("echo", 2, locked=False)
    def cmd_echo(self, args: list[bytes]) -> bytes:
        return bulk(args[1])

    @register("quit", -1, locked=False)
    def cmd_quit(self, args: list[bytes]) -> bytes:
        self.close()
        return OK

    @register("select", 2, locked=False)
    def cmd_select(self, args: list[bytes]) -> bytes:
        index = to_int(args[1])
        if index is None:
            return NOT_INTEGER
        return OK if index == 0 else OUT_OF_RANGE_DB

    @register("dbsize", 1)
    def cmd_dbsize(self, args: list[bytes]) -> bytes:
        return integer(len(self.store.data))

    @register("flushdb", -1)
    def cmd_flushdb(self, args: list[bytes]) -> bytes:
        if len(args) > 2 or (len(args) == 2 and args[1].upper() not in (b"ASYNC", b"SYNC")):
            return SYNTAX
        self.store.clear()
        return OK

    register("flushall", -1)(cmd_flushdb)

    @register("command", -1, locked=False)
    def cmd_command(self, args: list[bytes]) -> bytes:
        # Clients ask for command docs and tips; an empty answer makes them use their own.
        if len(args) == 1:
            return EMPTY_ARRAY
        sub = args[1].upper()
        if sub == b"COUNT":
            return integer(len({entry[2] for entry in COMMANDS.values()}))
        if sub == b"LIST":
            return array(sorted({entry[2].encode() for entry in COMMANDS.values()}))
        if sub in (b"DOCS", b"INFO"):
            # Unknown to us: DOCS answers nothing, INFO a nil per name asked.
            if sub == b"DOCS":
                return EMPTY_ARRAY
            return b"*%d\r\n" % (len(args) - 2) + NIL * (len(args) - 2)
        return _unknown_subcommand("COMMAND", args[1])

    def _config(self) -> dict[bytes, bytes]:
        limits = self.store.limits
        return {
            b"save": b"",
            b"appendonly": b"no",
            b"databases": b"1",
            b"maxmemory": b"%d" % limits.max_memory,
            b"maxmemory-policy": b"noeviction",
            b"proto-max-bulk-len": b"%d" % limits.max_bulk,
            b"client-query-buffer-limit": b"%d" % limits.max_command,
        }

    @register("config", -2, locked=False)
    def cmd_config(self, args: list[bytes]) -> bytes:
        sub = args[1].upper()
        if sub == b"GET":
            if len(args) < 3:
                return _wrong_args("config|get")
            params = self._config()
            found: dict[bytes, bytes] = {}
            for pattern in islice(args, 2, None):
                glob = Glob(pattern.lower())
                for name, value in params.items():
                    if glob.match(name):
                        found[name] = value
            return array([x for pair in found.items() for x in pair])
        if sub == b"SET":
            if len(args) < 4 or len(args) % 2:
                return _wrong_args("config|set")
            # Limits are chosen when the server starts.
            return error(
                b"ERR Unknown option or number of arguments for CONFIG SET - '%b'" % args[2]
            )
        if sub == b"RESETSTAT":
            return OK
        return _unknown_subcommand("CONFIG", args[1])

    @register("client", -2, locked=False)
    def cmd_client(self, args: list[bytes]) -> bytes:
        sub = args[1].upper()
        if sub == b"SETNAME":
            if len(args) != 3:
                return _wrong_args("client|setname")
            return self._set_name(args[2])
        if sub == b"GETNAME":
            if len(args) != 2:
                return _wrong_args("client|getname")
            return NIL if self.client_name is None else bulk(self.client_name)
        if sub == b"ID":
            return integer(self.connection_id)
        if sub == b"SETINFO":
            if len(args) != 4:
                return _wrong_args("client|setinfo")
            if args[2].upper() not in (b"LIB-NAME", b"LIB-VER"):
                return error(b"ERR Unrecognized option '%b'" % args[2])
            return OK
        return _unknown_subcommand("CLIENT", args[1])

    def _set_name(self, name: bytes) -> bytes:
        if any(c < 33 or c > 126 for c in name):
            return BAD_CLIENT_NAME
        self.client_name = name or None
        return OK

    @register("hello", -1, locked=False)
    def cmd_hello(self, args: list[bytes]) -> bytes:
        if len(args) > 1:
            version = to_int(args[1])
            if version is None:
                return b"-ERR Protocol version is not an integer or out of range\r\n"
            if version != 2:
                return NOPROTO
            i = 2
            name = None
            while i < len(args):
                opt = args[i].upper()
                if opt == b"AUTH" and i + 2 < len(args):
                    if args[i + 1] != b"default":
                        return b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
                    i += 3
                elif opt == b"SETNAME" and i + 1 < len(args):
                    name = args[i + 1]
                    i += 2
                else:
                    return error(b"ERR Syntax error in HELLO option '%b'" % args[i])
            if name is not None:
                reply = self._set_name(name)
                if reply is not OK:
                    return reply
        return b"".join(
            [
                b"*14\r\n",
                bulk(b"server"),
                bulk(b"redis"),
                bulk(b"version"),
                bulk(REDIS_VERSION),
                bulk(b"proto"),
                integer(2),
                bulk(b"id"),
                integer(self.connection_id),
                bulk(b"mode"),
                bulk(b"standalone"),
                bulk(b"role"),
                bulk(b"master"),
                bulk(b"modules"),
                EMPTY_ARRAY,
            ]
        )

    @register("auth", -2, locked=False)
    def cmd_auth(self, args: list[bytes]) -> bytes:
        if len(args) == 2:
            return error(
                "ERR AUTH <password> called without any password configured for the default "
                "user. Are you sure your configuration is correct?"
            )
        if len(args) == 3 and args[1] == b"default":
            return OK
        if len(args) == 3:
            return b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        return SYNTAX

    @register("info", -1)
    def cmd_info(self, args: list[bytes]) -> bytes:
        store = self.store
        text = (
            "# Server\r\n"
            f"redis_version:{REDIS_VERSION.decode()}\r\n"
            f"statemux_version:{statemux.__version__}\r\n"
            "redis_mode:standalone\r\n"
            "\r\n# Memory\r\n"
            f"used_memory:{store.used}\r\n"
            f"maxmemory:{store.max_memory}\r\n"
            "maxmemory_policy:noeviction\r\n"
            "\r\n# Keyspace\r\n"
        )
        if store.data:
            text += f"db0:keys={len(store.data)},expires={len(store.expires)},avg_ttl=0\r\n"
        return bulk(text.encode())

    # -- strings ------------------------------------------------------------------------------------
    @register("get", 2, locked=False)
    def cmd_get(self, args: list[bytes]) -> bytes:
        # Lock-free: one dict read each; the lock only to remove an expired key.
        store = self.store
        key = args[1]
        value = store.data.get(key)
        if value is None:
            return NIL
        if store.expires:
            deadline = store.expires.get(key)
            if deadline is not None and deadline <= self.now():
                lock = store.lock
                if lock is None:
                    value = store.lookup(key, self.now())
                else:
                    with lock:
                        value = store.lookup(key, self.now())
                if value is None:
                    return NIL
        if value.__class__ is not bytes:
            return WRONGTYPE
        return b"$%d\r\n%b\r\n" % (len(value), value)

    @register("set", -3)
    def cmd_set(self, args: list[bytes]) -> bytes:
        if len(args) != 3:
            return self._set_with_options(args)
        store = self.store
        key = args[1]
        value = args[2]
        data = store.data
        old = data.get(key)
        if old is None:
            if store.used > store.max_memory or len(data) >= store.max_keys:
                refused = self._refuse(1)
                if refused is not None:
                    return refused
            store.used += KEY_OVERHEAD + len(key) + len(value)
            data[key] = value
            return OK
        if store.used > store.max_memory:
            refused = self._refuse(0)
            if refused is not None:
                return refused
        if old.__class__ is not bytes:
            store.put(key, value)
            return OK
        # Keyspace.put, inlined for the common overwrite of a string.
        store.used += len(value) - len(old)
        if store.expires:
            store.expires.pop(key, None)
        data[key] = value
        return OK

    def _set_with_options(self, args: list[bytes]) -> bytes:
        nx = xx = keep_ttl = get = False
        ttl: float | None = None
        i, n = 3, len(args)
        while i < n:
            opt = args[i].upper()
            if opt == b"NX" and not xx:
                nx = True
            elif opt == b"XX" and not nx:
                xx = True
            elif opt == b"GET":
                get = True
            elif opt == b"KEEPTTL" and ttl is None:
                keep_ttl = True
            elif opt in (b"EX", b"PX") and ttl is None and not keep_ttl and i + 1 < n:
                amount = to_int(args[i + 1])
                if amount is None:
                    return NOT_INTEGER
                ms = amount * 1000 if opt == b"EX" else amount
                if amount <= 0 or ms > _MAX_TTL_MS:
                    return _invalid_expire("set")
                ttl = ms / 1000
                i += 1
            else:
                return SYNTAX
            i += 1
        key = args[1]
        old = self._lookup(key)
        if get and old is not None and old.__class__ is not bytes:
            return WRONGTYPE
        if (nx and old is not None) or (xx and old is None):
            return bulk(old) if get and old is not None else NIL
        refused = self._refuse(1 if old is None else 0)
        if refused is not None:
            return refused
        self.store.put(key, args[2], keep_ttl=keep_ttl)
        if ttl is not None:
            self.store.expire_at(key, self.now() + ttl)
        if get:
            return NIL if old is None else bulk(old)
        return OK

    @register("mget", -2)
    def cmd_mget(self, args: list[bytes]) -> bytes:
        parts = [b"*%d\r\n" % (len(args) - 1)]
        lookup = self._lookup
        for key in islice(args, 1, None):
            value = lookup(key)
            if value is None or value.__class__ is not bytes:
                parts.append(NIL)
            else:
                parts.append(b"$%d\r\n%b\r\n" % (len(value), value))
        return b"".join(parts)

    @register("mset", -3)
    def cmd_mset(self, args: list[bytes]) -> bytes:
        if len(args) % 2 == 0:
            return _wrong_args("mset")
        data = self.store.data
        new = len({k for k in islice(args, 1, None, 2) if k not in data})
        refused = self._refuse(new)
        if refused is not None:
            return refused
        put = self.store.put
        for i in range(1, len(args), 2):
            put(args[i], args[i + 1])
        return OK

    def _incr_by(self, key: bytes, delta: int) -> bytes:
        old = self._lookup(key)
        if old is None:
            current = 0
        elif old.__class__ is not bytes:
            return WRONGTYPE
        else:
            current = to_int(old)
            if current is None:
                return NOT_INTEGER
        refused = self._refuse(1 if old is None else 0)
        if refused is not None:
            return refused
        new = current + delta
        if not INT_MIN <= new <= INT_MAX:
            return OVERFLOW
        self.store.put(key, b"%d" % new, keep_ttl=True)
        return integer(new)

    @register("incr", 2)
    def cmd_incr(self, args: list[bytes]) -> bytes:
        return self._incr_by(args[1], 1)

    @register("decr", 2)
    def cmd_decr(self, args: list[bytes]) -> bytes:
        return self._incr_by(args[1], -1)

    @register("incrby", 3)
    def cmd_incrby(self, args: list[bytes]) -> bytes:
        delta = to_int(args[2])
        if delta is None:
            return NOT_INTEGER
        return self._incr_by(args[1], delta)

    @register("decrby", 3)
    def cmd_decrby(self, args: list[bytes]) -> bytes:
        delta = to_int(args[2])
        if delta is None:
            return NOT_INTEGER
        if delta == INT_MIN:
            return b"-ERR decrement would overflow\r\n"
        return self._incr_by(args[1], -delta)

    # -- keys ----------------------------------------------------------------------------------------
    @register("del", -2)
    def cmd_del(self, args: list[bytes]) -> bytes:
        removed = 0
        lookup = self._lookup
        remove = self.store.remove
        for key in islice(args, 1, None):
            if lookup(key) is not None:
                remove(key)
                removed += 1
        return integer(removed)

    @register("exists", -2)
    def cmd_exists(self, args: list[bytes]) -> bytes:
        lookup = self._lookup
        return integer(sum(1 for key in islice(args, 1, None) if lookup(key) is not None))

    @register("type", 2)
    def cmd_type(self, args: list[bytes]) -> bytes:
        value = self._lookup(args[1])
        if value is None:
            return b"+none\r\n"
        return b"+string\r\n" if value.__class__ is bytes else b"+list\r\n"

    @register("keys", 2)
    def cmd_keys(self, args: list[bytes]) -> bytes:
        glob = Glob(args[1])
        if glob.literal is not None:
            return EMPTY_ARRAY if self._lookup(glob.literal) is None else array([glob.literal])
        store = self.store
        expires = store.expires
        now = self.now() if expires else 0.0
        found = []
        expired = []
        match = glob.match
        for key in store.data:
            if match(key):
                if expires and expires.get(key, now + 1) <= now:
                    expired.append(key)
                else:
                    found.append(key)
        for key in expired:
            store.remove(key)
        return array(found)

    def _expire(self, args: list[bytes], scale: int, name: str) -> bytes:
        amount = to_int(args[2])
        if amount is None:
            return NOT_INTEGER
        ms = amount * scale
        if not -_MAX_TTL_MS <= ms <= _MAX_TTL_MS:
            return _invalid_expire(name)
        flags = {a.upper() for a in islice(args, 3, None)}
        unknown = flags - {b"NX", b"XX", b"GT", b"LT"}
        if unknown:
            return error(b"ERR Unsupported option %b" % min(unknown))
        if b"NX" in flags and len(flags) > 1:
            return b"-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"
        if b"GT" in flags and b"LT" in flags:
            return b"-ERR GT and LT options at the same time are not compatible\r\n"
        key = args[1]
        if self._lookup(key) is None:
            return integer(0)
        store = self.store
        now = self.now()
        deadline = now + ms / 1000
        current = store.expires.get(key)  # None: no TTL, i.e. infinite
        if (
            (b"NX" in flags and current is not None)
            or (b"XX" in flags and current is None)
            or (b"GT" in flags and (current is None or deadline <= current))
            or (b"LT" in flags and current is not None and deadline >= current)
        ):
            return integer(0)
        if ms <= 0:
            store.remove(key)
        else:
            store.expire_at(key, deadline)
        return integer(1)

    @register("expire", -3)
    def cmd_expire(self, args: list[bytes]) -> bytes:
        return self._expire(args, 1000, "expire")

    @register("pexpire", -3)
    def cmd_pexpire(self, args: list[bytes]) -> bytes:
        return self._expire(args, 1, "pexpire")

    def _pttl(self, key: bytes) -> int:
        if self._lookup(key) is None:
            return -2
        deadline = self.store.expires.get(key)
        if deadline is None:
            return -1
        return max(0, round((deadline - self.now()) * 1000))

    @register("ttl", 2)
    def cmd_ttl(self, args: list[bytes]) -> bytes:
        ms = self._pttl(args[1])
        return integer(ms if ms < 0 else (ms + 500) // 1000)

    @register("pttl", 2)
    def cmd_pttl(self, args: list[bytes]) -> bytes:
        return integer(self._pttl(args[1]))

    @register("persist", 2)
    def cmd_persist(self, args: list[bytes]) -> bytes:
        if self._lookup(args[1]) is None:
            return integer(0)
        return integer(1 if self.store.persist(args[1]) else 0)

    # -- lists (so that WRONGTYPE is reachable) ---------------------------------------------------------
    def _push(self, args: list[bytes], left: bool) -> bytes:
        key = args[1]
        store = self.store
        items = self._lookup(key)
        if items is not None and items.__class__ is bytes:
            return WRONGTYPE
        refused = self._refuse(1 if items is None else 0)
        if refused is not None:
            return refused
        if items is None:
            items = deque()
            store.put(key, items)
        values = islice(args, 2, None)
        if left:
            items.extendleft(values)
        else:
            items.extend(values)
        store.used += sum(len(v) + ELEMENT_OVERHEAD for v in islice(args, 2, None))
        return integer(len(items))

    @register("lpush", -3)
    def cmd_lpush(self, args: list[bytes]) -> bytes:
        return self._push(args, True)

    @register("rpush", -3)
    def cmd_rpush(self, args: list[bytes]) -> bytes:
        return self._push(args, False)

    def _pop(self, args: list[bytes], left: bool) -> bytes:
        if len(args) > 3:
            return SYNTAX
        count = None
        if len(args) == 3:
            count = to_int(args[2])
            if count is None or count < 0:
                return b"-ERR value is out of range, must be positive\r\n"
        items = self._lookup(args[1])
        if items is None:
            return NIL if count is None else NIL_ARRAY
        if items.__class__ is bytes:
            return WRONGTYPE
        store = self.store
        take = items.popleft if left else items.pop
        popped = [take() for _ in range(min(1 if count is None else count, len(items)))]
        store.used -= sum(len(v) + ELEMENT_OVERHEAD for v in popped)
        if not items:
            store.remove(args[1])
        if count is None:
            return bulk(popped[0])
        return array(popped)

    @register("lpop", -2)
    def cmd_lpop(self, args: list[bytes]) -> bytes:
        return self._pop(args, True)

    @register("rpop", -2)
    def cmd_rpop(self, args: list[bytes]) -> bytes:
        return self._pop(args, False)

    @register("llen", 2)
    def cmd_llen(self, args: list[bytes]) -> bytes:
        items = self._lookup(args[1])
        if items is None:
            return integer(0)
        if items.__class__ is bytes:
            return WRONGTYPE
        return integer(len(items))

    @register("lrange", 4)
    def cmd_lrange(self, args: list[bytes]) -> bytes:
        start, stop = to_int(args[2]), to_int(args[3])
        if start is None or stop is None:
            return NOT_INTEGER
        items = self._lookup(args[1])
        if items is None:
            return EMPTY_ARRAY
        if items.__class__ is bytes:
            return WRONGTYPE
        n = len(items)
        if start < 0:
            start = max(n + start, 0)
        if stop < 0:
            stop += n
        stop = min(stop, n - 1)
        if start > stop:
            return EMPTY_ARRAY
        return array(list(islice(items, start, stop + 1)))


def build(
    datagram: bool = False,
    *,
    max_inline: int | None = None,
    max_bulk: int | None = None,
    max_args: int | None = None,
    max_command: int | None = None,
    max_memory: int | None = None,
    max_keys: int | None = None,
    **options: Any,
) -> Callable[[], Resp]:
    """Create the server's keyspace (with a lock, so every model may run it) and return the
    machine factory. Called by ``statemux serve resp``; ``None`` means the default."""
    if datagram:
        raise ValueError("resp needs a stream transport (TCP or a Unix stream socket)")
    chosen = {
        "max_inline": max_inline,
        "max_bulk": max_bulk,
        "max_args": max_args,
        "max_command": max_command,
        "max_memory": max_memory,
        "max_keys": max_keys,
    }
    limits = RespLimits(**{k: v for k, v in chosen.items() if v is not None})
    store = Keyspace(limits, lock=threading.Lock())
    return functools.partial(Resp, store)


_SIZE = re.compile(r"(\d+)\s*([kmg])?(?:i?b)?", re.IGNORECASE)


def size(text: str) -> int:
    """A byte count from the command line: ``4096``, ``64K``, ``256M``, ``1GiB`` (binary)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a size in bytes (4096, 64K, 256M, 1G): {text!r}")
    return int(m.group(1)) * 1024 ** " kmg".index((m.group(2) or " ").lower())


SERVICE = Service(
    name="resp",
    summary="a Redis-protocol (RESP2) key-value store for redis-cli and Redis clients",
    build=build,
    options=(
        Option("--max-inline", "longest inline command or header line (K/M/G)", size, MAX_INLINE),
        Option("--max-bulk", "largest argument (K/M/G)", size, MAX_BULK),
        Option("--max-args", "most arguments in one command", int, MAX_ARGS),
        Option("--max-command", "most argument bytes in one command (K/M/G)", size, MAX_COMMAND),
        Option(
            "--max-memory", "estimated data size before writes get -OOM (K/M/G)", size, MAX_MEMORY
        ),
        Option("--max-keys", "most keys before writes get -OOM", int, MAX_KEYS),
    ),
    stream=True,
    datagram=False,
    default_port=6380,
    connect_hint="redis-cli -h {host} -p {port}",
    connect_hint_unix="redis-cli -s {path}",
)
