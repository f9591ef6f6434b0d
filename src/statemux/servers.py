"""The server classes: every concurrency model × every socket family.

``Multiplexing*`` serve machines from one selectors loop.
"""

from __future__ import annotations

import socketserver

from .multiplex import MultiplexingMixIn

__all__ = [
    "MultiplexingMixIn",
    "MultiplexingTCPServer",
    "MultiplexingUDPServer",
    "MultiplexingUnixStreamServer",
    "MultiplexingUnixDatagramServer",
]


class MultiplexingTCPServer(MultiplexingMixIn, socketserver.TCPServer):
    pass


class MultiplexingUDPServer(MultiplexingMixIn, socketserver.UDPServer):
    pass


class MultiplexingUnixStreamServer(MultiplexingMixIn, socketserver.UnixStreamServer):
    pass


class MultiplexingUnixDatagramServer(MultiplexingMixIn, socketserver.UnixDatagramServer):
    pass
