"""The blocking driver, and the synchronous, threading and forking models.

A machine served by ``TCPServer``, ``ThreadingTCPServer`` or ``ForkingTCPServer`` (and their
UDP and Unix siblings) is driven by :class:`BlockingConnection`: the runner of
:mod:`statemux.connection` on one socket, in one thread — inline in the serving thread
(sync), in a thread of its own (threading), or in a forked child (forking). It behaves as
the multiplexing driver does, byte for byte:

- the same framing, limits and replies; everything one read produced goes out in one send;
- state timeouts, named timers and the idle timeout live in a per-connection
  :class:`~statemux.timers.TimerQueue`; the thread waits in ``poll`` for its socket with the
  nearest deadline as the timeout, so nothing polls;
- output is sent at once when the kernel takes it, buffered otherwise; above
  ``output_high_water`` the connection stops reading, beyond ``output_limit`` it is closed as
  a slow consumer;
- a graceful close flushes (within ``flush_timeout``; a peer that stops reading is then cut
  off with a reset, reason ``SLOW_CONSUMER``), shuts down the sending side (``SHUT_WR``) and
  reads and discards the peer's input for up to ``linger_timeout``; a reset or broken pipe
  is a normal close (reason ``PEER_CLOSED``), never a traceback;
- handler errors go to ``handle_error`` and close the connection with the same reasons.

Stdlib handler classes (``BaseRequestHandler`` subclasses) keep the stdlib behaviour on these
servers: ``finish_request`` instantiates them exactly as ``socketserver`` does.

Threading and shared services
-----------------------------
Under threading the server's :class:`~statemux.hub.Hub` gets a lock (publishing copies the
subscriber list under it, then delivers outside it). A delivery from another thread goes
into the receiving connection's mailbox and wakes its thread through a per-connection
socketpair, so a broadcast reaches a member blocked in ``poll``; the sender never waits for
a receiver. A mailbox holding more than the receiver's ``output_limit`` (together with its
buffered output) closes the receiver as a slow consumer. Machine timers (including a store's
active expiry run from a machine's named timer) fire in their connection's own thread.
Services a factory shares between machines (a store, a room registry) must take their own
lock; statemux serializes nothing else. Transition counters are kept per connection and
added to ``server.stats`` when the connection ends, so they are never torn by two threads.

Datagrams
---------
Each peer address has a session (a machine) in a table shared by the model: sync handles
every datagram in the serving thread; threading gives a busy session a worker thread (one
at a time per session, so its datagrams are handled in order) and locks the table. Sessions
expire after ``session_timeout`` without traffic. Forking handles each datagram in a new
child with a new machine, so it serves only machines without per-peer state
(:func:`peer_state_reason`). A Unix datagram sender that never bound an address gets no
session and no reply (a reply attempt is counted in ``replies_unroutable`` and logged).
Replies the socket cannot take at once are queued, up to ``datagram_queue``, then dropped
and counted in ``datagrams_dropped`` — the serving thread never blocks on a send.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import select
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .connection import Connection, Stats, Tracer
from .events import CloseReason, Message, Opened, TimerFired
from .framing import TruncatedDatagram
from .host import ConnectionInfo, MachineHostMixIn, datagram_bufsize, is_handler_class, log
from .hub import Hub
from .machine import Machine
from .sockets import pop_socket_options
from .stream import SocketConnection
from .timers import Timer, TimerQueue

__all__ = [
    "BlockingConnection",
    "BlockingDatagramSession",
    "BlockingMixIn",
    "ThreadingMixIn",
    "ForkingMixIn",
    "UnsupportedMachine",
    "peer_state_reason",
]

_monotonic = time.monotonic
_IN = select.POLLIN
_OUT = select.POLLOUT
_TROUBLE = select.POLLERR | select.POLLHUP | select.POLLNVAL
_ACCEPT_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
#: seconds between attempts to send queued replies to a Unix datagram peer that is not reading
_DATAGRAM_RETRY = 0.01
#: a non-bytes hub payload counts as this many bytes against a mailbox's bound
_NOMINAL_PAYLOAD = 256
_UNSET: Any = object()


class UnsupportedMachine(TypeError):
    """A server's concurrency model cannot run this machine; raised by the constructor (or
    for the first connection, when the factory's machine class cannot be told in advance)."""


def peer_state_reason(cls: type[Machine]) -> str | None:
    """Why a machine keeps per-peer state across datagrams, or ``None`` if it does not.

    A machine may say so itself with a class attribute ``per_peer_state = True/False``.
    Otherwise it keeps per-peer state when it shares memory, has more than one non-final
    state, has a state timeout, or handles ``Opened``, ``TimerFired`` or ``Message`` —
    all of which only mean something when the same machine sees the next datagram.
    Per-connection data fields set by the factory (configuration) do not count.
    """
    declared = getattr(cls, "per_peer_state", None)
    if declared is not None:
        return "it declares per_peer_state = True" if declared else None
    if cls.shares_memory:
        return "it shares memory (shares_memory = True)"
    spec = getattr(cls, "spec", None)
    if spec is None:  # not a machine yet (no states): make_machine will say so
        return None
    states = [st for st in spec.states.values() if not st.final]
    if len(states) > 1:
        return f"it has {len(states)} states ({', '.join(st.name for st in states)})"
    for st in states:
        if st.timeout is not None:
            return f"state '{st.name}' has a timeout"
        for etype, what in ((Opened, "Opened"), (TimerFired, "TimerFired"), (Message, "Message")):
            if etype in st.handlers:
                return f"state '{st.name}' handles {what}"
    return None


#: poll() takes at most INT_MAX ms; a far deadline is simply waited for in steps
_MAX_WAIT_MS = 3_600_000


def _ms(seconds: float | None) -> int | None:
    if seconds is None:
        return None
    return min(max(0, math.ceil(seconds * 1000)), _MAX_WAIT_MS)


def _payload_size(payload: object) -> int:
    if isinstance(payload, (bytes, bytearray, memoryview, str)):
        return len(payload)
    return _NOMINAL_PAYLOAD


class _Warning:
    """A warning logged the first time, then at most every ``interval`` seconds with how
    often it happened meanwhile: a server flapping at a bound must not flood the log."""

    interval = 60.0

    def __init__(self) -> None:
        self.count = 0
        self.last = -math.inf
        self.suppressed = 0

    def hit(self, message: str, *args: Any) -> None:
        self.count += 1
        now = _monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            message += " (%d more times since the last warning)"
            args = (*args, self.suppressed)
        self.last = now
        self.suppressed = 0
        log.warning(message, *args)


