"""Framing: how a state cuts complete frames out of the bytes received.

A framing is a small object with a limit. The runner asks the *current* state's framing for the
next frame before every frame, so a handler that changes state (say, from reading a header line
to reading an exact-size body) changes how the very next buffered bytes are cut.

Extension point
---------------
A machine may bring its own cutter: subclass :class:`Framing` and implement ``cut``. It receives
the connection's :class:`ReceiveBuffer` and the machine, and returns the next frame (any object
but ``None``), or ``None`` when more bytes are needed. It raises :class:`FrameTooLong` when a
limit is passed, :class:`ProtocolError` on malformed input. To stay O(bytes received) when data
trickles in, it records in ``buffer.scan`` how far it already searched; the runner resets
``scan`` to 0 whenever bytes are consumed with ``buffer.take``/``buffer.skip``.
"""

from __future__ import annotations

from typing import Any

from .events import FrameTooLong, ProtocolError

__all__ = [
    "ReceiveBuffer",
    "Framing",
    "Line",
    "Exact",
    "Raw",
    "Datagram",
    "TruncatedDatagram",
    "DEFAULT_MAX_LINE",
]

DEFAULT_MAX_LINE = 64 * 1024


class ReceiveBuffer:
    """Bytes received but not yet cut into frames.

    ``data`` is a bytearray (deleting from its front is cheap in CPython) whenever it holds
    bytes — an empty buffer may be ``b""``, and framings are not asked to cut one (unless they
    set ``cuts_empty``); ``scan`` is how far a
    framing has already searched without finding the end of a frame; ``skipping`` is set by
    :class:`Line` while it discards the rest of an over-long line.
    """

    __slots__ = ("data", "scan", "skipping")

    def __init__(self) -> None:
        self.data = bytearray()
        self.scan = 0
        self.skipping = False

    def __len__(self) -> int:
        return len(self.data)

    def take(self, n: int, skip: int = 0) -> bytes:
        """Remove and return the first ``n`` bytes, then discard ``skip`` more (a delimiter)."""
        data = self.data
        frame = bytes(data[:n])
        if n or skip:
            del data[: n + skip]
        self.scan = 0
        return frame

    def skip(self, n: int) -> None:
        """Discard the first ``n`` bytes."""
        del self.data[:n]
        self.scan = 0


class TruncatedDatagram(bytes):
    """A datagram the kernel cut to the receive buffer (``MSG_TRUNC``): always too long."""

    __slots__ = ()


