"""statemux: explicit per-connection state machines, served by a selectors loop, threads,
forked processes or synchronously, behind the ``socketserver`` interface."""

from .connection import Connection, Stats
from .events import (
    CloseReason,
    Drained,
    Frame,
    FrameTooLong,
    Message,
    Opened,
    PeerClosed,
    ProtocolError,
    TimedOut,
    TimerFired,
    UndeclaredTransition,
)
from .framing import Datagram, Exact, Framing, Line, Raw, ReceiveBuffer
from .hub import Hub
from .limits import Limits
from .machine import Machine, MachineDefinitionError, Spec, State

__version__ = "0.1.0"
from .loop import Loop
from .servers import (
    ForkingMixIn,
    ForkingTCPServer,
    ForkingUDPServer,
    ForkingUnixDatagramServer,
    ForkingUnixStreamServer,
    MultiplexingMixIn,
    MultiplexingTCPServer,
    MultiplexingUDPServer,
    MultiplexingUnixDatagramServer,
    MultiplexingUnixStreamServer,
    TCPServer,
    ThreadingMixIn,
    ThreadingTCPServer,
    ThreadingUDPServer,
    ThreadingUnixDatagramServer,
    ThreadingUnixStreamServer,
    UDPServer,
    UnixDatagramServer,
    UnixStreamServer,
    UnsupportedMachine,
)
