"""The multiplexing model: ``MultiplexingMixIn`` and the connections it keeps in its table.

``MultiplexingMixIn`` is the sibling of the stdlib's ``ThreadingMixIn`` and ``ForkingMixIn``:
mixed into ``TCPServer``/``UnixStreamServer`` (or ``UDPServer``/``UnixDatagramServer``) it
serves every connection from one :class:`~statemux.loop.Loop` thread, each connection being a
machine in the server's table ``{fd: connection}``.

Output: a send tries the socket first and buffers only what the kernel did not take; write
interest is registered only while bytes remain. Above ``output_high_water`` buffered bytes the
connection is not read until it falls to ``output_low_water``; beyond ``output_limit`` it is
closed as a slow consumer. A graceful close delivers every byte, shuts down the sending side,
and reads and discards the peer's input for up to ``linger_timeout`` so the peer sees the last
reply rather than a reset.
"""

from __future__ import annotations

import errno
import selectors
import socket
import sys
import time
from collections import deque
from typing import Any

from .connection import Connection, Tracer
from .events import CloseReason
from .framing import TruncatedDatagram
from .host import ConnectionInfo, MachineHostMixIn, datagram_bufsize, is_handler_class, log
from .hub import Hub
from .loop import Loop
from .machine import Machine
from .sockets import pop_socket_options
from .stream import SocketConnection

__all__ = ["MultiplexingMixIn", "StreamConnection", "DatagramSession"]

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
_ACCEPT_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BLOCKING_MODELS = (
    "TCPServer, UDPServer, UnixStreamServer, UnixDatagramServer and their Threading*/Forking* "
    "variants"
)


class StreamConnection(SocketConnection):
    """A machine on a non-blocking stream socket, driven by the loop."""

    __slots__ = ("mask",)

    def __init__(
        self, server: MultiplexingMixIn, sock: socket.socket, peer: Any, machine: Machine, cid: int
    ) -> None:
        self.mask = 0
        super().__init__(server, sock, peer, machine, cid)

    @property
    def server(self) -> MultiplexingMixIn:
        return self.host  # type: ignore[return-value]

    def __call__(self, mask: int) -> None:
        """The poller's callback (the connection itself is registered: no bound method is
        kept per connection)."""
        if mask & EVENT_READ:
            self._readable()
        if mask & EVENT_WRITE and self.wbuf and not self.closed:
            self._writable()

    def _draining(self) -> bool:
        return self.host._draining  # type: ignore[attr-defined,no-any-return]

    def _interest_changed(self) -> None:
        """Watch for what the connection waits for: input, room to send, both, or nothing."""
        if self.closed:
            return
        want = 0
        if self.lingering or self.wants_input:
            want = EVENT_READ
        if self.wbuf:
            want |= EVENT_WRITE
        if want == self.mask:
            return
        selector = self.host.loop.selector  # type: ignore[attr-defined]
        if not want:
            selector.unregister(self.fd)
        elif not self.mask:
            selector.register(self.fd, want, self)
        else:
            selector.modify(self.fd, want, self)
        self.mask = want

    def _release(self) -> None:
        if self.mask:
            try:
                self.host.loop.selector.unregister(self.fd)  # type: ignore[attr-defined]
            except (KeyError, ValueError):
                pass
            self.mask = 0
        self.server._forget(self)
        self._drop_socket()


class DatagramSession(Connection):
    """A machine per peer address on a datagram socket."""

    __slots__ = ("sock",)
    joins_output = False  # each send() is one datagram

    def __init__(
        self, server: MultiplexingMixIn, sock: socket.socket, peer: Any, machine: Machine, cid: int
    ) -> None:
        self.sock = sock
        super().__init__(server, machine, cid, peer)

    @property
    def server(self) -> MultiplexingMixIn:
        return self.host  # type: ignore[return-value]

    def _transmit(self, data: bytes) -> None:
        self.server._send_datagram(data, self.peer)

    def idle_limit(self) -> float | None:
        return self.server.limits.session_timeout

    def _closing(self, abort: bool) -> None:
        self.server.loop.call_soon(self.finish)

    def _release(self) -> None:
        self.server._forget(self)


