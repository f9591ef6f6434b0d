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
from .loop import Loop
from .machine import Machine, MachineDefinitionError, Spec, State
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
from .trace import LoggingTracer, RecordingTracer

__version__ = "0.1.0"

__all__ = [
    # machines
    "Machine",
    "State",
    "Spec",
    "MachineDefinitionError",
    # events and close reasons
    "Opened",
    "Frame",
    "PeerClosed",
    "TimedOut",
    "TimerFired",
    "Message",
    "Drained",
    "FrameTooLong",
    "ProtocolError",
    "UndeclaredTransition",
    "CloseReason",
    # framing
    "Framing",
    "Line",
    "Exact",
    "Raw",
    "Datagram",
    "ReceiveBuffer",
    # running
    "Limits",
    "Hub",
    "Loop",
    "Connection",
    "Stats",
    "LoggingTracer",
    "RecordingTracer",
    # servers: {sync, Threading, Forking, Multiplexing} x {TCP, UDP, UnixStream, UnixDatagram}
    "ThreadingMixIn",
    "ForkingMixIn",
    "MultiplexingMixIn",
    "TCPServer",
    "UDPServer",
    "UnixStreamServer",
    "UnixDatagramServer",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
    "ThreadingUnixStreamServer",
    "ThreadingUnixDatagramServer",
    "ForkingTCPServer",
    "ForkingUDPServer",
    "ForkingUnixStreamServer",
    "ForkingUnixDatagramServer",
    "MultiplexingTCPServer",
    "MultiplexingUDPServer",
    "MultiplexingUnixStreamServer",
    "MultiplexingUnixDatagramServer",
    "UnsupportedMachine",
    "__version__",
]
