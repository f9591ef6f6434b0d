"""The echo machines: in memory (every split of the input), then over real sockets."""

from __future__ import annotations

import socket

import pytest

from statemachines import echo
from statemachines.echo import MAX_DATAGRAM, MAX_LINE, SERVICE, DatagramEcho, Echo, build
from statemux import CloseReason
from statemux.testing import Simulator, chunkings, random_chunkings, transcript

pytestmark = pytest.mark.timeout(30)

SESSION = b"hello\nworld\r\n\n  spaced  \n\xff\xfe bytes\nlast without newline"


# -- stream echo, in memory ---------------------------------------------------------------------
@pytest.mark.parametrize("chunks", list(chunkings(SESSION)), ids=lambda c: f"{len(c)}pieces")
def test_every_split_echoes_the_same_bytes(chunks: list[bytes]) -> None:
    out, conn = transcript(build(), chunks, eof=True)
    assert out == SESSION
    assert conn.close_reason is CloseReason.NORMAL


@pytest.mark.parametrize("seed", range(5))
def test_random_splits_of_a_long_session(seed: int) -> None:
    data = b"".join(b"line %d %s\n" % (i, b"x" * (i * 37 % 500)) for i in range(300))
    for chunks in random_chunkings(data, count=10, seed=seed):
        out, conn = transcript(build(), chunks)
        assert out == data
        assert not conn.closed


def test_pipelined_lines_beyond_one_event_budget_all_come_back_in_order() -> None:
    sim = Simulator(build(), frames_per_event=4)
    conn = sim.connect()
    data = b"".join(b"%d\n" % i for i in range(1000))
    conn.send(data)
    assert conn.received() == data


def test_eof_without_pending_bytes_closes_quietly() -> None:
    out, conn = transcript(build(), [b"a\n"], eof=True)
    assert out == b"a\n"
    assert conn.close_reason is CloseReason.NORMAL
    assert conn.state_name == "done"


# Over-long lines: (max_line, input, exact reply). The connection always closes afterwards.
TOO_LONG = [
    (5, b"123456\n", b"ERR line longer than 5 bytes\n"),
    (5, b"123456", b"ERR line longer than 5 bytes\n"),
    (5, b"12345\r\n", b"ERR line longer than 5 bytes\n"),
    (5, b"ok\n123456\nnever\n", b"ok\nERR line longer than 5 bytes\n"),
    (1, b"\n\nab\n", b"\n\nERR line longer than 1 bytes\n"),
    (MAX_LINE, b"x" * (MAX_LINE + 1), b"ERR line longer than 65536 bytes\n"),
]


@pytest.mark.parametrize(("limit", "data", "reply"), TOO_LONG)
def test_over_long_line_gets_an_error_then_close(limit: int, data: bytes, reply: bytes) -> None:
    for chunks in chunkings(data) if len(data) < 100 else [[data]]:
        out, conn = transcript(build(max_line=limit), chunks)
        assert out == reply, chunks
        assert conn.close_reason is CloseReason.NORMAL


@pytest.mark.parametrize("limit", [1, 5, MAX_LINE])
def test_line_exactly_at_the_limit_is_echoed(limit: int) -> None:
    line = b"y" * limit + b"\n"
    out, conn = transcript(build(max_line=limit), [line])
    assert out == line
    assert not conn.closed


def test_default_limit_is_64_kib() -> None:
    assert MAX_LINE == 64 * 1024
    assert Echo().max_line == MAX_LINE
    out, _ = transcript(Echo, [b"z" * (MAX_LINE + 1) + b"\n"])
    assert out == b"ERR line longer than 65536 bytes\n"


@pytest.mark.parametrize("bad", [0, -1])
def test_max_line_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match=f"max_line must be positive, not {bad}"):
        build(max_line=bad)
    with pytest.raises(ValueError, match="max_line must be positive"):
        Echo(max_line=bad)