class MultiplexingMixIn(MachineHostMixIn):
    """Serve every connection from one selectors loop (mix in before a stdlib server class).

    Constructor: ``(server_address, factory, bind_and_activate=True, *, loop=None,
    tracer=None, hub=None, **limits)``. ``factory`` is any zero-argument callable returning a
    :class:`~statemux.machine.Machine` (a machine class, or ``functools.partial`` of one); it
    is kept as ``RequestHandlerClass``, as ``socketserver`` keeps a handler class.

    Callers may use the whole ``BaseServer`` interface. Subclasses may override, as in
    ``socketserver``: ``verify_request``, ``process_request``, ``finish_request``,
    ``handle_error``, ``handle_timeout``, ``service_actions``, ``server_bind``,
    ``server_activate``.
    """

    allow_reuse_address = True
    request_queue_size = socket.SOMAXCONN
    #: idle connections and state timeouts are found by sweeping the table (``_sweep``), not
    #: by a timer per connection: a timer costs ~200 bytes, and 10,000 idle connections are
    #: the norm; a timeout then fires within an eighth of itself (at most 5 s) of its due time
    sweeps_timeouts = True
    #: how many datagrams are read per readiness event of a datagram socket
    datagrams_per_event = 64

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
        *,
        loop: Loop | None = None,
        tracer: Tracer | None = None,
        hub: Hub | None = None,
        **limits: Any,
    ) -> None:
        if is_handler_class(RequestHandlerClass):
            raise TypeError(
                f"{type(self).__name__} runs statemux machines, and {RequestHandlerClass.__qualname__} "
                f"is a blocking socketserver handler; serve it with {_BLOCKING_MODELS}"
            )
        if not callable(RequestHandlerClass):
            raise TypeError(f"the machine factory must be callable, not {RequestHandlerClass!r}")
        socket_options = pop_socket_options(limits)  # socket=, fileno=, dual_stack=, socket_mode=
        self._init_host(RequestHandlerClass, tracer, hub, limits)
        self.loop: Loop | None = None
        self._owns_loop = False
        self._table: dict[Any, Connection] = {}
        self._draining = False
        self._accepting = False
        self._accept_paused = False
        self._accept_timer: Any = None
        self._idle_sweeper: Any = None
        self._shortest_timeout = float("inf")
        #: replies the socket could not take, per peer (order is kept per peer only, so one
        #: peer that stops reading holds up no one else); retried on a timer, not on write
        #: readiness: a Unix datagram socket polls writable while a peer's queue is full
        self._dgram_queues: dict[Any, deque[bytes]] = {}
        self._dgram_queued = 0
        self._dgram_retry: Any = None
        self._bufsize: int | None = None
        self._accept_warned = float("-inf")
        self._dgram_drop_logged = float("-inf")
        self.datagrams_dropped = 0
        self.replies_unroutable = 0
        super().__init__(server_address, RequestHandlerClass, bind_and_activate, **socket_options)  # type: ignore[call-arg]
        if loop is not None:
            loop.add(self)

    # -- stream or datagram ---------------------------------------------------------------------
    @property
    def is_datagram(self) -> bool:
        return self.socket_type == socket.SOCK_DGRAM  # type: ignore[attr-defined]

    def server_activate(self) -> None:
        """Listen with ``request_queue_size`` (``SOMAXCONN``) on a stream socket; the
        socket is non-blocking either way."""
        if not self.is_datagram:
            super().server_activate()  # type: ignore[misc]
        self.socket.setblocking(False)  # type: ignore[attr-defined]

    # -- attachment to a loop ---------------------------------------------------------------------
    def _attach(self, loop: Loop) -> None:
        if self.loop is not None and self.loop is not loop:
            raise RuntimeError(f"{self!r} is already hosted by another loop")
        self.loop = loop
        self.call_later = loop.call_later
        self.call_soon = loop.call_soon
        self._draining = False
        self._start_accepting()
        self._schedule_idle_sweep()

    def _detach(self) -> None:
        self._stop_accepting()
        if self._dgram_retry is not None:
            self._dgram_retry.cancel()
            self._dgram_retry = None
        self.datagrams_dropped += self._dgram_queued  # never sent: counted, not silently lost
        self._dgram_queues.clear()
        self._dgram_queued = 0
        if self._idle_sweeper is not None:
            self._idle_sweeper.cancel()
            self._idle_sweeper = None
        if self._accept_timer is not None:
            self._accept_timer.cancel()
            self._accept_timer = None

    def _ensure_loop(self) -> Loop:
        if self.loop is None:
            loop = Loop()
            self._owns_loop = True
            loop.add(self)
        assert self.loop is not None
        if not self._accepting and not self._accept_paused and not self._draining:
            self._start_accepting()
        return self.loop

    def _start_accepting(self) -> None:
        if self._accepting or self.loop is None:
            return
        callback = self._on_datagrams if self.is_datagram else self._on_accept
        self.loop.selector.register(self.socket.fileno(), EVENT_READ, callback)  # type: ignore[attr-defined]
        self._accepting = True

    def _stop_accepting(self) -> None:
        if self._accepting and self.loop is not None:
            try:
                self.loop.selector.unregister(self.socket.fileno())  # type: ignore[attr-defined]
            except (KeyError, ValueError):
                pass
        self._accepting = False

    def _resume_serving(self) -> None:
        """The loop starts (again): accept, unless descriptors are short."""
        self._draining = False
        if not self._accept_paused:
            self._start_accepting()

    def _idle_limit(self) -> float | None:
        return self.limits.session_timeout if self.is_datagram else self.limits.idle_timeout

    def note_timeout(self, timeout: float) -> None:
        """A connection entered a state with this timeout: sweep fast enough for it."""
        if timeout < self._shortest_timeout:
            self._shortest_timeout = timeout
            self._schedule_idle_sweep()

    def _sweep_interval(self) -> float | None:
        """An eighth of the shortest of the idle limit and the state timeouts seen, between
        10 ms and 5 s (None: nothing to sweep for)."""
        limits = [self._idle_limit(), self._shortest_timeout]
        cls = self.machine_class
        if cls is not None:
            limits += [st.timeout for st in cls.spec.states.values()]
        present = [x for x in limits if x is not None and x != float("inf")]
        if not present:
            return None
        return min(max(min(present) / 8, 0.01), 5.0)

    def _schedule_idle_sweep(self) -> None:
        if self._idle_sweeper is not None:
            self._idle_sweeper.cancel()
            self._idle_sweeper = None
        interval = self._sweep_interval()
        if interval is None or self.loop is None:
            return
        self._idle_sweeper = self.loop.call_later_quiet(interval, self._sweep)

    def _sweep(self) -> None:
        """Close idle connections; deliver due state timeouts."""
        self._idle_sweeper = None
        now = self.time()
        limit = self._idle_limit()
        idle_before = now - limit if limit is not None else float("-inf")
        for conn in list(self._table.values()):
            if conn.closing is not None:
                continue
            due = conn.state_deadline
            # A due state timeout first: its handler may reply or move on (and so not be
            # idle any more) rather than be pre-empted by the idle close.
            if due is not None and due <= now:
                conn._state_timed_out(conn.state)
                if conn.closing is not None:
                    continue
            if conn.last_active <= idle_before:
                conn.close(CloseReason.IDLE)
        self._schedule_idle_sweep()

    # -- BaseServer interface ------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float | None = 0.5) -> None:
        """Serve until :meth:`shutdown`; ``service_actions()`` runs at least every
        ``poll_interval`` seconds, and timers wake the loop earlier when due."""
        self._ensure_loop().run(poll_interval)

    def shutdown(self) -> None:
        """Stop the loop serving this server and wait until it has exited (it first drains
        connections for up to ``drain_timeout``). Returns at once when no loop is running.
        A loop hosting several servers stops them all."""
        if self.loop is not None:
            self.loop.shutdown()

    def handle_request(self) -> None:
        """Wait up to ``timeout`` (forever if None) for something to happen — a ready socket,
        a due timer — and handle all of it; call ``handle_timeout()`` if nothing did. The
        server's own housekeeping (table sweeps, retries) runs meanwhile but does not count."""
        timeout = self.timeout  # type: ignore[attr-defined]
        loop = self._ensure_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if loop.run_once(remaining):
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.handle_timeout()  # type: ignore[attr-defined]
                return

    def server_close(self) -> None:
        """Close every connection at once (reason SHUTDOWN), stop listening, close the socket."""
        for conn in list(self._table.values()):
            conn.close(CloseReason.SHUTDOWN, abort=True)
            conn.finish()
        self._table.clear()
        loop = self.loop
        if loop is not None:
            loop.remove(self)
            self.loop = None
            if self._owns_loop and not loop.running:
                loop.close()
        super().server_close()  # type: ignore[misc]

    def fileno(self) -> int:
        return self.socket.fileno()  # type: ignore[attr-defined,no-any-return]

    def service_actions(self) -> None:
        """Called by the loop every pass; override to do periodic work."""

    # -- accepting --------------------------------------------------------------------------------
    def _on_accept(self, mask: int) -> None:
        for _ in range(self.limits.accepts_per_event):
            try:
                request, client_address = self.get_request()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_EXHAUSTED:
                    self._pause_accepting(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                if exc.errno == errno.EINVAL:  # the listener was shut down (a draining worker)
                    self._stop_accepting()
                    return
                log.error("accept failed on %s: %s", self.server_address, exc)  # type: ignore[attr-defined]
                return
            self._serve_request(request, client_address)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors: stop watching the listener (so the loop doesn't spin on a
        socket it cannot accept from) until a connection closes or the retry delay passes."""
        if self._accept_paused:
            return
        now = self.time()
        if now - self._accept_warned >= 60.0:  # once a minute, not once per closed connection
            self._accept_warned = now
            log.warning(
                "accept failed on %s: %s; pausing accepts for up to %gs",
                self.server_address,  # type: ignore[attr-defined]
                exc.strerror,
                self.limits.accept_retry_delay,
            )
        self._accept_paused = True
        self._stop_accepting()
        assert self.loop is not None
        self._accept_timer = self.loop.call_later_quiet(
            self.limits.accept_retry_delay, self._resume_accepting
        )

    def _resume_accepting(self) -> None:
        if self._accept_timer is not None:
            self._accept_timer.cancel()
            self._accept_timer = None
        if self._accept_paused:
            self._accept_paused = False
            if not self._draining:
                self._start_accepting()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Add the accepted socket to the table as a new connection (non-blocking)."""
        self.finish_request(request, client_address)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        """Create the machine and its connection; refuse past ``max_connections``."""
        if len(self._table) >= self.limits.max_connections:
            self._refuse(request)
            return
        request.setblocking(False)
        if request.family in (socket.AF_INET, socket.AF_INET6):
            try:
                request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # the client already hung up (EINVAL on some systems)
                pass
            # Every accept makes a new host string; share one per distinct host.
            client_address = (sys.intern(client_address[0]), *client_address[1:])
        machine = self._new_machine()
        conn = StreamConnection(self, request, client_address, machine, self._new_cid())
        self._table[conn.fd] = conn
        try:
            conn._interest_changed()
            conn.start()
        except BaseException:
            # nothing of it may stay behind: its fd number will be reused by the next client
            conn.close(CloseReason.HANDLER_ERROR, abort=True)
            conn.finish()
            raise

    def _new_machine(self) -> Machine:
        learning = self.machine_class is None
        machine = self.make_machine()
        if learning:  # the factory's class is known now: its state timeouts set the sweep pace
            self._schedule_idle_sweep()
        return machine

    def _refuse(self, request: socket.socket) -> None:
        self.stats.close_reasons[CloseReason.REFUSED] += 1
        refusal = getattr(self.machine_class, "refusal", None)
        if refusal:
            try:
                request.setblocking(False)
                request.send(refusal)
            except OSError:
                pass
        self.shutdown_request(request)  # type: ignore[attr-defined]

    def _forget(self, conn: Connection) -> None:
        key = conn.fd if isinstance(conn, StreamConnection) else conn.peer
        if self._table.get(key) is conn:
            del self._table[key]
        if self._accept_paused:
            self._resume_accepting()

    # -- datagrams ----------------------------------------------------------------------------------
    def _on_datagrams(self, mask: int) -> None:
        sock = self.socket  # type: ignore[attr-defined]
        for _ in range(self.datagrams_per_event):
            try:  # (the size is asked each time: the first datagram may teach the class)
                data, _anc, flags, address = sock.recvmsg(self._datagram_bufsize())
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP port unreachable reported on UDP
                log.debug("recvmsg on %s: %s", self.server_address, exc)  # type: ignore[attr-defined]
                continue
            if flags & socket.MSG_TRUNC:  # cut by the kernel: too long, never passed as whole
                data = TruncatedDatagram(data)
            if not self.verify_request((data, sock), address):  # type: ignore[attr-defined]
                self.stats.close_reasons[CloseReason.REFUSED] += 1
                continue
            try:
                self._datagram(data, address)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception:
                self.handle_error((data, sock), address)

    def _datagram_bufsize(self) -> int:
        cls = self.machine_class
        if cls is None:
            return 65536
        if self._bufsize is None:
            self._bufsize = datagram_bufsize(cls)
        return self._bufsize

    def _datagram(self, data: bytes, address: Any) -> None:
        if not address:  # an unbound Unix datagram peer: no session, no reply possible
            machine = self._new_machine()
            conn = DatagramSession(self, self.socket, None, machine, self._new_cid())  # type: ignore[attr-defined]
            conn.start()
            conn.receive_datagram(data)
            if conn.closing is None:
                conn.close(CloseReason.NORMAL)
            return
        conn = self._table.get(address)
        if conn is None or conn.closing is not None:
            # A session that is closing (its teardown runs at the end of the pass) must not
            # swallow the peer's next datagram: that one starts a new session.
            if len(self._table) >= self.limits.max_connections:
                self.stats.close_reasons[CloseReason.REFUSED] += 1
                return
            machine = self._new_machine()
            conn = DatagramSession(self, self.socket, address, machine, self._new_cid())  # type: ignore[attr-defined]
            self._table[address] = conn
            conn.start()
        conn.receive_datagram(data)

    #: seconds between retries of replies a peer could not take yet
    datagram_retry_interval = 0.01

    def _send_datagram(self, data: bytes, address: Any) -> None:
        if not address:
            self.replies_unroutable += 1
            log.warning(
                "reply of %d bytes dropped: the peer sent from an unbound socket", len(data)
            )
            return
        queue = self._dgram_queues.get(address)
        if queue:
            self._queue_datagram(data, address)
            return
        try:
            self.socket.sendto(data, address)  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            self._queue_datagram(data, address)
        except OSError as exc:
            self.datagrams_dropped += 1
            log.warning("reply to %s dropped: %s", address, exc)

    def _queue_datagram(self, data: bytes, address: Any) -> None:
        if self._dgram_queued >= self.limits.datagram_queue:
            self.datagrams_dropped += 1
            now = self.time()
            if now - self._dgram_drop_logged >= 60.0:  # say it, but not once per datagram
                self._dgram_drop_logged = now
                log.warning(
                    "datagram_queue (%d) full: reply to %s dropped (%d dropped so far)",
                    self.limits.datagram_queue,
                    address,
                    self.datagrams_dropped,
                )
            return
        self._dgram_queues.setdefault(address, deque()).append(data)
        self._dgram_queued += 1
        if self._dgram_retry is None and self.loop is not None:
            self._dgram_retry = self.loop.call_later_quiet(
                self.datagram_retry_interval, self._flush_datagrams
            )

    def _flush_datagrams(self) -> None:
        self._dgram_retry = None
        sock = self.socket  # type: ignore[attr-defined]
        for address, queue in list(self._dgram_queues.items()):
            while queue:
                try:
                    sock.sendto(queue[0], address)
                except (BlockingIOError, InterruptedError):
                    break  # this peer is still full; the others go on
                except OSError:
                    self.datagrams_dropped += 1
                queue.popleft()
                self._dgram_queued -= 1
            if not queue:
                del self._dgram_queues[address]
        if self._dgram_queues and self.loop is not None:
            self._dgram_retry = self.loop.call_later_quiet(
                self.datagram_retry_interval, self._flush_datagrams
            )

    # -- drain and introspection ----------------------------------------------------------------------
    def _begin_drain(self) -> None:
        self._draining = True
        self._stop_accepting()
        for conn in list(self._table.values()):
            if isinstance(conn, StreamConnection):
                conn.begin_drain()
            elif conn.closing is None:
                conn.close(CloseReason.SHUTDOWN)

    def _end_drain(self) -> None:
        self._draining = False

    @property
    def connections(self) -> list[ConnectionInfo]:
        """A snapshot of the table: peer, state, age, bytes in/out, bytes buffered."""
        return self._snapshot(self._table.values())
