"""Drive machines in memory, with a fake clock: no sockets, no threads, no sleeping.

::

    sim = Simulator(Echo)
    client = sim.connect()
    client.send(b"hello\\n")
    assert client.received() == b"hello\\n"
    sim.advance(301)            # fire timers due within 301 fake seconds
    assert client.close_reason is CloseReason.IDLE

The simulator is a host like a server: it has ``limits``, a ``hub`` shared by its connections,
``stats`` and an optional ``tracer``. Timers are exact (the multiplexing server sweeps idle
and state timeouts instead), and ``flush_timeout``/``linger_timeout`` are not simulated: a
closing connection ends when its peer has read everything. A handler exception is recorded in ``sim.errors``
(``(connection, exception)``) instead of being logged. Every queued callback (hub messages,
resumed frames, ``Drained``) runs before ``send``/``advance`` return.

:func:`chunkings` yields a byte string whole, byte by byte, and split at every point, for
tests that feed parsers every way the network may cut their input.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from .connection import Connection, Stats, Tracer
from .events import CloseReason
from .hub import Hub
from .limits import Limits
from .machine import Machine
from .timers import TimerQueue

__all__ = [
    "FakeClock",
    "Simulator",
    "SimConnection",
    "chunkings",
    "random_chunkings",
    "transcript",
    "serving",
]


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class SimConnection(Connection):
    """One simulated connection; the test plays the peer."""

    __slots__ = ("_received", "_window", "_backlog", "_closed_by_server", "aborted", "sim")

    def __init__(self, sim: Simulator, machine: Machine, cid: int, peer: Any) -> None:
        self.sim = sim
        self._received = bytearray()
        self._window: int | None = None
        self._backlog = bytearray()
        self._closed_by_server = False
        self.aborted = False
        super().__init__(sim, machine, cid, peer)

    # -- the peer's side ------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """The peer sends bytes (they are handled before this returns)."""
        if self.closed:
            raise ConnectionResetError("connection is closed")
        if data:
            self.receive(data)
        self.sim.run_ready()

    def send_datagram(self, data: bytes) -> None:
        """The peer sends one datagram (handled before this returns)."""
        if self.closed:
            raise ConnectionResetError("session is closed")
        self.receive_datagram(data)
        self.sim.run_ready()

    def send_eof(self) -> None:
        """The peer shuts down its sending side."""
        self.receive_eof()
        self.sim.run_ready()

    def received(self) -> bytes:
        """Everything the server delivered since the last call."""
        data = bytes(self._received)
        self._received.clear()
        return data

    def stop_reading(self, window: int = 0) -> None:
        """The peer stops reading: at most ``window`` more bytes are delivered."""
        self._window = window

    def resume_reading(self) -> None:
        self._window = None
        self._deliver_backlog()
        self.sim.run_ready()

    @property
    def state_name(self) -> str:
        return self.state.name

    @property
    def close_reason(self) -> CloseReason | None:
        return self.closing if self.closed else None

    @property
    def buffered(self) -> int:
        return len(self._backlog)

    # -- transport hooks ---------------------------------------------------------------------------
    def _transmit(self, data: bytes) -> None:
        self._backlog += data
        self._deliver_backlog(transmitting=True)

    def _deliver_backlog(self, transmitting: bool = False) -> None:
        before = len(self._backlog)
        if self._window is None:
            self._received += self._backlog
            self._backlog.clear()
        elif self._window > 0:
            n = min(self._window, len(self._backlog))
            self._received += self._backlog[:n]
            del self._backlog[:n]
            self._window -= n
        after = len(self._backlog)
        limits = self.host.limits
        if after > limits.output_limit and not self.closed:
            self.close(CloseReason.SLOW_CONSUMER, abort=True)
            return
        if self.closing is not None:
            if not self._backlog and not self.closed:
                self.sim.call_soon(self.finish)
            return
        if after > limits.output_high_water:
            self.pause()
        elif transmitting:
            pass  # like a kernel taking a send at once: no Drained from inside a send
        elif before > limits.output_low_water >= after or (
            self.paused and after <= limits.output_low_water
        ):
            self.sim.call_soon(self.writable_again)

    def _buffered(self) -> int:
        return len(self._backlog)

    def _closing(self, abort: bool) -> None:
        if abort:
            self.aborted = True
            self._backlog.clear()
        if not self._backlog:
            self.sim.call_soon(self.finish)

    def _release(self) -> None:
        self.sim.connections.remove(self)


class Simulator:
    """An in-memory host for machines (see module docstring)."""

    def __init__(
        self,
        factory: Callable[[], Machine],
        *,
        limits: Limits | None = None,
        tracer: Tracer | None = None,
        clock: FakeClock | None = None,
        hub: Hub | None = None,
        raise_errors: bool = False,
        **limit_overrides: Any,
    ) -> None:
        self.factory = factory
        self.limits = (limits or Limits()).evolve(**limit_overrides)
        self.tracer = tracer
        self.clock = clock or FakeClock()
        self.hub = hub or Hub()
        self.stats = Stats()
        self.timers = TimerQueue()
        self.ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.connections: list[SimConnection] = []
        self.errors: list[tuple[Connection, BaseException]] = []
        self.raise_errors = raise_errors
        self._next_id = 1

    # -- host interface ------------------------------------------------------------------------
    def time(self) -> float:
        return self.clock.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Any:
        return self.timers.add(self.clock.now + delay, callback, *args)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.ready.append((callback, args))

    def report_error(self, conn: Connection) -> None:
        exc = sys.exc_info()[1]
        assert exc is not None
        self.errors.append((conn, exc))
        if self.raise_errors:
            raise exc

    # -- test API ------------------------------------------------------------------------------
    def connect(self, peer: Any = ("127.0.0.1", 40000)) -> SimConnection:
        """Open a connection to a new machine from the factory."""
        cid = self._next_id
        self._next_id += 1
        conn = SimConnection(self, self.factory(), cid, peer)
        self.connections.append(conn)
        conn.start()
        self.run_ready()
        return conn

    def run_ready(self) -> None:
        """Run queued callbacks until none is left."""
        ready = self.ready
        for _ in range(1_000_000):
            if not ready:
                return
            callback, args = ready.popleft()
            callback(*args)
        raise RuntimeError("callbacks keep scheduling callbacks")

    def advance(self, seconds: float) -> None:
        """Move the fake clock forward, firing due timers in deadline order."""
        target = self.clock.now + seconds
        while True:
            deadline = self.timers.next_deadline()
            if deadline is None or deadline > target:
                break
            self.clock.now = max(self.clock.now, deadline)
            for timer in self.timers.pop_due(self.clock.now):
                timer.callback(*timer.args)
                self.run_ready()
        self.clock.now = target
        self.run_ready()


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    """``data`` whole, byte by byte, then split in two at every point."""
    yield [data]
    if len(data) > 1:
        yield [data[i : i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def random_chunkings(data: bytes, count: int = 20, seed: int = 0) -> Iterator[list[bytes]]:
    """``count`` random cuttings of ``data`` (deterministic for a seed)."""
    rng = random.Random(seed)
    for _ in range(count):
        cuts = (
            sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(1, 8))))
            if len(data) > 1
            else []
        )
        bounds = [0, *cuts, len(data)]
        yield [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def transcript(
    factory: Callable[[], Machine], chunks: list[bytes], *, eof: bool = False, **kw: Any
) -> tuple[bytes, SimConnection]:
    """Feed ``chunks`` to a fresh connection; return everything it replied and the connection."""
    sim = Simulator(factory, **kw)
    conn = sim.connect()
    out = bytearray(conn.received())
    for chunk in chunks:
        if conn.closed:
            break
        conn.send(chunk)
        out += conn.received()
    if eof and not conn.closed:
        conn.send_eof()
        out += conn.received()
    return bytes(out), conn


@contextlib.contextmanager
def serving(server: Any, poll_interval: float = 0.5, timeout: float = 10.0) -> Iterator[Any]:
    """Run ``server.serve_forever`` in a thread; yield its address; shut down and close after.

    Waits (bounded by ``timeout``) until the loop is running before yielding.
    """
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True)
    try:
        loop = server._ensure_loop() if hasattr(server, "_ensure_loop") else None
        thread.start()
        if loop is not None and not loop.started.wait(timeout):
            raise RuntimeError("the server's loop did not start")
        yield server.server_address
    finally:
        server.shutdown()
        thread.join(timeout)
        server.server_close()
