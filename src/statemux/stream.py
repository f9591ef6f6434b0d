"""A machine on a stream socket: the part of a connection that knows sockets, not how
readiness is waited for.

:class:`SocketConnection` reads, sends what the kernel takes and buffers the rest, pauses
reading above ``output_high_water``, cuts off a slow consumer beyond ``output_limit``, and
closes: a graceful close delivers every byte (within ``flush_timeout``), shuts down the
sending side and lingers — reading and discarding the peer's input for up to
``linger_timeout`` — so the peer sees the last reply rather than a reset; a close that cut a
reply short resets instead. The multiplexing loop and the blocking driver both subclass it;
they call :meth:`_readable` and :meth:`_writable` when the socket is ready, and may override
:meth:`_interest_changed` (what to wait for changed), :meth:`_draining` and ``_release``.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from .connection import Connection, Host
from .events import CloseReason
from .machine import Machine

__all__ = ["SocketConnection"]

#: SO_LINGER on, zero seconds: close() sends a reset
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
#: reasons that cut a reply short: the peer must get a reset, not a clean end of file
_CUT_SHORT = (CloseReason.SLOW_CONSUMER, CloseReason.ABORTED)
_INET = (socket.AF_INET, socket.AF_INET6)


class SocketConnection(Connection):
    """A machine on one non-blocking stream socket (see the module docstring)."""

    __slots__ = ("sock", "fd", "wbuf", "lingering", "linger_left", "linger_timer")

    def __init__(
        self, host: Host, sock: socket.socket, peer: Any, machine: Machine, cid: int
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.wbuf: bytes | bytearray = b""  # a bytearray only while output is buffered
        self.lingering = False
        self.linger_left = 0
        #: the flush deadline while closing with output buffered, then the linger deadline
        self.linger_timer: Any = None
        super().__init__(host, machine, cid, peer)

    # -- hooks ------------------------------------------------------------------------------------
    def _draining(self) -> bool:
        """True while the server shuts down: closes skip the linger."""
        return False

    # -- readiness (drivers call these) -------------------------------------------------------------
    def _readable(self) -> None:
        try:
            data = self.sock.recv(self.host.limits.read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        if self.lingering:
            self._linger_read(data)
        elif data:
            self.receive(data)
        else:
            self.receive_eof()

    def _writable(self) -> None:
        wbuf = self.wbuf
        before = len(wbuf)
        try:
            n = self.sock.send(wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        del wbuf[:n]  # type: ignore[union-attr]  # buffered output is a bytearray
        if n:
            self.last_active = self.host.time()  # a peer reading slowly is not idle
        after = before - n
        if not after:
            self.wbuf = b""
            self._interest_changed()
            if self.closing is not None:
                self._flushed()
                return
        if before > self.host.limits.output_low_water >= after:
            self.writable_again()

    # -- transport hooks ------------------------------------------------------------------------------
    def _transmit(self, data: bytes) -> None:
        wbuf = self.wbuf
        if not wbuf:  # try the socket first; buffer only what the kernel did not take
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._lost()
                return
            if n == len(data):
                return
            self.wbuf = wbuf = bytearray(memoryview(data)[n:])
            self._interest_changed()
        else:
            wbuf += data  # type: ignore[operator]
        size = len(wbuf)
        limits = self.host.limits
        if size > limits.output_high_water:
            if size > limits.output_limit:
                self.close(CloseReason.SLOW_CONSUMER, abort=True)
            elif self.closing is None:
                self.pause()

    def _buffered(self) -> int:
        return len(self.wbuf)

    def _closing(self, abort: bool) -> None:
        if abort:
            self._cancel_linger_timer()
            dropped = bool(self.wbuf)
            self.wbuf = b""
            if (dropped or self.closing in _CUT_SHORT) and self.sock.family in _INET:
                try:  # close with a reset: the peer must not mistake a cut reply for a whole one
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                except OSError:
                    pass
            self.host.call_soon(self.finish)
        elif not self.wbuf:
            self._flushed()
        else:  # a peer that stops reading now must not hold the connection forever
            self.linger_timer = self.host.call_later(
                self.host.limits.flush_timeout, self._flush_expired
            )
        self._interest_changed()

    def _flush_expired(self) -> None:
        """``flush_timeout`` passed with output still buffered: cut the peer off."""
        self.linger_timer = None
        if not self.closed:
            self.close(CloseReason.SLOW_CONSUMER, abort=True)

    def _cancel_linger_timer(self) -> None:
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None

    def _flushed(self) -> None:
        """Every byte was handed to the kernel: finish, or linger for the peer's EOF."""
        self._cancel_linger_timer()
        if self.eof or self._draining() or self.closing is CloseReason.PEER_CLOSED:
            self.host.call_soon(self.finish)
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.host.call_soon(self.finish)
            return
        limits = self.host.limits
        self.lingering = True
        self.linger_left = limits.linger_bytes
        self.linger_timer = self.host.call_later(limits.linger_timeout, self.finish)
        self._interest_changed()

    def _linger_read(self, data: bytes) -> None:
        self.linger_left -= len(data)
        if not data or self.linger_left <= 0:
            self.finish()

    def _lost(self) -> None:
        """Reset or broken pipe: a normal close, not a traceback."""
        self.wbuf = b""
        self._cancel_linger_timer()
        self.peer_reset()
        self.host.call_soon(self.finish)
        self._interest_changed()

    def begin_drain(self) -> None:
        """The server shuts down: close gracefully; a lingering close is finished at once
        (its reply is delivered; shutdown is not held for the peer's EOF)."""
        if self.closing is None:
            self.close(CloseReason.SHUTDOWN)
        elif self.lingering:
            self.finish()

    def _drop_socket(self) -> None:
        """Drivers' ``_release`` calls this: no timer left, the socket closed."""
        self._cancel_linger_timer()
        try:
            self.sock.close()
        except OSError:
            pass
