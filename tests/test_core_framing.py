"""Framings: every input whole, byte by byte and split at every point; limits; linear cutting;
pipelined frames and protocol switches in the middle of a buffer."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from statemux import (
    CloseReason,
    Datagram,
    Exact,
    Frame,
    FrameTooLong,
    Framing,
    Line,
    Machine,
    PeerClosed,
    ProtocolError,
    Raw,
    ReceiveBuffer,
    State,
)
from statemux.framing import DEFAULT_MAX_LINE
from statemux.testing import Simulator, chunkings, random_chunkings, transcript

pytestmark = pytest.mark.timeout(20)


def cut_all(framing: Framing, chunks: list[bytes], machine: Any = None) -> list[Any]:
    """Feed ``chunks`` to a buffer, cutting every complete frame after each chunk, as the
    runner does. A FrameTooLong or ProtocolError is appended to the result and ends it."""
    buf = ReceiveBuffer()
    frames: list[Any] = []
    for chunk in chunks:
        buf.data += chunk
        while True:
            try:
                frame = framing.cut(buf, machine)
            except (FrameTooLong, ProtocolError) as exc:
                frames.append(exc)
                return frames
            if frame is None:
                break
            frames.append(frame)
    frames.append(bytes(buf.data))  # the unterminated rest
    return frames


def shown(frames: list[Any]) -> list[Any]:
    """Exceptions as (type name, message) so results compare with ==."""
    return [(type(f).__name__, str(f)) if isinstance(f, Exception) else f for f in frames]


# -- Line ------------------------------------------------------------------------------------------
LINE_CASES = [
    # (framing, input, frames then the unterminated rest)
    (Line(), b"a\nbc\n\nrest", [b"a", b"bc", b"", b"rest"]),
    (Line(), b"a\r\nb\r\n", [b"a\r", b"b\r", b""]),
    (Line(strip_cr=True), b"a\r\nb\n\r\n", [b"a", b"b", b"", b""]),
    (Line(strip_cr=True), b"\r\r\n", [b"\r", b""]),  # only one CR before the delimiter goes
    (Line(delimiter=b"\r\n"), b"a\nb\r\nc\r\r\n", [b"a\nb", b"c\r", b""]),
    (Line(delimiter=b"\0"), b"x\0y\0\0", [b"x", b"y", b"", b""]),
    (Line(delimiter=b"END"), b"oneENtwoENDENDthree", [b"oneENtwo", b"", b"three"]),
    (Line(max_length=4), b"abcd\nefgh\n", [b"abcd", b"efgh", b""]),
    # A line of exactly max_length is accepted whatever its delimiter, however it is split.
    (Line(max_length=4, delimiter=b"\r\n"), b"abcd\r\n", [b"abcd", b""]),
    (Line(max_length=4, delimiter=b"END"), b"abcdEND", [b"abcd", b""]),
    (Line(max_length=4, strip_cr=True), b"abcd\r\n", [b"abcd", b""]),
]


@pytest.mark.parametrize(
    ("framing", "data", "expected"), LINE_CASES, ids=[repr(c[1]) for c in LINE_CASES]
)
def test_line_cuts_the_same_frames_however_the_input_is_split(
    framing: Line, data: bytes, expected: list[bytes]
) -> None:
    for chunks in chunkings(data):
        assert cut_all(framing, chunks) == expected, chunks


LINE_TOO_LONG = [
    # (framing, input, frames before the error, error message)
    (Line(max_length=4), b"abcde\n", [], "line longer than 4 bytes"),
    (Line(max_length=4), b"abcde", [], "line longer than 4 bytes"),  # no need to wait for \n
    (Line(max_length=4), b"ok\nabcdef\n", [b"ok"], "line longer than 4 bytes"),
    (Line(max_length=4, delimiter=b"\r\n"), b"abcde\r\n", [], "line longer than 4 bytes"),
    (Line(max_length=4, strip_cr=True), b"abcde\r\n", [], "line longer than 4 bytes"),
    (Line(max_length=1), b"\n\nab\n", [b"", b""], "line longer than 1 bytes"),
    (Line(), b"x" * (DEFAULT_MAX_LINE + 1) + b"\n", [], "line longer than 65536 bytes"),
]


@pytest.mark.parametrize(
    ("framing", "data", "before", "message"),
    LINE_TOO_LONG,
    ids=[repr(c[1][:12]) for c in LINE_TOO_LONG],
)
def test_an_over_long_line_raises_frame_too_long_naming_the_limit(
    framing: Line, data: bytes, before: list[bytes], message: str
) -> None:
    splits = list(chunkings(data)) if len(data) < 100 else [[data], [data[:1000], data[1000:]]]
    for chunks in splits:
        frames = cut_all(framing, chunks)
        assert shown(frames) == [*before, ("FrameTooLong", message)], chunks
        exc = frames[-1]
        assert (exc.what, exc.limit) == ("line", framing.max_length)


def test_line_defaults() -> None:
    line = Line()
    assert (line.max_length, line.delimiter, line.strip_cr) == (64 * 1024, b"\n", False)
    assert line.max_size == DEFAULT_MAX_LINE == 65536
    longest = b"x" * DEFAULT_MAX_LINE
    assert cut_all(line, [longest + b"\n"]) == [longest, b""]


@attrs.define
class Limited:
    max_line: int = 4


def test_line_may_read_its_limit_from_a_machine_attribute() -> None:
    framing = Line("max_line")
    for chunks in chunkings(b"abcd\nabcde\n"):
        frames = cut_all(framing, chunks, Limited())
        assert shown(frames) == [b"abcd", ("FrameTooLong", "line longer than 4 bytes")], chunks
    assert cut_all(framing, [b"abcdef\n"], Limited(max_line=6)) == [b"abcdef", b""]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delimiter": b""}, "Line delimiter must not be empty"),
        ({"max_length": 0}, "Line max_length must be positive"),
        ({"max_length": -1}, "Line max_length must be positive"),
    ],
)
def test_line_rejects_bad_parameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        Line(**kwargs)


class CountingBytearray(bytearray):
    """A receive buffer that counts the bytes every ``find`` call examines."""

    scanned = 0

    def find(self, sub: Any, start: Any = 0, end: Any = None) -> int:  # type: ignore[override]
        stop = len(self) if end is None else end
        self.scanned += max(0, stop - (start or 0))
        return super().find(sub, start) if end is None else super().find(sub, start, end)


@pytest.mark.parametrize("delimiter", [b"\n", b"\r\n", b"--END--"])
def test_line_cutting_is_linear_when_bytes_arrive_one_at_a_time(delimiter: bytes) -> None:
    n = 20_000
    framing = Line(max_length=2 * n, delimiter=delimiter)
    buf = ReceiveBuffer()
    buf.data = CountingBytearray()
    data = b"x" * n + delimiter
    scans = []
    frames = []
    for i in range(len(data)):
        buf.data += data[i : i + 1]
        frame = framing.cut(buf, None)
        if frame is not None:
            frames.append(frame)
        scans.append(buf.scan)
    assert frames == [b"x" * n]
    # The search position advances with the data, so each byte is examined a bounded number
    # of times (quadratic scanning would examine about n * n / 2 = 200 million bytes here).
    assert buf.data.scanned <= len(data) * len(delimiter) + len(data)
    assert scans[n - 1] >= n - len(delimiter)
    assert scans[-1] == 0


def test_runner_keeps_cutting_linear_through_the_simulator() -> None:
    sim = Simulator(LineEcho)
    conn = sim.connect()
    conn.rbuf.data = counting = CountingBytearray()
    n = 20_000
    for _ in range(n):
        conn.send(b"y")
    conn.send(b"\n")
    assert conn.received() == b"y" * n + b"\n"
    assert counting.scanned <= 2 * (n + 1)


# -- Exact -----------------------------------------------------------------------------------------
@attrs.define
class Box:
    length: int = 0


EXACT_CASES = [
    (Exact(3), None, b"abcdefgh", [b"abc", b"def", b"gh"]),
    (Exact("length"), Box(2), b"abcde", [b"ab", b"cd", b"e"]),
    (Exact(5, max_size=5), None, b"12345", [b"12345", b""]),
]


@pytest.mark.parametrize(("framing", "machine", "data", "expected"), EXACT_CASES)
def test_exact_cuts_fixed_sizes(
    framing: Exact, machine: Any, data: bytes, expected: list[bytes]
) -> None:
    for chunks in chunkings(data):
        assert cut_all(framing, chunks, machine) == expected, chunks


EXACT_TOO_LONG = [
    (Exact(6, max_size=5), None, "frame longer than 5 bytes"),
    (Exact("length", max_size=1000), Box(1001), "frame longer than 1000 bytes"),
    (Exact("length"), Box(1024 * 1024 + 1), "frame longer than 1048576 bytes"),
]


@pytest.mark.parametrize(("framing", "machine", "message"), EXACT_TOO_LONG)
def test_exact_above_its_maximum_raises_before_buffering(
    framing: Exact, machine: Any, message: str
) -> None:
    # The size is refused at once: nothing needs to arrive first.
    with pytest.raises(FrameTooLong, match=f"^{message}$"):
        framing.cut(ReceiveBuffer(), machine)


def test_exact_default_maximum_is_one_mebibyte() -> None:
    assert Exact(1).max_size == 1024 * 1024


def test_a_zero_length_exact_frame_is_complete_at_once() -> None:
    assert Exact(0).cut(ReceiveBuffer(), None) == b""


# -- Raw and Datagram ------------------------------------------------------------------------------
def test_raw_hands_over_whatever_arrived_in_pieces_of_at_most_max_size() -> None:
    assert cut_all(Raw(), [b"abc", b"", b"de"]) == [b"abc", b"de", b""]
    assert cut_all(Raw(max_size=4), [b"abcdefghij"]) == [b"abcd", b"efgh", b"ij", b""]
    assert Raw().max_size == 256 * 1024
    for chunks in chunkings(b"0123456789"):
        frames = cut_all(Raw(max_size=3), chunks)
        assert b"".join(frames) == b"0123456789"
        assert all(0 < len(f) <= 3 for f in frames[:-1])


def test_datagram_framing_on_a_stream_refuses_oversize_input() -> None:
    assert cut_all(Datagram(max_size=5), [b"abc", b"de"]) == [b"abc", b"de", b""]
    frames = cut_all(Datagram(max_size=5), [b"abcdef"])
    assert shown(frames) == [("FrameTooLong", "datagram longer than 5 bytes")]
    assert Datagram().max_size == 65507


@attrs.define
class DatagramReply(Machine):
    reading = State(Datagram(max_size=5), initial=True)

    @reading.on(Frame, to=reading)
    def reply(self, datagram: bytes) -> None:
        self.send(b"got " + datagram)

    @reading.on(FrameTooLong, to=reading)
    def too_long(self, exc: FrameTooLong) -> None:
        self.send(b"ERR " + str(exc).encode())


def test_whole_datagrams_are_frames_and_oversize_ones_get_the_error() -> None:
    sim = Simulator(DatagramReply)
    conn = sim.connect()
    conn.receive_datagram(b"12345")
    assert conn.received() == b"got 12345"
    conn.receive_datagram(b"123456")
    assert conn.received() == b"ERR datagram longer than 5 bytes"
    conn.receive_datagram(b"")
    assert conn.received() == b"got "


# -- a custom cutter -------------------------------------------------------------------------------
class Netstring(Framing):
    """``<length>:<payload>,`` frames, cut as (length, payload) tuples: not bytes on purpose."""

    max_size = 100

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> tuple[int, bytes] | None:
        data = buffer.data
        colon = data.find(b":", buffer.scan)
        if colon < 0:
            if len(data) > 3:
                raise ProtocolError("netstring length has more than 3 digits", b"ERR length\n")
            buffer.scan = len(data)
            return None
        if not bytes(data[:colon]).isdigit():
            raise ProtocolError("netstring length is not a number", b"ERR length\n")
        n = int(data[:colon])
        if n > self.max_size:
            raise FrameTooLong("netstring", self.max_size, n)
        end = colon + 1 + n
        if len(data) <= end:
            return None
        if data[end] != ord(","):
            raise ProtocolError("netstring does not end with ','", b"ERR comma\n")
        payload = bytes(data[colon + 1 : end])
        buffer.skip(end + 1)
        return (n, payload)


@attrs.define
class NetstringMachine(Machine):
    reading = State(Netstring(), initial=True)

    @reading.on(Frame, to=reading)
    def got(self, frame: tuple[int, bytes]) -> None:
        n, payload = frame
        self.send(b"%d=%s\n" % (n, payload))

    @reading.on(ProtocolError, to=reading)
    def bad(self, exc: ProtocolError) -> None:
        self.send(exc.reply or b"?\n")
        self.close()

    @reading.on(FrameTooLong, to=reading)
    def too_long(self, exc: FrameTooLong) -> None:
        self.send(b"ERR %s\n" % str(exc).encode())
        self.close()


def test_custom_cutter_frames_can_be_any_object() -> None:
    data = b"5:hello,0:,3:a,b,"
    for chunks in chunkings(data):
        out, conn = transcript(NetstringMachine, chunks)
        assert out == b"5=hello\n0=\n3=a,b\n", chunks
        assert not conn.closed


NETSTRING_ERRORS = [
    (b"x:abc,", b"ERR length\n"),
    (b"1234", b"ERR length\n"),
    (b"3:abcX", b"ERR comma\n"),
    (b"101:", b"ERR netstring longer than 100 bytes\n"),
    (b"2:ok,3:abcX", b"2=ok\nERR comma\n"),
]


@pytest.mark.parametrize(("data", "reply"), NETSTRING_ERRORS)
def test_custom_cutter_errors_reach_the_state_handlers(data: bytes, reply: bytes) -> None:
    for chunks in chunkings(data):
        out, conn = transcript(NetstringMachine, chunks)
        assert out == reply, chunks
        assert conn.closed


# -- pipelining and protocol switches --------------------------------------------------------------
@attrs.define
class LineEcho(Machine):
    reading = State(Line(), initial=True)

    @reading.on(Frame, to=reading)
    def echo(self, line: bytes) -> None:
        self.send(line + b"\n")


@attrs.define
class Switcher(Machine):
    """``SIZE n`` switches to an n-byte body; ``RAW`` switches to raw bytes until ``.``."""

    size: int = 0

    command = State(Line(max_length=32), initial=True)
    body = State(Exact("size", max_size=64))
    raw = State(Raw(max_size=1))

    @command.on(Frame, to=(command, body, raw))
    def on_command(self, line: bytes) -> State:
        if line.startswith(b"SIZE "):
            self.size = int(line[5:])
            return self.body
        if line == b"RAW":
            return self.raw
        self.send(b"line:" + line + b"\n")
        return self.command

    @body.on(Frame, to=command)
    def on_body(self, data: bytes) -> None:
        self.send(b"body:" + data + b"\n")

    @raw.on(Frame, to=(raw, command))
    def on_raw(self, byte: bytes) -> State:
        if byte == b".":
            return self.command
        self.send(b"raw:" + byte + b"\n")
        return self.raw

    @command.on(PeerClosed, to=command)
    def on_eof(self, event: PeerClosed) -> None:
        self.send(b"rest:" + event.unterminated + b"\n")
        self.close()


SWITCH_INPUT = b"a\nSIZE 6\nhel\nobSIZE 0\nRAW\nxy.SIZE 3\n\n\nzlast"
SWITCH_OUTPUT = b"line:a\nbody:hel\nob\nbody:\nraw:x\nraw:y\nbody:\n\nz\nrest:last\n"


def test_every_buffered_frame_is_handled_before_waiting_again() -> None:
    sim = Simulator(LineEcho)
    conn = sim.connect()
    conn.send(b"one\ntwo\nthree\nfour")
    assert conn.received() == b"one\ntwo\nthree\n"
    assert bytes(conn.rbuf.data) == b"four"


def test_framing_is_reread_before_each_frame_of_a_pipelined_buffer() -> None:
    # One send holds lines, exact bodies and raw bytes: the framing of the state each frame
    # leads to cuts the next one.
    sim = Simulator(Switcher)
    conn = sim.connect()
    conn.send(SWITCH_INPUT)
    conn.send_eof()
    assert conn.received() == SWITCH_OUTPUT


def test_protocol_switches_survive_every_split() -> None:
    for chunks in chunkings(SWITCH_INPUT):
        out, _ = transcript(Switcher, chunks, eof=True)
        assert out == SWITCH_OUTPUT, chunks
    for chunks in random_chunkings(SWITCH_INPUT * 20, count=30):
        out, _ = transcript(Switcher, chunks)
        assert out.count(b"body:hel\nob\n") == 20


def test_a_length_read_by_one_handler_sizes_the_next_frame() -> None:
    sim = Simulator(Switcher)
    conn = sim.connect()
    conn.send(b"SIZE 65\n")
    assert conn.received() == b""
    assert conn.close_reason is CloseReason.FRAME_TOO_LONG
    assert [e for e in sim.stats.transitions() if e[2] == "frame too long"] == [
        ("Switcher", "body", "frame too long", "closed")
    ]