class Framing:
    """Base class of frame cutters. Subclasses implement :meth:`cut`.

    ``max_size`` is the largest frame the framing accepts; ``describe()`` is shown in diagrams.
    """

    max_size: int = DEFAULT_MAX_LINE
    #: whether ``cut`` can return a frame from an empty buffer (``Exact`` with n = 0 can);
    #: when False the runner skips the call while nothing is buffered
    cuts_empty: bool = False

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> Any:
        """Return the next complete frame, or ``None`` if more bytes are needed."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class Line(Framing):
    """One line, without its delimiter. Longer than ``max_length`` → :class:`FrameTooLong`.

    ``max_length`` is an int, or the name of a machine attribute holding it (so a limit can
    be set per server through the machine factory). A complete over-long line is removed
    from the buffer before the error, so the lines after it are still handled if the
    machine stays; an unfinished one leaves the runner to discard what is buffered.
    """

    __slots__ = ("delimiter", "max_length", "strip_cr")

    def __init__(
        self,
        max_length: int | str = DEFAULT_MAX_LINE,
        delimiter: bytes = b"\n",
        *,
        strip_cr: bool = False,
    ) -> None:
        if not delimiter:
            raise ValueError("Line delimiter must not be empty")
        if isinstance(max_length, int) and max_length < 1:
            raise ValueError("Line max_length must be positive")
        self.delimiter = delimiter
        self.max_length = max_length
        self.strip_cr = strip_cr

    @property
    def max_size(self) -> int:  # type: ignore[override]
        return self.max_length if isinstance(self.max_length, int) else DEFAULT_MAX_LINE

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> bytes | None:
        data = buffer.data
        delim = self.delimiter
        limit = self.max_length
        if limit.__class__ is not int:
            limit = getattr(machine, limit)  # type: ignore[arg-type]
        if buffer.skipping and not self._skip(buffer):
            return None
        i = data.find(delim, buffer.scan)
        if i < 0:
            n = len(data)
            # a partial delimiter (and a CR to strip) may end the buffer of a line that fits
            if n > limit + len(delim) - 1 + self.strip_cr:
                # Unfinished and already too long: drop it, and the rest of it as it comes.
                keep = len(delim) - 1
                del data[: n - keep]
                buffer.scan = 0
                buffer.skipping = True
                raise FrameTooLong("line", limit, n, consumed=True)
            buffer.scan = n - len(delim) + 1 if n >= len(delim) else 0
            return None
        end = i
        if self.strip_cr and end and data[end - 1] == 13:
            end -= 1
        if end > limit:
            del data[: i + len(delim)]
            buffer.scan = 0
            raise FrameTooLong("line", limit, end, consumed=True)
        frame = bytes(data[:end])
        del data[: i + len(delim)]
        buffer.scan = 0
        return frame

    def _skip(self, buffer: ReceiveBuffer) -> bool:
        """Discard up to and including the next delimiter; False if it hasn't come yet."""
        data = buffer.data
        delim = self.delimiter
        i = data.find(delim, buffer.scan)
        if i < 0:
            keep = len(delim) - 1
            if len(data) > keep:
                del data[: len(data) - keep]
            buffer.scan = 0
            return False
        del data[: i + len(delim)]
        buffer.scan = 0
        buffer.skipping = False
        return True

    def describe(self) -> str:
        return (
            f"line ≤ {self.max_length} B"
            if isinstance(self.max_length, int)
            else f"line ≤ {self.max_length}"
        )


class Exact(Framing):
    """Exactly ``n`` bytes. ``n`` is an int, or the name of a machine attribute that the
    previous handler set (e.g. a length prefix). ``n`` above ``max_size`` → FrameTooLong."""

    __slots__ = ("n", "max_size")
    cuts_empty = True

    def __init__(self, n: int | str, max_size: int = 1024 * 1024) -> None:
        self.n = n
        self.max_size = max_size

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> bytes | None:
        n = self.n if isinstance(self.n, int) else getattr(machine, self.n)
        if n < 0:
            raise ProtocolError(f"negative frame size {n}")
        if n > self.max_size:
            raise FrameTooLong("frame", self.max_size, n)
        if len(buffer.data) < n:
            return None
        return buffer.take(n)

    def describe(self) -> str:
        return f"exactly {self.n} B (≤ {self.max_size})"


class Raw(Framing):
    """Whatever bytes have arrived, at most ``max_size`` at a time."""

    __slots__ = ("max_size",)

    def __init__(self, max_size: int = 256 * 1024) -> None:
        self.max_size = max_size

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> bytes | None:
        data = buffer.data
        if not data:
            return None
        if len(data) <= self.max_size:
            frame = bytes(data)
            data.clear()
            buffer.scan = 0
            return frame
        return buffer.take(self.max_size)

    def describe(self) -> str:
        return "raw bytes"


class Datagram(Framing):
    """One whole datagram. Larger than ``max_size`` → FrameTooLong (never truncated silently).

    Used by datagram servers; on a stream it behaves like :class:`Raw`.
    """

    __slots__ = ("max_size",)

    def __init__(self, max_size: int = 65507) -> None:
        self.max_size = max_size

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> bytes | None:
        data = buffer.data
        if not data:
            return None
        if len(data) > self.max_size:
            raise FrameTooLong("datagram", self.max_size, len(data))
        frame = bytes(data)
        data.clear()
        buffer.scan = 0
        return frame

    def describe(self) -> str:
        return f"datagram ≤ {self.max_size} B"