# -- datagram echo, in memory ---------------------------------------------------------------------
def _datagram(conn, data: bytes) -> bytes:  # type: ignore[no-untyped-def]
    conn.receive_datagram(data)
    conn.sim.run_ready()
    return conn.received()


@pytest.mark.parametrize(
    ("datagram", "reply"),
    [
        (b"ping", b"ping"),
        (b"two\nlines\n", b"two\nlines\n"),
        (b"\x00\xff", b"\x00\xff"),
        (b"", b""),  # nothing to send back
        (b"m" * MAX_DATAGRAM, b"m" * MAX_DATAGRAM),
        (b"m" * (MAX_DATAGRAM + 1), b"ERR datagram longer than 65507 bytes\n"),
    ],
    ids=["word", "lines", "binary", "empty", "largest", "too-large"],
)
def test_datagram_echo(datagram: bytes, reply: bytes) -> None:
    sim = Simulator(DatagramEcho)
    conn = sim.connect()
    assert _datagram(conn, datagram) == reply
    assert _datagram(conn, b"still here") == b"still here"
    assert not conn.closed


# -- the service and its transition table -----------------------------------------------------------
def test_service_describes_both_transports() -> None:
    assert SERVICE.name == "echo"
    assert SERVICE.stream and SERVICE.datagram
    assert SERVICE.build is build
    assert build(datagram=True) is DatagramEcho
    assert [o.dest for o in SERVICE.options] == ["max_line"]
    machine = build(max_line=10)()
    assert isinstance(machine, Echo) and machine.max_line == 10
    assert build(max_line=None)().max_line == MAX_LINE
    assert not Echo.shares_memory and not Echo.waits_for_peers


def test_every_explicit_transition_is_taken() -> None:
    sim = Simulator(build(max_line=4))
    sim.connect().send(b"ab\n")
    sim.connect().send(b"too long\n")
    conn = sim.connect()
    conn.send(b"tail")
    conn.send_eof()
    assert sim.stats.untaken(Echo.spec) == []

    dsim = Simulator(DatagramEcho)
    dconn = dsim.connect()
    _datagram(dconn, b"x")
    _datagram(dconn, b"x" * (MAX_DATAGRAM + 1))
    assert dsim.stats.untaken(DatagramEcho.spec) == []


def test_module_exports() -> None:
    assert set(echo.__all__) <= set(dir(echo))


# -- real sockets ----------------------------------------------------------------------------------
def _recv_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)


def test_echo_over_tcp() -> None:
    from statemux import MultiplexingTCPServer
    from statemux.testing import serving

    with MultiplexingTCPServer(("127.0.0.1", 0), build(max_line=1000)) as srv:
        with serving(srv) as address:
            with (
                socket.create_connection(address, timeout=10) as a,
                socket.create_connection(address, timeout=10) as b,
            ):
                payload = b"".join(b"%d %s\r\n" % (i, b"p" * (i % 900)) for i in range(200))
                a.sendall(payload)
                b.sendall(b"from b\n")
                assert _recv_exactly(b, 7) == b"from b\n"
                assert _recv_exactly(a, len(payload)) == payload
                a.sendall(b"tail")
                a.shutdown(socket.SHUT_WR)
                assert _recv_until_eof(a) == b"tail"
            with socket.create_connection(address, timeout=10) as c:
                c.sendall(b"fine\n" + b"L" * 1001 + b"\n")
                assert _recv_until_eof(c) == b"fine\nERR line longer than 1000 bytes\n"
    # every echo connection ends NORMAL: even a plain EOF is handled (it echoes the tail)
    assert srv.stats.close_reasons[CloseReason.NORMAL] == 3


def test_echo_over_udp() -> None:
    from statemux import MultiplexingUDPServer
    from statemux.testing import serving

    with MultiplexingUDPServer(("127.0.0.1", 0), build(datagram=True)) as srv:
        with serving(srv) as address:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(10)
                for payload in (b"one", b"two\nlines\n", b"x" * 60000):
                    client.sendto(payload, address)
                    data, source = client.recvfrom(65536)
                    assert (data, source) == (payload, address)
