"""IP addresses for every model: IPv6 from the address alone, dual stack, and inherited
(systemd-style) listening sockets."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import pytest

import statemux
from statemachines.echo import DatagramEcho, Echo
from statemux.testing import serving

pytestmark = pytest.mark.timeout(20)

MODELS = ["", "Threading", "Forking", "Multiplexing"]
MODEL_IDS = ["sync", "threading", "forking", "multiplexing"]


def have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(
    not have_ipv6_loopback(), reason="this machine has no IPv6 loopback"
)


def server_class(model: str, family: str) -> Any:
    return getattr(statemux, f"{model}{family}Server")


def stream_echo(address: Any, family: int = socket.AF_INET) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(address[:2])
        s.sendall(b"ping\n")
        reply = s.recv(100)
        s.shutdown(socket.SHUT_RDWR)  # a forked child holds a copy of this socket too
        return reply


def datagram_echo(address: Any, family: int = socket.AF_INET) -> bytes:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"ping", address[:2])
        return s.recv(100)


# -- IPv6 ------------------------------------------------------------------------------------------
@needs_ipv6
@pytest.mark.parametrize("kind", ["TCP", "UDP"])
@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_an_ipv6_host_just_works(model: str, kind: str) -> None:
    factory = Echo if kind == "TCP" else DatagramEcho
    with server_class(model, kind)(("::1", 0), factory) as srv, serving(srv) as address:
        assert srv.address_family == socket.AF_INET6
        assert srv.socket.family == socket.AF_INET6
        assert address[0] == "::1" and len(address) == 4
        assert srv.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        if kind == "TCP":
            assert stream_echo(address, socket.AF_INET6) == b"ping\n"
        else:
            assert datagram_echo(address, socket.AF_INET6) == b"ping"
    # the class is untouched: IPv4 stays the default for the next server
    assert server_class(model, kind).address_family == socket.AF_INET


def test_an_ipv4_host_stays_ipv4() -> None:
    with statemux.ThreadingTCPServer(("127.0.0.1", 0), Echo) as srv:
        assert srv.socket.family == socket.AF_INET


# -- dual stack ------------------------------------------------------------------------------------
class LoopbackOnly:
    """Dual stack listens on the wildcard address; these tests answer loopback peers only."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return client_address[0] in ("::1", "::ffff:127.0.0.1")


@needs_ipv6
@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_dual_stack_answers_ipv4_and_ipv6_on_one_socket(model: str) -> None:
    cls = type("DualStack", (LoopbackOnly, server_class(model, "TCP")), {})
    with cls(("", 0), Echo, dual_stack=True) as srv, serving(srv) as address:
        port = address[1]
        assert srv.socket.family == socket.AF_INET6
        assert srv.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert stream_echo(("127.0.0.1", port)) == b"ping\n"
        assert stream_echo(("::1", port), socket.AF_INET6) == b"ping\n"


@needs_ipv6
@pytest.mark.parametrize("model", ["", "Multiplexing"], ids=["sync", "multiplexing"])
def test_dual_stack_datagrams(model: str) -> None:
    cls = type("DualStack", (LoopbackOnly, server_class(model, "UDP")), {})
    with cls(("::", 0), DatagramEcho, dual_stack=True) as srv, serving(srv) as address:
        assert datagram_echo(("127.0.0.1", address[1])) == b"ping"
        assert datagram_echo(("::1", address[1]), socket.AF_INET6) == b"ping"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_dual_stack_needs_the_wildcard_host(host: str) -> None:
    with pytest.raises(ValueError, match=f"give the host '' or '::', not '{host}'"):
        statemux.TCPServer((host, 0), Echo, dual_stack=True)


