"""A broadcast hub shared by the connections of one server.

Connections subscribe to topics; publishing hands a :class:`~statemux.events.Message` to each
subscriber's ``deliver``, which queues it and has it handled after the current handler returns
(run to completion: no handler is ever re-entered). Subscribers are kept in subscription order,
so every subscriber sees the messages of one topic in the order they were published.

The hub takes an optional lock: the multiplexing loop needs none (one thread), the threading
servers pass one.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Protocol

from .events import Message

__all__ = ["Hub", "Subscriber"]


class Subscriber(Protocol):
    cid: int

    def deliver(self, message: Message) -> None: ...


class Hub:
    """Topic -> subscribers. ``publish`` returns how many subscribers it reached."""

    def __init__(self, lock: threading.Lock | threading.RLock | None = None) -> None:
        self._topics: dict[str, dict[Subscriber, None]] = {}
        self._lock: Any = lock if lock is not None else contextlib.nullcontext()

    def ensure_lock(self) -> None:
        """Make the hub safe for threads (servers whose connections run in threads call it)."""
        if not hasattr(self._lock, "acquire"):
            self._lock = threading.RLock()

    def subscribe(self, topic: str, sub: Subscriber) -> None:
        with self._lock:
            self._topics.setdefault(topic, {})[sub] = None

    def unsubscribe(self, topic: str, sub: Subscriber) -> None:
        with self._lock:
            subs = self._topics.get(topic)
            if subs is not None:
                subs.pop(sub, None)
                if not subs:
                    del self._topics[topic]

    def publish(
        self,
        topic: str,
        payload: object,
        sender: Subscriber | None = None,
        include_sender: bool = False,
    ) -> int:
        with self._lock:
            subs = list(self._topics.get(topic, ()))
        message = Message(topic, payload, sender.cid if sender is not None else None)
        n = 0
        for sub in subs:
            if sub is sender and not include_sender:
                continue
            sub.deliver(message)
            n += 1
        return n

    def subscribers(self, topic: str) -> int:
        with self._lock:
            return len(self._topics.get(topic, ()))

    def topics(self) -> list[str]:
        with self._lock:
            return sorted(self._topics)
