"""Named limits shared by every driver, each with its default.

A server takes them as keyword arguments (``MultiplexingTCPServer(addr, Echo, idle_timeout=60)``)
or from a subclass's ``limits`` class attribute. Framing limits (line length, frame size) belong
to each state's framing instead.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["Limits"]


def _positive(inst: object, attr: attrs.Attribute, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attr.name} must be a number, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attr.name} must be positive, not {value!r}")


@attrs.frozen(kw_only=True)
class Limits:
    """Every bound a server enforces. ``None`` turns a timeout off."""

    #: above this many buffered output bytes a connection stops being read
    output_high_water: int = attrs.field(default=64 * 1024, validator=_positive)
    #: reading resumes (and ``Drained`` is delivered) when output falls to this
    output_low_water: int = attrs.field(default=16 * 1024, validator=_positive)
    #: beyond this many buffered output bytes the connection is closed as a slow consumer
    output_limit: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)
    #: frames handled per readiness event before other connections get their turn
    frames_per_event: int = attrs.field(default=64, validator=_positive)
    #: bytes asked of the kernel per read
    read_size: int = attrs.field(default=64 * 1024, validator=_positive)
    #: connections held at once; more are refused (the machine's ``refusal`` bytes, then close)
    max_connections: int = attrs.field(default=10_000, validator=_positive)
    #: seconds without a byte in either direction before a connection closes (reason IDLE)
    idle_timeout: float | None = attrs.field(default=300.0, validator=_positive)
    #: seconds ``shutdown()`` lets connections flush output before it returns
    drain_timeout: float = attrs.field(default=5.0, validator=_positive)
    #: seconds a closing connection may take to deliver its buffered output; a peer that
    #: stops reading then is cut off (reason SLOW_CONSUMER, with a reset)
    flush_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: after a graceful close, seconds to read and discard the peer's input so it sees our
    #: last reply rather than a reset
    linger_timeout: float = attrs.field(default=2.0, validator=_positive)
    #: bytes discarded while lingering before giving up
    linger_bytes: int = attrs.field(default=1024 * 1024, validator=_positive)
    #: connections accepted per readiness event of a listening socket
    accepts_per_event: int = attrs.field(default=64, validator=_positive)
    #: seconds accepting pauses after EMFILE/ENFILE (resumes earlier when a connection closes)
    accept_retry_delay: float = attrs.field(default=0.5, validator=_positive)
    #: idle datagram sessions expire after this many seconds
    session_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: replies a datagram server queues while the socket cannot take them; more are dropped
    datagram_queue: int = attrs.field(default=1024, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.output_low_water > self.output_high_water:
            raise ValueError(
                f"output_low_water ({self.output_low_water}) must not exceed "
                f"output_high_water ({self.output_high_water})"
            )
        if self.output_high_water > self.output_limit:
            raise ValueError(
                f"output_high_water ({self.output_high_water}) must not exceed "
                f"output_limit ({self.output_limit})"
            )

    def evolve(self, **changes: object) -> Limits:
        unknown = sorted(set(changes) - {a.name for a in attrs.fields(Limits)})
        if unknown:
            raise TypeError(f"unknown limit(s): {', '.join(unknown)}")
        return attrs.evolve(self, **changes)  # type: ignore[arg-type]