# -- inherited sockets -----------------------------------------------------------------------------
def listening(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_an_inherited_socket_object_is_served_as_it_is(model: str) -> None:
    sock = listening()
    with server_class(model, "TCP")(None, Echo, socket=sock) as srv, serving(srv) as address:
        assert srv.socket is sock
        assert address == sock.getsockname()
        assert stream_echo(address) == b"ping\n"
    assert sock.fileno() == -1


@pytest.mark.parametrize("kind", ["TCP", "UDP"])
@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_an_inherited_descriptor_is_served(model: str, kind: str) -> None:
    """systemd passes listening sockets as descriptors (from 3 up)."""
    original = listening(socket.SOCK_STREAM if kind == "TCP" else socket.SOCK_DGRAM)
    address = original.getsockname()
    fd = os.dup(original.fileno())
    original.close()
    factory = Echo if kind == "TCP" else DatagramEcho
    with server_class(model, kind)(None, factory, fileno=fd) as srv, serving(srv):
        assert srv.server_address == address
        if kind == "TCP":
            assert stream_echo(address) == b"ping\n"
        else:
            assert datagram_echo(address) == b"ping"
    with pytest.raises(OSError):
        os.fstat(fd)  # the server closed it


@needs_ipv6
def test_an_inherited_ipv6_socket_sets_the_family() -> None:
    sock = listening(host="::1")
    with statemux.ThreadingTCPServer(None, Echo, socket=sock) as srv, serving(srv) as address:
        assert srv.address_family == socket.AF_INET6
        assert stream_echo(address, socket.AF_INET6) == b"ping\n"


def test_without_bind_and_activate_an_inherited_socket_is_not_activated() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    with statemux.TCPServer(None, Echo, bind_and_activate=False, socket=sock) as srv:
        with pytest.raises(OSError):
            socket.create_connection(sock.getsockname(), timeout=1)  # not listening yet
        srv.server_activate()  # the caller activates it, as with the stdlib
        with serving(srv) as address:
            assert stream_echo(address) == b"ping\n"


def test_the_stdlib_way_of_binding_later_still_works() -> None:
    srv = statemux.ThreadingTCPServer(("127.0.0.1", 0), Echo, bind_and_activate=False)
    with srv:
        srv.allow_reuse_address = True
        srv.server_bind()
        srv.server_activate()
        with serving(srv) as address:
            assert stream_echo(address) == b"ping\n"


@pytest.mark.parametrize(
    ("cls", "sock", "message"),
    [
        (
            "TCPServer",
            lambda: listening(socket.SOCK_DGRAM),
            "TCPServer needs a SOCK_STREAM socket; the one given is SOCK_DGRAM",
        ),
        (
            "UDPServer",
            lambda: listening(),
            "UDPServer needs a SOCK_DGRAM socket; the one given is SOCK_STREAM",
        ),
        (
            "MultiplexingTCPServer",
            lambda: socket.socket(socket.AF_UNIX),
            "needs an AF_INET or AF_INET6 socket; the one given is AF_UNIX",
        ),
        (
            "ThreadingUnixStreamServer",
            lambda: listening(),
            "needs an AF_UNIX socket; the one given is AF_INET",
        ),
    ],
)
def test_an_inherited_socket_of_the_wrong_kind_is_refused(
    cls: str, sock: Any, message: str
) -> None:
    given = sock()
    with contextlib.closing(given):
        with pytest.raises(ValueError, match=message):
            getattr(statemux, cls)(None, Echo, socket=given)
        assert given.fileno() >= 0  # still the caller's


def test_a_refused_descriptor_stays_open_for_its_owner() -> None:
    with listening(socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError, match="needs a SOCK_STREAM socket"):
            statemux.ThreadingTCPServer(None, Echo, fileno=sock.fileno())
        os.fstat(sock.fileno())  # not closed behind its owner's back


def test_socket_and_fileno_together_are_refused() -> None:
    with listening() as sock, pytest.raises(TypeError, match="give socket= or fileno=, not both"):
        statemux.TCPServer(None, Echo, socket=sock, fileno=sock.fileno())
