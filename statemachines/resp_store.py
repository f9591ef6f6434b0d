"""The keyspace shared by every connection of one ``resp`` server.

:class:`Keyspace` holds the keys (``data``), their deadlines (``expires``), a min-heap of
``(deadline, key)`` for active expiry, and an estimate of the memory they use. It is created
once per server (by ``build()``) and handed to every machine with ``functools.partial``; the
machines therefore declare ``shares_memory = True`` and forking servers refuse them.

Thread safety: the keyspace carries an optional ``lock``. The machine holds it around each whole
command, each active-expiry pass and its ``on_closed`` hook, so every command is atomic, as in
Redis; the keyspace's own methods never take it (their callers hold it). ``build()`` always
passes a :class:`threading.Lock`, so one factory is safe under every concurrency model; an
uncontended acquire and release costs well under a tenth of a microsecond.

Expiry never scans every key:

* lazily: a command that reads a key first checks its deadline and removes it if it passed;
* actively: one connection at a time (the *sweeper*) runs a timer that pops due entries from the
  heap, at most ``expire_batch`` per pass, and comes back after ``min(time to the next deadline,
  expire_interval)``. Heap entries made stale by ``SET``, ``PERSIST`` or a new TTL are skipped
  when popped and the heap is rebuilt from ``expires`` when more than half of it is stale.

Values are ``bytes`` (strings) or :class:`collections.deque` of ``bytes`` (lists): the Python type
is the type tag that ``WRONGTYPE`` checks read.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

from .resp_protocol import RespLimits, header_tables

__all__ = ["Keyspace", "KEY_OVERHEAD", "ELEMENT_OVERHEAD", "LIST_OVERHEAD"]

#: Estimated bytes a key costs besides its key and value bytes (dict slot, two bytes objects).
KEY_OVERHEAD = 112
#: Estimated bytes a list element costs besides its bytes (a bytes object, a deque slot).
ELEMENT_OVERHEAD = 41
#: Estimated bytes of an empty list (a deque and its first block).
LIST_OVERHEAD = 632

Value = bytes | deque


def value_size(value: Any) -> int:
    """Estimated bytes of a value (without :data:`KEY_OVERHEAD`)."""
    if value.__class__ is bytes:
        return len(value)
    return LIST_OVERHEAD + sum(len(e) for e in value) + ELEMENT_OVERHEAD * len(value)


class Keyspace:
    """Keys, deadlines and the memory estimate of one server. See the module docstring.

    Callers (the machine's commands) hold ``lock`` when it is not ``None``. ``max_memory`` and
    ``max_keys`` are copied from ``limits`` because every write reads them.
    """

    __slots__ = (
        "data", "expires", "heap", "used", "limits", "lock", "sweeper", "max_memory", "max_keys",
        "headers",
    )  # fmt: skip

    def __init__(self, limits: RespLimits | None = None, lock: Any = None) -> None:
        self.limits = limits if limits is not None else RespLimits()
        self.lock = lock
        #: key -> value (bytes or deque)
        self.data: dict[bytes, Value] = {}
        #: key -> deadline on the server's monotonic clock, for keys with a TTL only
        self.expires: dict[bytes, float] = {}
        #: (deadline, key), possibly stale: valid while ``expires[key] == deadline``
        self.heap: list[tuple[float, bytes]] = []
        #: estimated bytes of keys and values
        self.used = 0
        #: the machine running the active-expiry timer, if any
        self.sweeper: Any = None
        self.max_memory = self.limits.max_memory
        self.max_keys = self.limits.max_keys
        #: header tables of the command cutter's fast path (see ``header_tables``)
        self.headers = header_tables(self.limits)

    def __len__(self) -> int:
        return len(self.data)

    # -- reading ------------------------------------------------------------------------------
    def lookup(self, key: bytes, now: float) -> Value | None:
        """The value of ``key``, or ``None`` if absent or expired (then it is removed)."""
        value = self.data.get(key)
        if value is not None and self.expires:
            deadline = self.expires.get(key)
            if deadline is not None and deadline <= now:
                self.remove(key)
                return None
        return value

    # -- writing ------------------------------------------------------------------------------
    def put(self, key: bytes, value: Value, *, keep_ttl: bool = False) -> None:
        """Store ``value`` under ``key``; its TTL goes unless ``keep_ttl``."""
        data = self.data
        old = data.get(key)
        if old is None:
            self.used += KEY_OVERHEAD + len(key) + value_size(value)
        else:
            self.used += value_size(value) - value_size(old)
            if not keep_ttl and self.expires:
                self.expires.pop(key, None)
        data[key] = value

    def remove(self, key: bytes) -> bool:
        """Delete ``key`` (and its TTL); False if it was absent."""
        value = self.data.pop(key, None)
        if value is None:
            return False
        self.used -= KEY_OVERHEAD + len(key) + value_size(value)
        if self.expires:
            self.expires.pop(key, None)
        return True

    def clear(self) -> None:
        """Remove every key."""
        self.data.clear()
        self.expires.clear()
        self.heap.clear()
        self.used = 0

    # -- expiry ---------------------------------------------------------------------------------
    def expire_at(self, key: bytes, deadline: float) -> None:
        """Give the (existing) ``key`` a deadline."""
        expires = self.expires
        expires[key] = deadline
        heap = self.heap
        heapq.heappush(heap, (deadline, key))
        if len(heap) > 64 and len(heap) > 2 * len(expires):
            # Mostly stale entries (keys overwritten, re-expired, persisted): rebuild.
            self.heap = [(d, k) for k, d in expires.items()]
            heapq.heapify(self.heap)

    def persist(self, key: bytes) -> bool:
        """Remove the TTL of ``key``; False if it had none."""
        return self.expires.pop(key, None) is not None

    def sweep(self, now: float, budget: int) -> int:
        """Remove keys whose deadline passed, popping at most ``budget`` heap entries (stale
        ones count: the work is bounded). Returns how many keys were removed."""
        heap = self.heap
        expires = self.expires
        removed = 0
        while heap and budget > 0:
            deadline, key = heap[0]
            if deadline > now:
                break
            heapq.heappop(heap)
            budget -= 1
            if expires.get(key) == deadline:
                self.remove(key)
                removed += 1
        return removed

    def next_deadline(self) -> float | None:
        """The earliest deadline in the heap (perhaps a stale one), or ``None``."""
        return self.heap[0][0] if self.heap else None
