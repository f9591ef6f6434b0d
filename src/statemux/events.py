"""Events a machine receives, errors it may raise, and the reasons a connection closes.

Handlers are attached to an event *type* (``@state.on(Frame, to=...)``). A ``Frame`` handler
receives the frame itself (bytes, or whatever the state's framing cuts); every other handler
receives an instance of its event type.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "Opened",
    "Frame",
    "PeerClosed",
    "TimedOut",
    "TimerFired",
    "Message",
    "Drained",
    "FrameTooLong",
    "ProtocolError",
    "CloseReason",
    "UndeclaredTransition",
    "OPENED",
    "DRAINED",
]


@attrs.frozen
class Opened:
    """The connection (or datagram session) was accepted; delivered once, first."""


class Frame:
    """Marker type: a complete frame cut by the current state's framing.

    A ``Frame`` handler is called with the frame itself, not with an instance of this class.
    """


@attrs.frozen
class PeerClosed:
    """The peer finished sending (EOF). Delivered only after every buffered frame was handled.

    ``unterminated`` holds bytes that arrived but never formed a complete frame.
    """

    unterminated: bytes = b""


@attrs.frozen
class TimedOut:
    """The current state's ``timeout`` elapsed since the connection entered it."""

    state: str
    seconds: float


@attrs.frozen
class TimerFired:
    """A named timer started with ``Machine.start_timer`` fired."""

    name: str


@attrs.frozen
class Message:
    """A message published to a topic this connection subscribed to."""

    topic: str
    payload: object
    sender: int | None = None


@attrs.frozen
class Drained:
    """Buffered output fell to the low-water mark: a producer may send its next piece."""


class FrameTooLong(Exception):
    """A frame exceeded its framing's limit. Raised by framings, delivered as an event.

    The message names the limit and its value, e.g. ``line longer than 65536 bytes``.
    """

    def __init__(
        self, what: str, limit: int, size: int | None = None, *, consumed: bool = False
    ) -> None:
        self.what = what
        self.limit = limit
        self.size = size
        #: True when the framing already removed the offending frame from the buffer (the
        #: bytes after it are intact); otherwise the runner discards what is buffered
        self.consumed = consumed
        super().__init__(f"{what} longer than {limit} bytes")


class ProtocolError(Exception):
    """The peer broke the protocol. Raise it from a handler or a framing.

    If the current state has a ``ProtocolError`` handler it gets the exception (and can send an
    error reply); otherwise ``reply``, if given, is sent as the last bytes the peer reads and
    the connection closes with ``CloseReason.PROTOCOL_ERROR``.
    """

    def __init__(self, message: str, reply: bytes | None = None) -> None:
        self.message = message
        self.reply = reply
        super().__init__(message)


class UndeclaredTransition(RuntimeError):
    """A handler returned a state it did not declare in ``to=``."""


class CloseReason(enum.Enum):
    """Why a connection ended. Counted per server in ``server.stats.close_reasons``."""

    NORMAL = "normal"  #: the machine reached a final state or called close()
    PEER_CLOSED = "peer closed"  #: EOF, reset or broken pipe from the peer
    FRAME_TOO_LONG = "frame too long"  #: a framing limit was exceeded
    TIMEOUT = "timeout"  #: a state timeout elapsed
    IDLE = "idle"  #: no bytes in either direction for ``idle_timeout`` seconds
    PROTOCOL_ERROR = "protocol error"  #: the machine raised ProtocolError
    HANDLER_ERROR = "handler error"  #: a handler raised or returned an undeclared state
    SLOW_CONSUMER = "slow consumer"  #: buffered output passed ``output_limit``
    SHUTDOWN = "shutdown"  #: the server shut down or closed
    ABORTED = "aborted"  #: the machine called abort()
    REFUSED = "refused"  #: verify_request() said no, or ``max_connections`` was reached


OPENED = Opened()
DRAINED = Drained()
