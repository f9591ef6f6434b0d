"""The server classes: every concurrency model × every socket family, with the stdlib's names.

============  ==================  ===========================  ===============================
model         stream (TCP)        Unix stream                  datagram (UDP / Unix datagram)
============  ==================  ===========================  ===============================
sync          TCPServer           UnixStreamServer             UDPServer, UnixDatagramServer
threading     ThreadingTCPServer  ThreadingUnixStreamServer    ThreadingUDPServer, ...
forking       ForkingTCPServer    ForkingUnixStreamServer      ForkingUDPServer, ...
multiplexing  MultiplexingTCP...  MultiplexingUnixStream...    MultiplexingUDPServer, ...
============  ==================  ===========================  ===============================

Each class is the stdlib class of the same name with two mix-ins in front: the model's
(:class:`~statemux.blocking.BlockingMixIn` for sync, :class:`ThreadingMixIn`,
:class:`ForkingMixIn`, :class:`MultiplexingMixIn`) and
:class:`~statemux.sockets.SocketsMixIn` (IPv6, dual stack, Unix socket files, inherited
sockets). So ``isinstance(ThreadingTCPServer(...), socketserver.ThreadingMixIn)`` holds, and
code written for ``socketserver`` keeps working after changing its import: every class
except the ``Multiplexing*`` ones also accepts stdlib handler classes and runs them as
the stdlib does. ``ForkingUnixStreamServer`` and ``ForkingUnixDatagramServer`` exist on
Python 3.11 too (the stdlib added them in 3.12).

Every class accepts a machine factory (a machine class, or any zero-argument callable
returning a machine). The constructor refuses, with a ``TypeError`` naming the servers that
can run it, what the model cannot serve: a blocking handler class on a multiplexing server,
a ``shares_memory`` machine on a forking server, a ``waits_for_peers`` machine on a sync
server, a machine keeping per-peer state on a forking datagram server. See
``docs/models.md`` for the trade-offs.
"""

from __future__ import annotations

import socketserver

from .blocking import BlockingMixIn, ForkingMixIn, ThreadingMixIn, UnsupportedMachine
from .multiplex import MultiplexingMixIn
from .sockets import SocketsMixIn

__all__ = [
    "UnsupportedMachine",
    "SocketsMixIn",
    "BlockingMixIn",
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
]


# -- sync ----------------------------------------------------------------------------------------
class TCPServer(BlockingMixIn, SocketsMixIn, socketserver.TCPServer):
    """One TCP connection at a time, inline in the serving thread."""

    allow_reuse_address = True


class UDPServer(BlockingMixIn, SocketsMixIn, socketserver.UDPServer):
    """UDP datagrams handled in the serving thread (a machine per peer address)."""


class UnixStreamServer(BlockingMixIn, SocketsMixIn, socketserver.UnixStreamServer):
    """One Unix stream connection at a time, inline in the serving thread."""


class UnixDatagramServer(BlockingMixIn, SocketsMixIn, socketserver.UnixDatagramServer):
    """Unix datagrams handled in the serving thread (a machine per bound peer)."""


# -- threading -------------------------------------------------------------------------------------
class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
    pass


class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
    pass


# -- forking ---------------------------------------------------------------------------------------
class ForkingTCPServer(ForkingMixIn, TCPServer):
    pass


class ForkingUDPServer(ForkingMixIn, UDPServer):
    pass


class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
    pass


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    pass


# -- multiplexing ----------------------------------------------------------------------------------
class MultiplexingTCPServer(MultiplexingMixIn, SocketsMixIn, socketserver.TCPServer):
    pass


class MultiplexingUDPServer(MultiplexingMixIn, SocketsMixIn, socketserver.UDPServer):
    # SO_REUSEADDR on a UDP socket lets a second server bind the same port and steal
    # datagrams; keep the stdlib's refusal.
    allow_reuse_address = False


class MultiplexingUnixStreamServer(MultiplexingMixIn, SocketsMixIn, socketserver.UnixStreamServer):
    pass


class MultiplexingUnixDatagramServer(
    MultiplexingMixIn, SocketsMixIn, socketserver.UnixDatagramServer
):
    allow_reuse_address = False
