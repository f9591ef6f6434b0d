"""The selectors loop: one thread, a table of connections, one timer heap.

:class:`Loop` knows selectors, timers and callbacks, not protocols. Servers register their
sockets with a callback as the selector key's data; each pass the loop waits for readiness
(at most until the nearest timer, at most ``poll_interval``, not at all when callbacks are
queued), calls the callbacks of ready sockets, fires due timers, then runs queued callbacks
(messages, resumed frames, deferred teardown).

One loop can host several servers (a TCP and a Unix listener in one thread)::

    loop = Loop()
    loop.add(tcp_server)
    loop.add(unix_server)
    threading.Thread(target=loop.run).start()
    ...
    loop.shutdown()          # from another thread: stops and drains every server

``shutdown()`` wakes the loop at once through a socketpair; nothing polls.
"""

from __future__ import annotations

import select
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .timers import Timer, TimerQueue

if TYPE_CHECKING:
    from .multiplex import MultiplexingMixIn

__all__ = ["Loop", "Poller", "EpollPoller", "SelectorPoller"]

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
_MAX_WAIT = 3600.0


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else fileobj.fileno()


class Poller:
    """What the loop needs of a readiness API: ``register``/``modify``/``unregister`` a file
    (or fd) with ``EVENT_READ``/``EVENT_WRITE`` and a callback, ``poll(timeout)`` returning
    ``(callback, mask)`` pairs, ``close()``. The same calls as a ``selectors`` selector."""

    def register(self, fileobj: Any, events: int, data: Callable[[int], Any]) -> None:
        raise NotImplementedError

    def modify(self, fileobj: Any, events: int, data: Callable[[int], Any]) -> None:
        raise NotImplementedError

    def unregister(self, fileobj: Any) -> None:
        raise NotImplementedError

    def poll(self, timeout: float | None) -> list[tuple[Callable[[int], Any], int]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class EpollPoller(Poller):
    """``select.epoll`` with a plain ``{fd: callback}`` table: no ``SelectorKey`` per
    registration and no per-event translation layer — per connection and per event, that is
    memory and time the loop does not spend."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int], Any]] = {}
        self._masks: dict[int, int] = {}
        #: fds of registered file objects, so one closed before unregister() is still found
        self._objects: dict[int, int] = {}

    @staticmethod
    def _to_epoll(events: int) -> int:
        flags = 0
        if events & EVENT_READ:
            flags |= select.EPOLLIN
        if events & EVENT_WRITE:
            flags |= select.EPOLLOUT
        return flags

    def register(self, fileobj: Any, events: int, data: Callable[[int], Any]) -> None:
        fd = _fd(fileobj)
        if fd in self._callbacks:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self._epoll.register(fd, self._to_epoll(events))
        self._callbacks[fd] = data
        if not isinstance(fileobj, int):
            self._objects[id(fileobj)] = fd

    def modify(self, fileobj: Any, events: int, data: Callable[[int], Any]) -> None:
        fd = _fd(fileobj)
        if fd not in self._callbacks:
            raise KeyError(f"{fileobj!r} (fd {fd}) is not registered")
        self._epoll.modify(fd, self._to_epoll(events))
        self._callbacks[fd] = data

    def unregister(self, fileobj: Any) -> None:
        if isinstance(fileobj, int):
            fd = fileobj
        else:
            fd = self._objects.pop(id(fileobj), None)
            if fd is None:
                fd = _fd(fileobj)
        del self._callbacks[fd]  # KeyError if not registered, as selectors does
        try:
            self._epoll.unregister(fd)
        except OSError:  # already closed: the kernel forgot it
            pass

    def poll(self, timeout: float | None) -> list[tuple[Callable[[int], Any], int]]:
        if timeout is None:
            timeout = -1
        elif timeout < 0:
            timeout = 0
        try:
            ready = self._epoll.poll(timeout, max(len(self._callbacks), 1))
        except InterruptedError:
            return []
        callbacks = self._callbacks
        masks = self._masks
        out = []
        for fd, flags in ready:
            callback = callbacks.get(fd)
            if callback is None:
                continue
            mask = masks.get(flags)
            if mask is None:  # errors and hang-ups wake both directions, as in selectors
                mask = 0
                if flags & ~select.EPOLLIN:
                    mask |= EVENT_WRITE
                if flags & ~select.EPOLLOUT:
                    mask |= EVENT_READ
                masks[flags] = mask
            out.append((callback, mask))
        return out

    def close(self) -> None:
        self._epoll.close()
        self._callbacks.clear()


class SelectorPoller(Poller):
    """Any ``selectors`` selector (kqueue, poll, select) behind the :class:`Poller` calls."""

    def __init__(self, selector: selectors.BaseSelector | None = None) -> None:
        self.selector = selector if selector is not None else selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Callable[[int], Any]) -> None:
        self.selector.register(fileobj, events, data)

    def modify(self, fileobj: Any, events: int, data: Callable[[int], Any]) -> None:
        self.selector.modify(fileobj, events, data)

    def unregister(self, fileobj: Any) -> None:
        self.selector.unregister(fileobj)

    def poll(self, timeout: float | None) -> list[tuple[Callable[[int], Any], int]]:
        return [(key.data, mask) for key, mask in self.selector.select(timeout)]

    def close(self) -> None:
        self.selector.close()


class Loop:
    """A selectors loop hosting one or more multiplexing servers.

    Callers may use :meth:`add`, :meth:`run`, :meth:`run_once`, :meth:`shutdown` (from any
    thread), :meth:`call_later`, :meth:`call_soon` (loop thread) and
    :meth:`call_soon_threadsafe` (any thread).
    """

    def __init__(self, selector: selectors.BaseSelector | Poller | None = None) -> None:
        if isinstance(selector, Poller):
            poller: Poller = selector
        elif selector is not None:
            poller = SelectorPoller(selector)
        elif hasattr(select, "epoll"):
            poller = EpollPoller()
        else:
            poller = SelectorPoller()
        #: the readiness API; ``register``/``modify``/``unregister`` as with ``selectors``
        self.selector = poller
        self.timers = TimerQueue()
        self.ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._threadsafe: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.servers: list[MultiplexingMixIn] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_callback = self._on_wake  # one bound method, compared by identity
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._wake_callback)
        self._stop = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._exited = threading.Event()
        self._exited.set()
        self.started = threading.Event()
        self.closed = False

    # -- scheduling ---------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` after ``delay`` seconds (loop thread only)."""
        return self.timers.add(time.monotonic() + delay, callback, *args)

    def call_later_quiet(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Like :meth:`call_later`, for housekeeping: its firing does not count as activity
        (``run_once`` returns 0 if nothing else happened)."""
        timer = self.timers.add(time.monotonic() + delay, callback, *args)
        timer.quiet = True
        return timer

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` at the end of this pass (loop thread only)."""
        self.ready.append((callback, args))

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` in the loop thread soon; wakes the loop."""
        self._threadsafe.append((callback, args))
        self.wake()

    def wake(self) -> None:
        """Make a sleeping ``select`` return now (any thread)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is already pending) or closed
            pass

    def _on_wake(self, mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    # -- servers ------------------------------------------------------------------------------
    def add(self, server: MultiplexingMixIn) -> None:
        """Host ``server`` on this loop (before or while it runs, from the loop thread)."""
        if server in self.servers:
            return
        server._attach(self)
        self.servers.append(server)

    def remove(self, server: MultiplexingMixIn) -> None:
        if server in self.servers:
            self.servers.remove(server)
            server._detach()

    # -- running ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._running

    def run_once(self, timeout: float | None = None) -> int:
        """One pass: wait up to ``timeout`` for readiness or the nearest timer, handle every
        ready socket and due timer, run queued callbacks. Returns how many sockets became
        ready plus how many timers fired (0: nothing happened)."""
        if self.ready or self._threadsafe:
            timeout = 0
        else:
            deadline = self.timers.next_deadline()
            if deadline is not None:
                wait = deadline - time.monotonic()
                wait = wait if wait > 0 else 0
                timeout = wait if timeout is None or wait < timeout else timeout
        if timeout is not None and timeout > _MAX_WAIT:
            timeout = (
                _MAX_WAIT  # epoll takes at most INT_MAX ms: a far timer is waited for in steps
            )
        events = self.selector.poll(timeout)
        activity = len(events)
        on_wake = self._wake_callback
        for callback, mask in events:
            if callback is on_wake:
                activity -= 1
            callback(mask)
        if self.timers._heap:
            activity += self.timers.run_due(time.monotonic())
        threadsafe = self._threadsafe
        while threadsafe:
            callback, args = threadsafe.popleft()
            callback(*args)
        ready = self.ready
        for _ in range(len(ready)):
            callback, args = ready.popleft()
            callback(*args)
        return activity

    def run(self, poll_interval: float | None = 0.5) -> None:
        """Serve until :meth:`shutdown`; then drain every server's connections (bounded by
        their ``drain_timeout``). ``service_actions()`` of each server runs every pass, at
        least every ``poll_interval`` seconds."""
        with self._state_lock:
            if self._running:
                raise RuntimeError("this loop is already running")
            if self.closed:
                raise RuntimeError("this loop is closed")
            self._running = True
            self._thread = threading.current_thread()
            self._exited.clear()
        for server in self.servers:
            server._resume_serving()  # after an earlier run's drain
        self.started.set()
        try:
            while not self._stop:
                self.run_once(poll_interval)
                for server in self.servers:
                    server.service_actions()
            self._drain()
        finally:
            with self._state_lock:
                self._stop = False
                self._running = False
                self._thread = None
                self.started.clear()
                self._exited.set()

    def shutdown(self) -> None:
        """Stop :meth:`run` and wait until it has returned (any thread).

        Returns at once when the loop is not running. Called from the loop's own thread
        (e.g. from a handler) it only asks the loop to stop, without waiting.
        """
        with self._state_lock:
            self._stop = True
            running = self._running
            thread = self._thread
        if not running:
            return
        self.wake()
        if thread is not threading.current_thread():
            self._exited.wait()

    def _drain(self) -> None:
        """Stop accepting; let connections flush, bounded by the servers' drain_timeout."""
        if not self.servers:
            return
        deadline = time.monotonic() + max(s.limits.drain_timeout for s in self.servers)
        for server in self.servers:
            server._begin_drain()
        while any(server._table for server in self.servers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.run_once(remaining)
        for server in self.servers:
            server._end_drain()

    def close(self) -> None:
        """Release the selector and wake-up sockets (after ``run`` returned)."""
        if self.closed:
            return
        self.closed = True
        for server in list(self.servers):
            self.remove(server)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