# -- hosts -----------------------------------------------------------------------------------------
class _LocalHost:
    """The host of one stream connection: the server's limits, hub, tracer and error funnel,
    with timers, queued callbacks and counters of its own (the thread owns them)."""

    __slots__ = ("server", "limits", "hub", "tracer", "stats", "timers", "ready")

    time = staticmethod(_monotonic)

    def __init__(self, server: BlockingMixIn) -> None:
        self.server = server
        self.limits = server.limits
        self.hub = server.hub
        self.tracer = server.tracer
        self.stats = Stats()
        self.timers = TimerQueue()
        self.ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return self.timers.add(_monotonic() + delay, callback, *args)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.ready.append((callback, args))

    def report_error(self, conn: Connection) -> None:
        self.server.report_error(conn)

    def run_ready(self) -> None:
        """One pass over the callbacks queued so far (those they queue wait for the next)."""
        ready = self.ready
        for _ in range(len(ready)):
            callback, args = ready.popleft()
            callback(*args)


class _SessionTimer:
    """A datagram session's timer: kept in the server's heap, fired in the session's worker."""

    __slots__ = ("callback", "args", "cancelled", "entry", "lock")

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...], lock: Any) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False
        self.entry: Timer | None = None
        self.lock = lock

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            with self.lock:
                if self.entry is not None:
                    self.entry.cancel()

    def fire(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.callback(*self.args)


class _SessionHost(_LocalHost):
    """A datagram session's host: timers go to the server's heap (the serving thread watches
    them) and fire as work items in the session's worker, never concurrently with it."""

    __slots__ = ("session",)

    def __init__(self, server: BlockingMixIn) -> None:
        super().__init__(server)
        self.session: BlockingDatagramSession | None = None

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> _SessionTimer:
        assert self.session is not None
        return self.server._session_timer(self.session, delay, callback, args)

    def run_all(self) -> None:
        ready = self.ready
        while ready:
            callback, args = ready.popleft()
            callback(*args)


# -- the stream driver -----------------------------------------------------------------------------
class BlockingConnection(SocketConnection):
    """A machine on one stream socket, driven by the thread that calls :meth:`run`.

    Servers create it in ``finish_request``; nobody else calls its methods, except
    :meth:`deliver` (any thread, through the hub).
    """

    __slots__ = (
        "server", "local", "draining", "drain_deadline", "owner", "mail", "mail_bytes",
        "mail_lock", "overflowed", "wake_r", "wake_w", "wake_pending", "registered",
    )  # fmt: skip

    def __init__(
        self, server: BlockingMixIn, sock: socket.socket, peer: Any, machine: Machine, cid: int
    ) -> None:
        self.server = server
        self.local = _LocalHost(server)
        self.draining = False
        self.drain_deadline = 0.0
        self.owner: int | None = None
        self.mail: deque[Message] = deque()
        self.mail_bytes = 0
        self.mail_lock = threading.Lock()
        self.overflowed = False
        self.wake_r: socket.socket | None = None
        self.wake_w: socket.socket | None = None
        self.wake_pending = False
        self.registered = 0
        super().__init__(self.local, sock, peer, machine, cid)

    # -- the driver loop ----------------------------------------------------------------------
    def run(self) -> None:
        """Serve the connection in the calling thread until it has ended."""
        self.owner = threading.get_ident()
        sock = self.sock
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        poller = select.poll()
        drain_fd = self.server._drain_fd()
        poller.register(drain_fd, _IN)
        try:
            self.start()
            self.local.run_ready()
            while not self.closed:
                self._step(poller, drain_fd)
        finally:
            if not self.closed:  # an exception escaped the runner (KeyboardInterrupt, a bug)
                self.wbuf = b""
                if self.closing is None:
                    self.closing = CloseReason.SHUTDOWN
                self.finish()
            with self.mail_lock:
                for end in (self.wake_r, self.wake_w):
                    if end is not None:
                        end.close()
                self.wake_r = self.wake_w = None

    def _step(self, poller: select.poll, drain_fd: int) -> None:
        local = self.local
        want = _IN if self.lingering or self.wants_input else 0
        if self.wbuf:
            want |= _OUT
        if want != self.registered:
            if not want:
                poller.unregister(self.fd)
            elif not self.registered:
                poller.register(self.fd, want)
            else:
                poller.modify(self.fd, want)
            self.registered = want
        if self.topics and self.wake_r is None:
            self._make_wake(poller)
        if local.ready or self.mail or self.overflowed:
            timeout: int | None = 0
        else:
            deadline = local.timers.next_deadline()
            if self.draining and (deadline is None or self.drain_deadline < deadline):
                deadline = self.drain_deadline
            timeout = None if deadline is None else _ms(deadline - _monotonic())
        for fd, ev in poller.poll(timeout):
            if fd == self.fd:
                if ev & (_IN | _TROUBLE) and self.registered & _IN:
                    self._readable()
                if ev & (_OUT | _TROUBLE) and self.wbuf and not self.closed:
                    self._writable()
            elif fd == drain_fd:
                poller.unregister(drain_fd)
                self._begin_drain()
            elif self.wake_r is not None and fd == self.wake_r.fileno():
                self._drain_wake()
        if self.mail or self.overflowed:
            self._take_mail()
        if self.draining and not self.closed and _monotonic() >= self.drain_deadline:
            self.close(CloseReason.SHUTDOWN, abort=True)
        if local.timers._heap:
            local.timers.run_due(_monotonic())
        local.run_ready()

    def _draining(self) -> bool:
        return self.draining

    def _release(self) -> None:
        # Closed here, not by the server's shutdown_request: its SHUT_WR would send a FIN
        # ahead of the reset that ends a cut-short connection.
        self._drop_socket()
        self.server._connection_done(self)

    # -- shutdown --------------------------------------------------------------------------------
    def _begin_drain(self) -> None:
        """The server is shutting down: close gracefully within ``drain_timeout``."""
        self.draining = True
        self.drain_deadline = _monotonic() + self.local.limits.drain_timeout
        self.begin_drain()

    # -- deliveries from other threads -------------------------------------------------------------
    def deliver(self, message: Message) -> None:
        """Queue a hub message (any thread). From another thread it goes to the mailbox and
        wakes this connection's thread; the caller never waits."""
        if self.owner is None or self.owner == threading.get_ident():
            Connection.deliver(self, message)
            return
        size = _payload_size(message.payload)
        with self.mail_lock:
            if self.closing is not None or self.overflowed:
                return
            if self.mail_bytes + size + len(self.wbuf) > self.local.limits.output_limit:
                self.overflowed = True
            else:
                self.mail.append(message)
                self.mail_bytes += size
            if self.wake_w is not None and not self.wake_pending:
                self.wake_pending = True
                try:
                    self.wake_w.send(b"\0")
                except OSError:
                    pass

    def _make_wake(self, poller: select.poll) -> None:
        # Created before the first poll after subscribing: a message delivered earlier is
        # already in the mailbox, which is checked before every poll.
        with self.mail_lock:
            self.wake_r, self.wake_w = socket.socketpair()
            self.wake_r.setblocking(False)
            self.wake_w.setblocking(False)
        poller.register(self.wake_r.fileno(), _IN)

    def _drain_wake(self) -> None:
        assert self.wake_r is not None
        try:
            while self.wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _take_mail(self) -> None:
        with self.mail_lock:
            messages = list(self.mail)
            self.mail.clear()
            self.mail_bytes = 0
            self.wake_pending = False
            overflowed = self.overflowed
        if overflowed:
            if self.closing is None:
                self.close(CloseReason.SLOW_CONSUMER, abort=True)
            return
        for message in messages:
            Connection.deliver(self, message)


# -- datagram sessions -----------------------------------------------------------------------------
class BlockingDatagramSession(Connection):
    """A machine per peer address on a blocking-model datagram server.

    Work for it (datagrams, timers, hub messages) is queued in ``work`` and run by one
    thread at a time; the server decides which (see :class:`BlockingMixIn`).
    """

    __slots__ = ("server", "sock", "local", "work", "running", "worker")

    #: each ``send()`` is a datagram of its own, never joined with the next
    joins_output = False

    def __init__(
        self, server: BlockingMixIn, sock: socket.socket, peer: Any, machine: Machine, cid: int
    ) -> None:
        self.server = server
        self.sock = sock
        self.local = _SessionHost(server)
        self.work: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.running = False
        self.worker: int | None = None  # the thread running its work now
        super().__init__(self.local, machine, cid, peer)
        self.local.session = self

    def _transmit(self, data: bytes) -> None:
        self.server._send_datagram(data, self.peer)

    def idle_limit(self) -> float | None:
        return self.local.limits.session_timeout

    def _closing(self, abort: bool) -> None:
        self.local.call_soon(self.finish)

    def _release(self) -> None:
        self.server._session_done(self)

    def deliver(self, message: Message) -> None:
        self.server._post(self, Connection.deliver, (self, message))

    def one_shot(self, data: bytes) -> None:
        """Handle one datagram with a fresh machine, then close (unbound peers, forking)."""
        self.start()
        self.receive_datagram(data)
        if self.closing is None:
            self.close(CloseReason.NORMAL)

    def shut(self) -> None:
        if self.closing is None:
            self.close(CloseReason.SHUTDOWN, abort=True)


# -- the models ------------------------------------------------------------------------------------
class BlockingMixIn(MachineHostMixIn):
    """Machines (or stdlib handlers) served synchronously: one connection at a time, inline
    in the thread that runs ``serve_forever``. :class:`ThreadingMixIn` and
    :class:`ForkingMixIn` build on it.

    Constructor: ``(server_address, factory_or_handler_class, bind_and_activate=True, *,
    tracer=None, hub=None, socket=None, fileno=None, dual_stack=None, socket_mode=None,
    **limits)``. Refuses, with :class:`UnsupportedMachine`, machines its model cannot run.

    Callers may use the whole ``BaseServer`` interface plus ``stats``, ``connections``,
    ``datagrams_dropped`` and ``replies_unroutable``. ``serve_forever`` waits in ``poll``
    and wakes through a socketpair: ``shutdown()`` returns promptly, and closes machine
    connections gracefully (reason ``SHUTDOWN``) within ``drain_timeout``. Subclasses may
    override what ``socketserver`` lets them override.
    """

    request_queue_size = socket.SOMAXCONN
    #: how many datagrams are read per readiness event of a datagram socket
    datagrams_per_event = 64
    #: datagrams (and timer or hub events) waiting for one session's worker thread; more
    #: are dropped and counted in ``datagrams_dropped``
    session_backlog = 4096

    socket: socket.socket
    socket_type: int
    address_family: int
    server_address: Any

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
        *,
        tracer: Tracer | None = None,
        hub: Hub | None = None,
        **options: Any,
    ) -> None:
        socket_options = pop_socket_options(options)
        self._handler_mode = is_handler_class(RequestHandlerClass)
        if not self._handler_mode and not callable(RequestHandlerClass):
            raise TypeError(f"the machine factory must be callable, not {RequestHandlerClass!r}")
        threaded = self.model == "threading"
        if hub is None:
            hub = Hub(threading.Lock()) if threaded else Hub()
        elif threaded:
            hub.ensure_lock()  # a hub made without a lock, now shared by threads
        self._init_host(RequestHandlerClass, tracer, hub, options)
        self._machine_checked = False
        if not self._handler_mode and self.machine_class is not None:
            self._check_machine(self.machine_class)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._live: set[BlockingConnection] = set()
        self._sessions: dict[Any, BlockingDatagramSession] = {}
        self._runnable: deque[BlockingDatagramSession] = deque()
        self._timers = TimerQueue()
        self._dgram_queue: deque[tuple[bytes, Any]] = deque()
        self._dgram_lock = threading.Lock()
        self._dgram_retry = 0.0
        self._dgram_waiting: dict[Any, int] = {}  # peer -> replies queued for it
        self.datagrams_dropped = 0
        self.replies_unroutable = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._drain_r, self._drain_w = os.pipe()
        self._old_pipes: list[int] = []
        self._drain_signalled = False
        self._stop = False
        self._serving = False
        self._serve_thread: int | None = None
        self._exited = threading.Event()
        self._exited.set()
        self._accept_resume = 0.0
        self._fds_released = False
        self._closing_server = False
        self._bound_warning = _Warning()
        self._backlog_warning = _Warning()  # each hit under _lock
        self._queue_warning = _Warning()  # each hit under _dgram_lock
        try:
            # Socket options are passed only when given: a stdlib server class mixed in
            # directly (without SocketsMixIn) takes none.
            init: Any = super().__init__
            init(server_address, RequestHandlerClass, bind_and_activate, **socket_options)
        except BaseException:
            self._release_fds()  # an address refused before any socket existed
            raise

    # -- what the model is -------------------------------------------------------------------------
    @property
    def model(self) -> str:
        """``"sync"``, ``"threading"`` or ``"forking"``."""
        if isinstance(self, getattr(socketserver, "ForkingMixIn", ())):
            return "forking"
        if isinstance(self, socketserver.ThreadingMixIn):
            return "threading"
        return "sync"

    @property
    def is_datagram(self) -> bool:
        return self.socket_type == socket.SOCK_DGRAM

    def _family_name(self) -> str:
        unix = type(self).address_family == getattr(socket, "AF_UNIX", None)
        if self.is_datagram:
            return "UnixDatagramServer" if unix else "UDPServer"
        return "UnixStreamServer" if unix else "TCPServer"

    def _check_machine(self, cls: type[Machine]) -> None:
        """Raise :class:`UnsupportedMachine` if this model cannot run ``cls``."""
        server = type(self).__name__
        name = cls.__qualname__
        family = self._family_name()
        model = self.model
        if model == "forking" and cls.shares_memory:
            raise UnsupportedMachine(
                f"{server} cannot serve {name}: it shares memory between connections "
                "(shares_memory = True), and each forked child has its own copy of memory, so "
                "a shared store or room would silently split into one per connection; serve it "
                f"with Threading{family} or Multiplexing{family}"
            )
        if model == "sync" and cls.waits_for_peers:
            raise UnsupportedMachine(
                f"{server} cannot serve {name}: its connections wait for other connections "
                "(waits_for_peers = True), and a synchronous server serves one connection at a "
                f"time, so it would wait forever; serve it with Threading{family} or "
                f"Multiplexing{family}"
            )
        if model == "forking" and self.is_datagram:
            reason = peer_state_reason(cls)
            if reason is not None:
                raise UnsupportedMachine(
                    f"{server} cannot serve {name}: it keeps per-peer state across datagrams "
                    f"({reason}), and a forking datagram server handles each datagram with a "
                    "new machine in a new child; declare per_peer_state = False if it keeps "
                    f"none, or serve it with Threading{family} or Multiplexing{family}"
                )
        self._machine_checked = True

    def make_machine(self) -> Machine:
        """Instantiate a machine; the first one's class is checked against the model when
        the factory's class could not be told in advance."""
        machine = super().make_machine()
        if not self._machine_checked:
            self._check_machine(type(machine))
        return machine

    def _new_cid(self) -> int:
        with self._lock:
            return super()._new_cid()

    # -- serving -----------------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float | None = 0.5) -> None:
        """Serve until :meth:`shutdown`. Waits in ``poll`` (woken by a socketpair, not by
        polling); ``service_actions()`` runs at least every ``poll_interval`` seconds."""
        with self._lock:
            if self._serving:
                raise RuntimeError(f"{type(self).__name__}.serve_forever is already running")
            self._serving = True
            self._serve_thread = threading.get_ident()
            self._exited.clear()
            if self._drain_signalled and not self._stop:
                self._renew_drain()
        poller = select.poll()
        poller.register(self._wake_r.fileno(), _IN)
        registered: dict[int, int] = {}
        try:
            while not self._stop:
                self._serve_step(poller, registered, poll_interval)
                if self._stop:
                    break
                self.service_actions()
        finally:
            try:
                if self._stop:
                    self._close_sessions()
                    self._run_pending()
            finally:
                with self._lock:
                    self._stop = False
                    self._serving = False
                    self._serve_thread = None
                    self._exited.set()

    def _serve_step(
        self, poller: select.poll, registered: dict[int, int], poll_interval: float | None
    ) -> None:
        listen_fd = self.socket.fileno()
        want = 0
        if self._accepting():
            want = _IN
        if self._dgram_queue and _monotonic() >= self._dgram_retry:
            want |= _OUT
        old = registered.get(listen_fd, 0)
        if want != old:
            if not want:
                poller.unregister(listen_fd)
                del registered[listen_fd]
            elif not old:
                poller.register(listen_fd, want)
                registered[listen_fd] = want
            else:
                poller.modify(listen_fd, want)
                registered[listen_fd] = want
        self._register_extra(poller, registered)
        timeout = poll_interval
        if self._runnable and self._can_run_pending():
            timeout = 0
        else:
            deadline = self._next_deadline()
            if deadline is not None:
                wait = max(0.0, deadline - _monotonic())
                timeout = wait if timeout is None or wait < timeout else timeout
        for fd, ev in poller.poll(_ms(timeout)):
            if fd == listen_fd:
                if ev & (_OUT | _TROUBLE) and self._dgram_queue:
                    self._flush_datagrams()
                if ev & (_IN | _TROUBLE) and want & _IN:
                    self._on_readable()
            elif fd == self._wake_r.fileno():
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
            else:
                self._on_extra(fd, poller, registered)
        self._run_timers()
        self._run_pending()

    def _accepting(self) -> bool:
        if self._accept_resume:
            if _monotonic() < self._accept_resume:
                return False
            self._accept_resume = 0.0
        return True

    def _next_deadline(self) -> float | None:
        with self._lock:
            deadline = self._timers.next_deadline()
        if self._accept_resume and (deadline is None or self._accept_resume < deadline):
            deadline = self._accept_resume
        if (
            self._dgram_queue
            and self._dgram_retry
            and (deadline is None or self._dgram_retry < deadline)
        ):
            deadline = self._dgram_retry
        return deadline

    def _register_extra(self, poller: select.poll, registered: dict[int, int]) -> None:
        """Hook for models with more descriptors to watch (forking: child exits)."""

    def _on_extra(self, fd: int, poller: select.poll, registered: dict[int, int]) -> None:
        """Hook: ``fd`` registered by :meth:`_register_extra` is ready."""

    def _on_readable(self) -> None:
        if self.is_datagram and not self._handler_mode:
            self._read_datagrams()
        else:
            self._accept_one()

    def _accept_one(self) -> None:
        """Accept (or, with a handler class on a datagram socket, receive) one request and
        process it, as ``BaseServer._handle_request_noblock`` does, counting refusals."""
        try:
            request, client_address = self.get_request()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in _ACCEPT_EXHAUSTED:
                log.warning(
                    "accept failed on %s: %s; pausing accepts for %gs",
                    self.server_address,
                    exc.strerror,
                    self.limits.accept_retry_delay,
                )
                self._accept_resume = _monotonic() + self.limits.accept_retry_delay
            elif exc.errno not in _ACCEPT_TRANSIENT:
                log.debug("get_request on %s: %s", self.server_address, exc)
            return
        self._serve_request(request, client_address)

    def _count_refused(self) -> None:
        with self._lock:
            super()._count_refused()

    def handle_request(self) -> None:
        """Handle one request as ``socketserver`` does (respecting ``timeout``), then run
        the datagram sessions' due timers and queued work."""
        super().handle_request()  # type: ignore[misc]
        self._run_timers()
        self._run_pending()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the request inline, then close it (the stdlib's synchronous behaviour)."""
        self.finish_request(request, client_address)
        self.shutdown_request(request)  # type: ignore[attr-defined]

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run a stdlib handler as ``socketserver`` does, or drive a machine until the
        connection ends (a datagram goes to its peer's session)."""
        if self._handler_mode:
            super().finish_request(request, client_address)  # type: ignore[misc]
        elif self.is_datagram:
            self._datagram(request[0], client_address)
        else:
            self._serve_stream(request, client_address)

    def _serve_stream(self, request: socket.socket, client_address: Any) -> None:
        machine = self.make_machine()
        conn = BlockingConnection(self, request, client_address, machine, self._new_cid())
        with self._lock:
            self._live.add(conn)
        conn.run()

    def _connection_done(self, conn: BlockingConnection) -> None:
        with self._cond:
            self._live.discard(conn)
            self.stats.merge(conn.local.stats)
            self._cond.notify_all()
        if self._accept_resume:  # descriptors were exhausted; one was just freed
            self._accept_resume = 0.0
            self._wake_serve_thread()

    def _refuse(self, request: socket.socket) -> None:
        """Turn a stream connection away: the machine's ``refusal`` bytes, then close."""
        with self._lock:
            self.stats.close_reasons[CloseReason.REFUSED] += 1
        refusal = None if self._handler_mode else getattr(self.machine_class, "refusal", None)
        if refusal:
            try:
                request.setblocking(False)
                request.send(refusal)
            except OSError:
                pass
        self.shutdown_request(request)  # type: ignore[attr-defined]

    # -- shutting down ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop ``serve_forever`` and wait until it has returned; machine connections close
        gracefully (reason ``SHUTDOWN``) and are waited for up to ``drain_timeout`` — all
        but the caller's own, when a handler calls it. Returns at once when
        ``serve_forever`` is not running (it will then return as soon as it is called)."""
        with self._cond:
            self._stop = True
            serving = self._serving
            serve_thread = self._serve_thread
            self._cond.notify_all()
        self._signal_drain()
        self._wake()
        if serving and serve_thread != threading.get_ident():
            self._exited.wait()
        self._wait_idle(self.limits.drain_timeout)

    def _wait_idle(self, timeout: float) -> None:
        """Wait (bounded) until machine connections and sessions have ended, except the
        caller's own: a handler calling ``shutdown()`` cannot end while it waits."""
        me = threading.get_ident()
        deadline = _monotonic() + timeout
        with self._cond:
            while self._busy_besides(me):
                left = deadline - _monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _busy_besides(self, thread: int) -> bool:
        """With the lock held: a connection or session is served by a thread other than
        ``thread``."""
        if any(conn.owner != thread for conn in self._live):
            return True
        return any(s.running and s.worker != thread for s in self._sessions.values())

    def _sessions_busy(self) -> bool:
        return any(s.running for s in self._sessions.values())

    def _busy(self) -> bool:
        return bool(self._live) or self._sessions_busy()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is being served — no connection open, no handler thread
        running, no child left to reap (datagram sessions may stay, idle) — at most
        ``timeout`` seconds. Returns whether that happened. Any thread may call it."""
        deadline = _monotonic() + timeout
        with self._cond:
            while self._busy():
                left = deadline - _monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def server_close(self) -> None:
        """Close machine connections (gracefully, within ``drain_timeout``) and datagram
        sessions (reason ``SHUTDOWN``), stop listening, close the socket. May be extended."""
        self._closing_server = True
        self._signal_drain()
        self._close_sessions()
        self._run_pending()
        try:
            super().server_close()  # type: ignore[misc]
        finally:
            self._release_fds()

    def _close_sessions(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            self._post(session, session.shut, (), force=True)

    def _drain_fd(self) -> int:
        return self._drain_r

    def _signal_drain(self) -> None:
        with self._lock:
            if self._drain_signalled or self._fds_released:
                return
            self._drain_signalled = True
            os.write(self._drain_w, b"x")

    def _renew_drain(self) -> None:
        """serve_forever after a shutdown: a fresh drain signal (connections still draining
        from the last one keep the old pipe until the server closes)."""
        self._old_pipes += [self._drain_r, self._drain_w]
        self._drain_r, self._drain_w = os.pipe()
        self._drain_signalled = False

    def _release_fds(self) -> None:
        """Close the wake-up and drain descriptors once no connection thread can poll them."""
        with self._lock:
            if self._fds_released or self._live or self._threads_alive():
                return
            self._fds_released = True
            fds = [self._drain_r, self._drain_w, *self._old_pipes]
            self._old_pipes = []
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        self._wake_r.close()
        self._wake_w.close()

    def _threads_alive(self) -> bool:
        return False

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending) or closed
            pass

    # -- datagrams ---------------------------------------------------------------------------------
    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection, or receive a datagram: for machines with ``recvmsg``, so a
        datagram larger than the framing allows is seen as too long, never truncated."""
        if self._handler_mode or not self.is_datagram:
            return super().get_request()  # type: ignore[misc,no-any-return]
        bufsize = self._datagram_bufsize()
        data, _anc, flags, address = self.socket.recvmsg(bufsize, 0, socket.MSG_DONTWAIT)
        if flags & socket.MSG_TRUNC:  # cut by the kernel: too long, never passed as whole
            data = TruncatedDatagram(data)
        return (data, self.socket), address

    def _datagram_bufsize(self) -> int:
        cls = self.machine_class
        return 65536 if cls is None else datagram_bufsize(cls)

    def _read_datagrams(self) -> None:
        for _ in range(self.datagrams_per_event):
            if not self._accepting():
                return
            try:
                request, address = self.get_request()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP port unreachable reported on UDP
                log.debug("recvmsg on %s: %s", self.server_address, exc)
                continue
            self._serve_request(request, address)
            self._run_pending()  # sync: handled now, as the multiplexing loop does

    def _new_session(self, address: Any) -> BlockingDatagramSession:
        machine = self.make_machine()
        return BlockingDatagramSession(self, self.socket, address, machine, self._new_cid())

    def _datagram(self, data: bytes, address: Any) -> None:
        """A datagram from ``address``: to its session, created on the first datagram."""
        if not address:  # an unbound Unix datagram peer: no session, no reply possible
            session = self._new_session(None)
            self._post(session, session.one_shot, (data,))
            return
        # Looked up and queued in one hold of the lock: a new session's start is queued
        # before its first datagram, and a session's end (_session_done) sees every datagram
        # queued for it.
        with self._lock:
            session = self._sessions.get(address)
            runnable = False
            if session is None:
                if len(self._sessions) >= self.limits.max_connections:
                    self.stats.close_reasons[CloseReason.REFUSED] += 1
                    return
                session = self._new_session(address)
                self._sessions[address] = session
                runnable = self._enqueue(session, session.start, (), force=True)
            runnable = self._enqueue(session, None, data) or runnable
        if runnable:
            self._session_runnable()

    def _post(
        self,
        session: BlockingDatagramSession,
        fn: Callable[..., Any] | None,
        args: Any,
        *,
        force: bool = False,
    ) -> None:
        """Queue work for a session and make sure a thread will run it: ``fn(*args)``, or
        with ``fn`` None the datagram ``args``."""
        with self._lock:
            runnable = self._enqueue(session, fn, args, force=force)
        if runnable:
            self._session_runnable()

    def _enqueue(
        self,
        session: BlockingDatagramSession,
        fn: Callable[..., Any] | None,
        args: Any,
        *,
        force: bool = False,
    ) -> bool:
        """With the lock held: queue work for a session; True if it now needs a thread
        (the caller then calls :meth:`_session_runnable`, after releasing the lock). A
        datagram queued behind the one that closes the session goes to the peer's next
        session (:meth:`_session_done`), as it would have had it arrived a moment later."""
        if session.closed and fn is not None:
            return False
        work = session.work
        if not force and len(work) >= self.session_backlog:
            self.datagrams_dropped += 1
            self._backlog_warning.hit(
                "session_backlog (%d) full for %s: its worker is behind; dropped",
                self.session_backlog,
                session.peer,
            )
            return False
        work.append((fn, args))
        if session.running:
            return False
        session.running = True
        self._runnable.append(session)
        return True

    def _session_runnable(self) -> None:
        """A session has work and no thread: sync runs it in the serving thread."""
        self._wake_serve_thread()

    def _wake_serve_thread(self) -> None:
        if self._serve_thread is not None and self._serve_thread != threading.get_ident():
            self._wake()

    def _can_run_pending(self) -> bool:
        return True

    def _run_pending(self) -> None:
        """Run sessions with queued work (sync: here, in the serving thread)."""
        while True:
            with self._lock:
                if not self._runnable:
                    return
                session = self._runnable.popleft()
            self._drain_session(session)

    def _drain_session(self, session: BlockingDatagramSession) -> None:
        session.worker = threading.get_ident()
        while True:
            with self._cond:
                if not session.work:
                    session.running = False
                    session.worker = None
                    self._cond.notify_all()
                    return
                fn, args = session.work.popleft()
            if session.closed:  # its datagrams went to the peer's next session
                continue
            try:
                if fn is None:
                    session.receive_datagram(args)
                else:
                    fn(*args)
                session.local.run_all()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception:
                self.handle_error((b"", self.socket), session.peer)

    def _session_done(self, session: BlockingDatagramSession) -> None:
        """The session has ended (in its worker). Datagrams queued behind the one that ended
        it move, in order, to the peer's next session, before the address is free for newer
        ones: re-sent one by one they could pass datagrams the serving thread is queueing."""
        runnable = False
        with self._cond:
            self.stats.merge(session.local.stats)
            self._cond.notify_all()
            peer = session.peer
            if not peer or self._sessions.get(peer) is not session:
                return
            del self._sessions[peer]
            leftovers = [args for fn, args in session.work if fn is None]
            session.work.clear()
            if not leftovers:
                return
            if session.closing is CloseReason.SHUTDOWN or self._closing_server:
                self.datagrams_dropped += len(leftovers)
                return
            try:
                after = self._new_session(peer)
            except BaseException:  # the factory failed: reported by the worker
                self.datagrams_dropped += len(leftovers)
                raise
            self._sessions[peer] = after
            runnable = self._enqueue(after, after.start, (), force=True)
            for data in leftovers:
                self._enqueue(after, None, data, force=True)
        if runnable:
            self._session_runnable()

    def _session_timer(
        self,
        session: BlockingDatagramSession,
        delay: float,
        callback: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> _SessionTimer:
        handle = _SessionTimer(callback, args, self._lock)
        with self._lock:
            earliest = self._timers.next_deadline()
            when = _monotonic() + delay
            handle.entry = self._timers.add(when, self._post, session, handle.fire, ())
        if earliest is None or when < earliest:
            self._wake_serve_thread()  # it may be sleeping past the new deadline
        return handle

    def _run_timers(self) -> None:
        with self._lock:
            due = self._timers.pop_due(_monotonic()) if self._timers._heap else []
        for timer in due:
            timer.callback(*timer.args)

    def _send_datagram(self, data: bytes, address: Any) -> None:
        """Send a session's reply without ever blocking; queue or drop what can't go."""
        if not address:
            with self._lock:
                self.replies_unroutable += 1
            log.warning(
                "reply of %d bytes dropped: the peer sent from an unbound socket", len(data)
            )
            return
        with self._dgram_lock:
            queue = self._dgram_queue
            waiting = self._dgram_waiting
            # Replies keep their order per peer; a peer with nothing queued is not held up
            # by one that stopped reading (a Unix datagram peer's full queue is its own).
            if not waiting.get(address):
                try:
                    self.socket.sendto(data, socket.MSG_DONTWAIT, address)
                    return
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    self.datagrams_dropped += 1
                    log.warning("reply to %s dropped: %s", address, exc)
                    return
            if len(queue) >= self.limits.datagram_queue:
                self.datagrams_dropped += 1
                self._queue_warning.hit(
                    "datagram_queue (%d) full: reply to %s dropped",
                    self.limits.datagram_queue,
                    address,
                )
                return
            queue.append((data, address))
            waiting[address] = waiting.get(address, 0) + 1
            first = len(queue) == 1
        if first:
            self._wake_serve_thread()  # to watch for writability

    def _flush_datagrams(self) -> None:
        with self._dgram_lock:
            queue = self._dgram_queue
            waiting = self._dgram_waiting
            blocked: set[Any] = set()
            kept: deque[tuple[bytes, Any]] = deque()
            for data, address in queue:
                if address in blocked:
                    kept.append((data, address))
                    continue
                try:
                    self.socket.sendto(data, socket.MSG_DONTWAIT, address)
                except (BlockingIOError, InterruptedError):
                    blocked.add(address)
                    kept.append((data, address))
                    continue
                except OSError as exc:
                    self.datagrams_dropped += 1
                    log.warning("reply to %s dropped: %s", address, exc)
                left = waiting[address] - 1
                if left:
                    waiting[address] = left
                else:
                    del waiting[address]
            self._dgram_queue = kept
            if kept:
                # A Unix datagram socket polls writable while a peer's queue is full: retry
                # a little later instead of spinning.
                self._dgram_retry = _monotonic() + _DATAGRAM_RETRY

    # -- introspection -----------------------------------------------------------------------------
    @property
    def connections(self) -> list[ConnectionInfo]:
        """A snapshot of live connections and datagram sessions (forking: the parent's
        view only, which holds none: each connection lives in its child)."""
        with self._lock:
            conns: list[Connection] = [*self._live, *self._sessions.values()]
        return self._snapshot(conns)


class ThreadingMixIn(BlockingMixIn, socketserver.ThreadingMixIn):
    """Each connection in a thread of its own (datagrams: each busy session).

    ``max_threads`` (constructor keyword or class attribute; default ``None``, unbounded)
    bounds the handler threads. At the bound the server *stops accepting*: new clients wait
    in the listen backlog (datagrams in the socket's receive buffer) and are served, in
    order, as threads finish; a warning is logged once each time the bound is reached.
    ``max_connections`` (a limit) is different: past it, machine connections are refused
    with the machine's ``refusal`` bytes. Finished threads leave the server's thread set at
    once; ``server_close()`` joins the rest when ``block_on_close`` (the default).
    """

    daemon_threads = False
    block_on_close = True
    #: most handler threads at once (``None``: unbounded); at the bound accepting pauses
    max_threads: int | None = None

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
        *,
        max_threads: int | None = _UNSET,
        **kwargs: Any,
    ) -> None:
        if max_threads is not _UNSET:
            if max_threads is not None and (not isinstance(max_threads, int) or max_threads < 1):
                raise ValueError(f"max_threads must be a positive int or None, not {max_threads!r}")
            self.max_threads = max_threads
        self._handler_threads: set[threading.Thread] = set()
        self._saturated_logged = False
        self._bound_warning = _Warning()
        super().__init__(server_address, RequestHandlerClass, bind_and_activate, **kwargs)

    @property
    def threads(self) -> int:
        """How many handler threads are running now."""
        return len(self._handler_threads)

    def _saturated(self) -> bool:
        bound = self.max_threads
        return bound is not None and len(self._handler_threads) >= bound

    def _accepting(self) -> bool:
        if self._saturated():
            if not self._saturated_logged:
                self._saturated_logged = True
                self._bound_warning.hit(
                    "%s: max_threads (%d) handler threads busy; new requests wait until one "
                    "finishes",
                    type(self).__name__,
                    self.max_threads,
                )
            return False
        self._saturated_logged = False
        return super()._accepting()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread for the request (a datagram goes to its session's worker)."""
        if not self._handler_mode:
            if self.is_datagram:
                self.finish_request(request, client_address)
                return
            if len(self._handler_threads) >= self.limits.max_connections:
                self._refuse(request)
                return
        if not self._wait_for_slot():
            self._refuse(request)
            return
        self._spawn(self.process_request_thread, (request, client_address), f"{client_address}")

    def _wait_for_slot(self) -> bool:
        """At ``max_threads``, wait for a thread to finish (only ``handle_request`` gets
        here: ``serve_forever`` stops accepting instead). False if shutting down."""
        with self._cond:
            while self._saturated():
                if self._stop or self._closing_server:
                    return False
                self._cond.wait()
        return True

    def _spawn(self, target: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        thread = threading.Thread(
            target=self._thread_main,
            args=(target, args),
            name=f"statemux {name}",
            daemon=self.daemon_threads,
        )
        with self._lock:
            self._handler_threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._handler_threads.discard(thread)
            raise

    def _thread_main(self, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            target(*args)
        finally:
            with self._cond:
                self._handler_threads.discard(threading.current_thread())
                self._cond.notify_all()
                wake = self.max_threads is not None or bool(self._runnable)
                closing = self._closing_server
            if wake:
                self._wake()
            if closing:
                self._release_fds()

    def _threads_alive(self) -> bool:
        return bool(self._handler_threads)

    def _busy(self) -> bool:
        return bool(self._handler_threads) or super()._busy()

    # datagram sessions get a worker thread each while they have work
    def _can_run_pending(self) -> bool:
        return not self._saturated()

    def _session_runnable(self) -> None:
        self._start_workers()

    def _run_pending(self) -> None:
        self._start_workers()

    def _start_workers(self) -> None:
        while True:
            with self._lock:
                if not self._runnable or self._saturated():
                    if self._runnable:
                        self._wake_serve_thread()
                    return
                session = self._runnable.popleft()
            self._spawn(self._drain_session, (session,), f"session {session.peer}")

    def server_close(self) -> None:
        """As the stdlib: stop listening, then (``block_on_close``) join handler threads."""
        super().server_close()
        if self.block_on_close:
            with self._lock:
                threads = list(self._handler_threads)
            for thread in threads:
                thread.join()
        self._release_fds()


class ForkingMixIn(BlockingMixIn, socketserver.ForkingMixIn):
    """Each connection (or datagram) in a forked child process.

    Machines that share memory are refused (each child has its own copy of it), and so,
    on datagram sockets, are machines keeping per-peer state. ``max_children`` (constructor
    keyword or class attribute; default 40, as the stdlib) bounds the children; at the bound
    new connections are *refused* — the machine's ``refusal`` bytes, then close; a datagram
    is dropped and counted in ``datagrams_dropped`` — counted in
    ``stats.close_reasons[REFUSED]``, and a warning is logged once each time the bound is
    reached. The accept loop never stalls (the stdlib's waits in ``waitpid`` while others
    starve unseen). Children are reaped as soon as they exit (each one's pidfd is watched;
    without pidfds, at least every 0.1 s). A child's counters stay in the child.
    """

    max_children = 40
    block_on_close = True
    #: how often children are reaped when pidfds are unavailable
    reap_interval = 0.1

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
        *,
        max_children: int = _UNSET,
        **kwargs: Any,
    ) -> None:
        if max_children is not _UNSET:
            if not isinstance(max_children, int) or max_children < 1:
                raise ValueError(f"max_children must be a positive int, not {max_children!r}")
            self.max_children = max_children
        self.active_children: set[int] | None = None  # type: ignore[assignment]
        self._pidfds: dict[int, int] = {}  # pidfd -> pid
        self._in_child = False
        self._child_cid = 0
        # Children report their counters here when they end (one line each, written
        # atomically: shorter than PIPE_BUF), so server.stats covers every model.
        self._report_r, self._report_w = os.pipe()
        os.set_blocking(self._report_r, False)
        os.set_blocking(self._report_w, False)
        self._report_buf = b""
        try:
            super().__init__(server_address, RequestHandlerClass, bind_and_activate, **kwargs)
        except BaseException:
            self._close_report_pipe()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """Fork a child for the request, or refuse it at ``max_children``."""
        bound = self.max_children
        if not self._handler_mode and not self.is_datagram:
            bound = min(bound, self.limits.max_connections)
        if len(self.active_children or ()) >= bound:
            self.collect_children()
        if len(self.active_children or ()) >= bound:
            self._refuse_at_bound(request, bound)
            return
        cid = self._new_cid()
        pid = os.fork()
        if pid:
            self._child_started(pid)
            self.close_request(request)  # type: ignore[attr-defined]
            return
        self._become_child(cid)
        status = 1
        try:
            if not self._handler_mode and self.is_datagram:
                self._datagram_in_child(request[0], client_address)
            else:
                self.finish_request(request, client_address)
            status = 0
        except Exception:
            self.handle_error(request, client_address)
        finally:
            try:
                self.shutdown_request(request)  # type: ignore[attr-defined]
                if not self._handler_mode:
                    self._report_stats()
                for stream in (sys.stdout, sys.stderr):  # os._exit skips Python's flushing
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            stream.flush()
            finally:
                os._exit(status)

    def _report_stats(self) -> None:
        """In the child: send its counters to the parent (dropped if the pipe is full)."""
        stats = self.stats
        report: dict[str, Any] = {
            "reasons": {reason.name: n for reason, n in stats.close_reasons.items()},
            "dropped": self.datagrams_dropped,
            "unroutable": self.replies_unroutable,
        }
        cls = self.machine_class
        counts = stats._edges.get(cls.spec) if cls is not None else None
        if counts:
            report["edges"] = {i: n for i, n in enumerate(counts) if n}
        line = json.dumps(report, separators=(",", ":")).encode()
        if len(line) >= select.PIPE_BUF:  # keep the write atomic: drop the edge counts
            del report["edges"]
            line = json.dumps(report, separators=(",", ":")).encode()
        try:
            os.write(self._report_w, line + b"\n")
        except OSError:
            pass

    def _read_reports(self) -> None:
        """In the parent: add the counters children reported to ``stats``."""
        chunks = [self._report_buf]
        while True:
            try:
                chunk = os.read(self._report_r, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        *lines, self._report_buf = data.split(b"\n")
        if not lines:
            return
        spec = self.machine_class.spec if self.machine_class is not None else None
        with self._lock:
            for raw in lines:
                report = json.loads(raw)
                for name, n in report["reasons"].items():
                    self.stats.close_reasons[CloseReason[name]] += n
                self.datagrams_dropped += report["dropped"]
                self.replies_unroutable += report["unroutable"]
                if spec is not None and "edges" in report:
                    counts = self.stats.edge_counts(spec)
                    for i, n in report["edges"].items():
                        counts[int(i)] += n

    def _close_report_pipe(self) -> None:
        for fd in (self._report_r, self._report_w):
            if fd >= 0:
                os.close(fd)
        self._report_r = self._report_w = -1

    def _refuse_at_bound(self, request: Any, bound: int) -> None:
        self._bound_warning.hit(
            "%s: %d children busy (max_children); refusing new requests until one exits",
            type(self).__name__,
            bound,
        )
        if self.is_datagram:
            with self._lock:
                self.stats.close_reasons[CloseReason.REFUSED] += 1
                self.datagrams_dropped += 1
            self.shutdown_request(request)  # type: ignore[attr-defined]
        else:
            self._refuse(request)

    def _become_child(self, cid: int) -> None:
        self._in_child = True
        self._child_cid = cid
        self.stats = Stats()  # this child's own counters, reported to the parent at the end
        self.datagrams_dropped = self.replies_unroutable = 0
        os.close(self._report_r)
        self._report_r = -1
        # Locks may have been held by another thread of the parent at fork time.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._dgram_lock = threading.Lock()
        # Without the parent's write end, the drain pipe reads EOF when the parent dies.
        os.close(self._drain_w)
        self._drain_w = -1
        for fd in self._pidfds:
            os.close(fd)
        self._pidfds = {}
        self.active_children = None  # type: ignore[assignment]

    def _new_cid(self) -> int:
        if self._in_child:
            return self._child_cid
        return super()._new_cid()

    def _datagram_in_child(self, data: bytes, address: Any) -> None:
        session = self._new_session(address)
        session.one_shot(data)
        session.local.run_all()
        # Replies the socket could not take: retry until drain_timeout, then drop them.
        deadline = _monotonic() + self.limits.drain_timeout
        idle = select.poll()
        while self._dgram_queue:
            left = deadline - _monotonic()
            if left <= 0:
                self.datagrams_dropped += len(self._dgram_queue)
                break
            idle.poll(_ms(min(left, _DATAGRAM_RETRY)))
            self._flush_datagrams()

    def _child_started(self, pid: int) -> None:
        if self.active_children is None:
            self.active_children = set()
        self.active_children.add(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return
        self._pidfds[pidfd] = pid

    def _child_gone(self, pid: int) -> None:
        with self._cond:
            if self.active_children is not None:
                self.active_children.discard(pid)
            for fd, p in list(self._pidfds.items()):
                if p == pid:
                    del self._pidfds[fd]
                    os.close(fd)
            self._cond.notify_all()

    def _busy(self) -> bool:
        return bool(self.active_children) or super()._busy()

    def wait_idle(self, timeout: float) -> bool:
        """As :meth:`BlockingMixIn.wait_idle`; children count until reaped (by
        ``serve_forever``, or here when it is not running)."""
        deadline = _monotonic() + timeout
        while True:
            if not self._serving:
                self.collect_children()
            left = deadline - _monotonic()
            if super().wait_idle(min(left, self.reap_interval) if left > 0 else 0):
                return True
            if _monotonic() >= deadline:
                return False

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap children that have exited; never waits unless ``blocking`` (server_close
        with ``block_on_close``)."""
        if not self.active_children:
            return
        for pid in list(self.active_children):
            try:
                done, _status = os.waitpid(pid, 0 if blocking else os.WNOHANG)
            except ChildProcessError:
                done = pid
            except OSError:
                continue
            if done:
                self._child_gone(pid)

    def _register_extra(self, poller: select.poll, registered: dict[int, int]) -> None:
        if self._report_r not in registered:
            poller.register(self._report_r, _IN)
            registered[self._report_r] = _IN
        for fd in self._pidfds:
            if fd not in registered:
                poller.register(fd, _IN)
                registered[fd] = _IN

    def _on_extra(self, fd: int, poller: select.poll, registered: dict[int, int]) -> None:
        if fd == self._report_r:
            self._read_reports()
            return
        pid = self._pidfds.get(fd)
        poller.unregister(fd)
        registered.pop(fd, None)
        if pid is None:
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        self._child_gone(pid)

    def _next_deadline(self) -> float | None:
        deadline = super()._next_deadline()
        if self.active_children and len(self._pidfds) < len(self.active_children):
            reap = _monotonic() + self.reap_interval
            if deadline is None or reap < deadline:
                deadline = reap
        return deadline

    def service_actions(self) -> None:
        """Reap exited children (the stdlib's behaviour), without ever blocking."""
        if self.active_children and len(self._pidfds) < len(self.active_children):
            self.collect_children()

    def _release_fds(self) -> None:
        if self._in_child:
            return
        super()._release_fds()

    def server_close(self) -> None:
        """As the stdlib: stop listening, then (``block_on_close``) wait for the children;
        their counters are in ``stats`` afterwards."""
        try:
            super().server_close()
        finally:
            if self._report_r >= 0:
                self._read_reports()
            if not self.active_children:
                self._close_report_pipe()
