"""The RESP key-value machine in memory: transcripts fed every way, malformed input, limits,
expiry on the fake clock, glob and inline-splitting tables, coverage of the transition table."""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable, Iterator

import pytest

from statemachines import resp
from statemachines.resp import SERVICE, Resp, build
from statemachines.resp_protocol import (
    MAX_ARGS,
    MAX_BULK,
    MAX_INLINE,
    Glob,
    RespLimits,
    split_inline,
    to_int,
)
from statemachines.resp_store import KEY_OVERHEAD, Keyspace, value_size
from statemux import CloseReason, ProtocolError
from statemux.testing import SimConnection, Simulator, chunkings, random_chunkings, transcript

pytestmark = pytest.mark.timeout(60)


def enc(*args: bytes | str | int) -> bytes:
    """One command in multibulk form."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(parts)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


OK = b"+OK\r\n"
NIL = b"$-1\r\n"


def run(conn: SimConnection, *commands: bytes) -> bytes:
    """Send the commands (already encoded) at once and return every reply."""
    conn.send(b"".join(commands))
    return conn.received()


def one(
    factory: Callable[[], Resp] | None = None, **limits: int
) -> tuple[Simulator, SimConnection]:
    """A simulator and one connection to a fresh store."""
    sim = Simulator(factory or build(**limits))
    return sim, sim.connect()


# -- a whole session, fed every way -------------------------------------------------------------
SESSION = [
    (b"PING\r\n", b"+PONG\r\n"),
    (enc("PING", "hello"), bulk(b"hello")),
    (b'ECHO "with space"\r\n', bulk(b"with space")),
    (enc("SET", "k", "v"), OK),
    (enc("GET", "k"), bulk(b"v")),
    (b"GET missing\r\n", NIL),
    (enc("SET", "k", "v2", "XX"), OK),
    (enc("SET", "k", "v3", "NX"), NIL),
    (enc("SET", "n", "10"), OK),
    (b"INCR n\n", b":11\r\n"),
    (enc("DECR", "n"), b":10\r\n"),
    (enc("INCRBY", "n", "-5"), b":5\r\n"),
    (enc("MSET", "a", "1", "b", "2"), OK),
    (enc("MGET", "a", "b", "nope"), b"*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n"),
    (enc("EXISTS", "a", "b", "nope", "a"), b":3\r\n"),
    (enc("DEL", "a", "nope"), b":1\r\n"),
    (enc("KEYS", "?"), b"*3\r\n$1\r\nk\r\n$1\r\nn\r\n$1\r\nb\r\n"),
    (enc("DBSIZE"), b":3\r\n"),
    (b"\r\n", b""),  # empty inline command: skipped
    (b"*0\r\n*-1\r\n", b""),  # empty multibulk commands: skipped
    (enc("SELECT", "0"), OK),
    (enc("SELECT", "1"), b"-ERR DB index is out of range\r\n"),
    (b"foo a b\r\n", b"-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n"),
    (enc("get"), b"-ERR wrong number of arguments for 'get' command\r\n"),
    (enc("CLIENT", "SETNAME", "conn1"), OK),
    (enc("client", "getname"), bulk(b"conn1")),
    (enc("CONFIG", "GET", "save"), b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n"),
    (enc("COMMAND", "DOCS"), b"*0\r\n"),
    (enc("HELLO", "3"), b"-NOPROTO unsupported protocol version\r\n"),
    (enc("SET", b"bin\r\nkey", b"\x00\r\n\xff"), OK),
    (enc("GET", b"bin\r\nkey"), bulk(b"\x00\r\n\xff")),
    (enc("SET", "big", b"x" * 5000), OK),
    (enc("STRLEN", "big"), b"-ERR unknown command 'STRLEN', with args beginning with: 'big' \r\n"),
    (enc("GET", "big"), bulk(b"x" * 5000)),
    (enc("FLUSHDB"), OK),
    (enc("DBSIZE"), b":0\r\n"),
    (b"QUIT\r\n", OK),
]
SESSION_IN = b"".join(q for q, _ in SESSION)
SESSION_OUT = b"".join(a for _, a in SESSION)


def test_session_command_by_command() -> None:
    sim, conn = one()
    for request, reply in SESSION:
        conn.send(request)
        assert conn.received() == reply, request
    assert conn.close_reason is CloseReason.NORMAL


def _small_chunkings(data: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, and a sample of the split points (every 7th)."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(1, len(data), 7):
        yield [data[:i], data[i:]]


@pytest.mark.parametrize("chunks", list(_small_chunkings(SESSION_IN)), ids=lambda c: f"{len(c)}")
def test_session_whole_byte_by_byte_and_split(chunks: list[bytes]) -> None:
    out, conn = transcript(build(), chunks)
    assert out == SESSION_OUT
    assert conn.close_reason is CloseReason.NORMAL


SHORT = enc("SET", "k", "v") + b"GET k\r\n" + enc("DEL", "k") + enc("GET", "k")
SHORT_OUT = OK + bulk(b"v") + b":1\r\n" + NIL


@pytest.mark.parametrize("chunks", list(chunkings(SHORT)), ids=lambda c: f"{len(c)}")
def test_every_split_point(chunks: list[bytes]) -> None:
    out, conn = transcript(build(), chunks)
    assert out == SHORT_OUT
    assert not conn.closed


def _long_session(seed: int) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    requests, replies = [], []
    for i in range(300):
        key = b"key:%d" % rng.randrange(20)
        value = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 40, 4096, 9000])))
        kind = rng.randrange(4)
        if kind == 0:
            requests.append(enc("SET", key, value))
            replies.append(OK)
        elif kind == 1:
            requests.append(enc("ECHO", value))
            replies.append(bulk(value))
        elif kind == 2:
            requests.append(b"PING\r\n")
            replies.append(b"+PONG\r\n")
        else:
            requests.append(enc("PING", b"%d" % i))
            replies.append(bulk(b"%d" % i))
    return b"".join(requests), b"".join(replies)


@pytest.mark.parametrize("seed", range(4))
def test_random_splits_of_a_long_pipelined_session(seed: int) -> None:
    data, expected = _long_session(seed)
    for chunks in random_chunkings(data, count=8, seed=seed):
        out, conn = transcript(build(), chunks)
        assert out == expected
        assert not conn.closed


@pytest.mark.parametrize("budget", [1, 3, 64])
def test_pipelined_commands_beyond_the_frame_budget_all_answered_in_order(budget: int) -> None:
    sim = Simulator(build(), frames_per_event=budget)
    conn = sim.connect()
    data = b"".join(enc("SET", b"k%d" % i, b"%d" % i) + enc("GET", b"k%d" % i) for i in range(500))
    conn.send(data)
    assert conn.received() == b"".join(OK + bulk(b"%d" % i) for i in range(500))
    conn.send(enc("DBSIZE"))
    assert conn.received() == b":500\r\n"


def test_one_handler_call_per_pipelined_command() -> None:
    sim = Simulator(build())
    conn = sim.connect()
    conn.send(enc("PING") * 16 + b"PING\r\n" * 4)
    assert conn.received() == b"+PONG\r\n" * 20
    assert sim.stats.transitions()[("Resp", "commands", "frame", "commands")] == 20


def test_a_trickling_command_is_never_reread() -> None:
    """What keeps byte-by-byte input linear: parsed arguments leave the buffer, a value whose
    header was read waits for its bytes unexamined, an unfinished line remembers its scan."""
    sim, conn = one()
    conn.send(b"*2\r\n$4\r\nECHO\r\n$100\r\n" + b"v" * 50)
    machine = conn.machine
    assert machine._argv == [b"ECHO"] and machine._bulk == 100
    assert conn.data == b"v" * 50  # the headers are gone
    conn.send(b"v" * 50 + b"\r\n")
    assert conn.received() == bulk(b"v" * 100)
    conn.send(b"ECHO abc")
    assert conn.scan == len(b"ECHO abc")  # searched for "\n" up to here
    conn.send(b"\r\n*1\r\n$4\r")
    assert conn.received() == bulk(b"abc")
    assert conn.data == b"$4\r" and conn.scan == 2  # a CRLF may start at the last byte
    conn.send(b"\nPING\r\n")
    assert conn.received() == b"+PONG\r\n"


# -- malformed input: (input, exact reply); the connection closes after the reply -----------------
MALFORMED = [
    (b"*a\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
    (b"*+1\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
    (b"*01\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
    (b"*99999999999999999999\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
    (
        b"*%d\r\n" % (MAX_ARGS + 1),
        b"-ERR Protocol error: invalid multibulk length (more than 1048576 arguments)\r\n",
    ),
    (b"*1\r\n$a\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b"*1\r\n$-1\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b"*1\r\n$03\r\nfoo\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b"*1\r\n$+3\r\nfoo\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b"*1\r\n$ 3\r\nfoo\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b"*1\r\nfoo\r\n", b"-ERR Protocol error: expected '$', got 'f'\r\n"),
    (b"*1\r\n\r\n", b"-ERR Protocol error: expected '$', got ' '\r\n"),
    (b"*2\r\n$4\r\nPING\r\n:1\r\n", b"-ERR Protocol error: expected '$', got ':'\r\n"),
    (b"*1\r\n\xff\r\n", b"-ERR Protocol error: expected '$', got '\xff'\r\n"),
    (b'ECHO "abc\r\n', b"-ERR Protocol error: unbalanced quotes in request\r\n"),
    (b"ECHO 'abc\r\n", b"-ERR Protocol error: unbalanced quotes in request\r\n"),
    (b'ECHO "a"b\r\n', b"-ERR Protocol error: unbalanced quotes in request\r\n"),
    (b"ECHO 'a'b\r\n", b"-ERR Protocol error: unbalanced quotes in request\r\n"),
    (b'ECHO "a\\"\r\n', b"-ERR Protocol error: unbalanced quotes in request\r\n"),
    (
        b"*1\r\n$%d\r\n" % (MAX_BULK + 1),
        b"-ERR Protocol error: invalid bulk length (bulk longer than 67108864 bytes)\r\n",
    ),
    # Commands before the bad one are answered first.
    (b"PING\r\n" + enc("ECHO", "x") + b"*x\r\n", b"+PONG\r\n$1\r\nx\r\n"
     b"-ERR Protocol error: invalid multibulk length\r\n"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "reply"), MALFORMED)
def test_malformed_input_gets_redis_error_then_close(data: bytes, reply: bytes) -> None:
    for chunks in chunkings(data):
        out, conn = transcript(build(), chunks)
        assert out == reply, chunks
        assert conn.closed
        assert conn.state_name == "closing"
        assert conn.close_reason is CloseReason.NORMAL


def test_bytes_after_a_protocol_error_are_ignored() -> None:
    out, conn = transcript(build(), [b"*x\r\nPING\r\nPING\r\n"])
    assert out == b"-ERR Protocol error: invalid multibulk length\r\n"
    assert conn.closed


# -- limits -----------------------------------------------------------------------------------
def test_default_limits_are_the_documented_ones() -> None:
    limits = RespLimits()
    assert limits.max_inline == MAX_INLINE == 64 * 1024
    assert limits.max_bulk == MAX_BULK == 64 * 1024 * 1024
    assert limits.max_args == MAX_ARGS == 1024 * 1024
    assert limits.max_command == 128 * 1024 * 1024
    assert limits.max_memory == 256 * 1024 * 1024
    assert limits.max_keys == 1_000_000
    assert limits.expire_batch == 1000
    assert limits.expire_interval == 0.1


@pytest.mark.parametrize("field", ["max_inline", "max_bulk", "max_args", "max_keys"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RespLimits(**{field: 0})


# (limits, input, exact reply, closes)
LIMITS = [
    # max_inline: the line up to its "\n" (a "\r" counts) may be max_inline bytes.
    ({"max_inline": 16}, b"ECHO 0123456789\r\n", bulk(b"0123456789"), False),
    ({"max_inline": 16}, b"ECHO 01234567890\r\n",
     b"-ERR Protocol error: too big inline request (inline request longer than 16 bytes)\r\n",
     True),
    ({"max_inline": 16}, b"ECHO 012345678901",
     b"-ERR Protocol error: too big inline request (inline request longer than 16 bytes)\r\n",
     True),
    # ... and so may a "*N" or "$N" header line.
    ({"max_inline": 4}, b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n", False),
    ({"max_inline": 4}, b"*0001",
     b"-ERR Protocol error: too big mbulk count string (mbulk count string longer than 4 "
     b"bytes)\r\n", True),
    ({"max_inline": 4}, b"*1\r\n$0004",
     b"-ERR Protocol error: too big bulk count string (bulk count string longer than 4 "
     b"bytes)\r\n", True),
    ({"max_inline": 2}, enc("ECHO", "0123456789"),
     b"-ERR Protocol error: too big bulk count string (bulk count string longer than 2 "
     b"bytes)\r\n", True),
    ({"max_bulk": 8}, enc("ECHO", b"12345678"), bulk(b"12345678"), False),
    ({"max_bulk": 8}, enc("ECHO", b"123456789"),
     b"-ERR Protocol error: invalid bulk length (bulk longer than 8 bytes)\r\n", True),
    ({"max_args": 3}, enc("MGET", "a", "b"), b"*2\r\n$-1\r\n$-1\r\n", False),
    ({"max_args": 3}, enc("MGET", "a", "b", "c"),
     b"-ERR Protocol error: invalid multibulk length (more than 3 arguments)\r\n", True),
    ({"max_command": 12}, enc("SET", "k", "12345678"), OK, False),
    ({"max_command": 12}, enc("SET", "k", "123456789"),
     b"-ERR Protocol error: too big command (command longer than 12 bytes)\r\n", True),
]  # fmt: skip


@pytest.mark.parametrize(("limits", "data", "reply", "closes"), LIMITS)
def test_parse_limits(limits: dict[str, int], data: bytes, reply: bytes, closes: bool) -> None:
    for chunks in chunkings(data):
        out, conn = transcript(build(**limits), chunks)
        assert out == reply, chunks
        assert conn.closed is closes


def test_inline_limit_default_is_64_kib() -> None:
    line = b"ECHO " + b"x" * (MAX_INLINE - 6) + b"\r\n"  # MAX_INLINE bytes before "\n"
    out, conn = transcript(build(), [line])
    assert out == bulk(b"x" * (MAX_INLINE - 6))
    out, conn = transcript(build(), [b"x" * (MAX_INLINE + 1)])
    assert out == (
        b"-ERR Protocol error: too big inline request (inline request longer than 65536 bytes)\r\n"
    )
    assert conn.closed


def test_max_memory_refuses_writes_until_memory_is_freed() -> None:
    sim, conn = one(max_memory=1000)
    value = b"v" * 300
    replies = [run(conn, enc("SET", b"k%d" % i, value)) for i in range(4)]
    assert replies[:3] == [OK] * 3  # 3 * (112 + 2 + 300) = 1242 > 1000 after the third
    oom = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
    assert replies[3] == oom
    assert run(conn, enc("INCR", "n")) == oom
    assert run(conn, enc("RPUSH", "l", "x")) == oom
    assert run(conn, enc("SET", "k0", "small")) == oom  # every write, as in Redis
    # Reads and deletions still work, and free memory.
    assert run(conn, enc("GET", "k0")) == bulk(value)
    assert run(conn, enc("DEL", "k0")) == b":1\r\n"
    assert run(conn, enc("SET", "k9", "x")) == OK


def test_max_keys_refuses_new_keys_only() -> None:
    sim, conn = one(max_keys=3)
    assert run(conn, enc("MSET", "a", "1", "b", "2", "c", "3")) == OK
    refusal = b"-OOM command not allowed when the number of keys reached 'max-keys' (3).\r\n"
    assert run(conn, enc("SET", "d", "4")) == refusal
    assert run(conn, enc("INCR", "e")) == refusal
    assert run(conn, enc("MSET", "a", "x", "d", "y")) == refusal
    assert run(conn, enc("LPUSH", "l", "x")) == refusal
    assert run(conn, enc("SET", "a", "new")) == OK  # overwriting is no new key
    assert run(conn, enc("INCR", "b")) == b":3\r\n"
    assert run(conn, enc("DEL", "c")) == b":1\r\n"
    assert run(conn, enc("SET", "d", "4")) == OK


def test_expired_keys_are_reclaimed_before_refusing() -> None:
    factory = build(max_keys=2)
    sim = Simulator(factory)
    first = sim.connect()
    assert run(first, enc("SET", "a", "1", "PX", "100"), enc("SET", "b", "2")) == OK * 2
    first.send_eof()  # its active-expiry timer goes with it
    assert first.closed
    sim.advance(1)
    assert len(factory.args[0].data) == 2  # nobody swept the expired key
    second = sim.connect()
    assert run(second, enc("SET", "c", "3")) == OK


# -- commands ------------------------------------------------------------------------------------
# (setup commands, command, exact reply): each on a fresh store.
COMMANDS = [
    ([], enc("PING", "a", "b"), b"-ERR wrong number of arguments for 'ping' command\r\n"),
    ([], enc("ECHO"), b"-ERR wrong number of arguments for 'echo' command\r\n"),
    ([], enc("set", "k"), b"-ERR wrong number of arguments for 'set' command\r\n"),
    ([], enc("MSET", "a", "1", "b"), b"-ERR wrong number of arguments for 'mset' command\r\n"),
    ([], enc("FOO"), b"-ERR unknown command 'FOO', with args beginning with: \r\n"),
    ([], enc("FOO", "a\r\nb"), b"-ERR unknown command 'FOO', with args beginning with: 'a  b' \r\n"),
    ([], enc("FOO", b"x" * 200, "y"),
     b"-ERR unknown command 'FOO', with args beginning with: '" + b"x" * 128 + b"' \r\n"),
    ([], enc("SET", "k", "v", "NX", "XX"), b"-ERR syntax error\r\n"),
    ([], enc("SET", "k", "v", "EX", "1", "PX", "5"), b"-ERR syntax error\r\n"),
    ([], enc("SET", "k", "v", "EX"), b"-ERR syntax error\r\n"),
    ([], enc("SET", "k", "v", "BOGUS"), b"-ERR syntax error\r\n"),
    ([], enc("SET", "k", "v", "KEEPTTL", "EX", "5"), b"-ERR syntax error\r\n"),
    ([], enc("SET", "k", "v", "EX", "x"), b"-ERR value is not an integer or out of range\r\n"),
    ([], enc("SET", "k", "v", "EX", "0"), b"-ERR invalid expire time in 'set' command\r\n"),
    ([], enc("SET", "k", "v", "PX", "-5"), b"-ERR invalid expire time in 'set' command\r\n"),
    ([], enc("SET", "k", "v", "EX", str(2**62)), b"-ERR invalid expire time in 'set' command\r\n"),
    ([enc("SET", "k", "old")], enc("SET", "k", "new", "GET"), bulk(b"old")),
    ([], enc("SET", "k", "new", "GET"), NIL),
    ([enc("SET", "k", "old")], enc("SET", "k", "new", "NX", "GET"), bulk(b"old")),
    ([enc("RPUSH", "k", "x")], enc("SET", "k", "v", "GET"),
     b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
    ([enc("RPUSH", "k", "x")], enc("SET", "k", "v"), OK),  # SET replaces any type
    ([enc("RPUSH", "k", "x")], enc("GET", "k"),
     b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
    ([enc("RPUSH", "k", "x")], enc("INCR", "k"),
     b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
    ([enc("SET", "k", "v")], enc("LPUSH", "k", "x"),
     b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
    ([enc("RPUSH", "k", "x")], enc("MGET", "k"), b"*1\r\n$-1\r\n"),
    ([enc("SET", "k", "abc")], enc("INCR", "k"), b"-ERR value is not an integer or out of range\r\n"),
    ([enc("SET", "k", "01")], enc("INCR", "k"), b"-ERR value is not an integer or out of range\r\n"),
    ([enc("SET", "k", " 1")], enc("INCR", "k"), b"-ERR value is not an integer or out of range\r\n"),
    ([enc("SET", "k", "-7")], enc("INCR", "k"), b":-6\r\n"),
    ([enc("SET", "k", str(2**63 - 1))], enc("INCR", "k"),
     b"-ERR increment or decrement would overflow\r\n"),
    ([enc("SET", "k", str(-(2**63)))], enc("DECR", "k"),
     b"-ERR increment or decrement would overflow\r\n"),
    ([], enc("INCRBY", "k", "1.5"), b"-ERR value is not an integer or out of range\r\n"),
    ([], enc("INCRBY", "k", str(2**63)), b"-ERR value is not an integer or out of range\r\n"),
    ([], enc("DECRBY", "k", "3"), b":-3\r\n"),
    ([], enc("DECRBY", "k", str(-(2**63))), b"-ERR decrement would overflow\r\n"),
    ([], enc("SELECT", "x"), b"-ERR value is not an integer or out of range\r\n"),
    ([], enc("SELECT", "-1"), b"-ERR DB index is out of range\r\n"),
    ([], enc("FLUSHDB", "ASYNC"), OK),
    ([], enc("FLUSHALL"), OK),
    ([], enc("FLUSHDB", "NOW"), b"-ERR syntax error\r\n"),
    ([enc("SET", "k", "v")], enc("TYPE", "k"), b"+string\r\n"),
    ([enc("LPUSH", "k", "v")], enc("TYPE", "k"), b"+list\r\n"),
    ([], enc("TYPE", "k"), b"+none\r\n"),
    ([], enc("RPUSH", "l", "a", "b", "c"), b":3\r\n"),
    ([enc("RPUSH", "l", "a", "b", "c")], enc("LPUSH", "l", "x", "y"), b":5\r\n"),
    ([enc("RPUSH", "l", "a", "b", "c")], enc("LRANGE", "l", "0", "-1"),
     b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"),
    ([enc("RPUSH", "l", "a", "b", "c")], enc("LRANGE", "l", "-2", "10"),
     b"*2\r\n$1\r\nb\r\n$1\r\nc\r\n"),
    ([enc("RPUSH", "l", "a", "b", "c")], enc("LRANGE", "l", "2", "1"), b"*0\r\n"),
    ([enc("RPUSH", "l", "a", "b", "c")], enc("LRANGE", "l", "a", "1"),
     b"-ERR value is not an integer or out of range\r\n"),
    ([], enc("LRANGE", "l", "0", "1"), b"*0\r\n"),
    ([enc("LPUSH", "l", "a", "b")], enc("LRANGE", "l", "0", "-1"), b"*2\r\n$1\r\nb\r\n$1\r\na\r\n"),
    ([enc("RPUSH", "l", "a", "b")], enc("LPOP", "l"), bulk(b"a")),
    ([enc("RPUSH", "l", "a", "b")], enc("RPOP", "l", "5"), b"*2\r\n$1\r\nb\r\n$1\r\na\r\n"),
    ([enc("RPUSH", "l", "a")], enc("RPOP", "l", "-1"),
     b"-ERR value is out of range, must be positive\r\n"),
    ([], enc("LPOP", "l"), NIL),
    ([], enc("LPOP", "l", "2"), b"*-1\r\n"),
    ([enc("RPUSH", "l", "a")], enc("LLEN", "l"), b":1\r\n"),
    ([enc("SET", "l", "a")], enc("LLEN", "l"),
     b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
    ([], enc("COMMAND"), b"*0\r\n"),
    ([], enc("COMMAND", "INFO", "get", "set"), b"*2\r\n$-1\r\n$-1\r\n"),
    ([], enc("COMMAND", "NOPE"), b"-ERR unknown subcommand 'NOPE'. Try COMMAND HELP.\r\n"),
    ([], enc("CONFIG", "GET", "appendonly", "SAVE"),
     b"*4\r\n$10\r\nappendonly\r\n$2\r\nno\r\n$4\r\nsave\r\n$0\r\n\r\n"),
    ([], enc("CONFIG", "GET", "maxmemory"), b"*2\r\n$9\r\nmaxmemory\r\n$9\r\n268435456\r\n"),
    ([], enc("CONFIG", "GET", "nosuch*"), b"*0\r\n"),
    ([], enc("CONFIG", "GET"), b"-ERR wrong number of arguments for 'config|get' command\r\n"),
    ([], enc("CONFIG", "SET", "maxmemory", "1"),
     b"-ERR Unknown option or number of arguments for CONFIG SET - 'maxmemory'\r\n"),
    ([], enc("CONFIG", "NOPE"), b"-ERR unknown subcommand 'NOPE'. Try CONFIG HELP.\r\n"),
    ([], enc("CLIENT", "GETNAME"), NIL),
    ([], enc("CLIENT", "SETNAME", "a b"),
     b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"),
    ([], enc("CLIENT", "SETNAME"), b"-ERR wrong number of arguments for 'client|setname' command\r\n"),
    ([], enc("CLIENT", "SETINFO", "LIB-NAME", "redis-py"), OK),
    ([], enc("CLIENT", "SETINFO", "colour", "red"), b"-ERR Unrecognized option 'colour'\r\n"),
    ([], enc("CLIENT", "ID"), b":1\r\n"),
    ([], enc("CLIENT", "KILL"), b"-ERR unknown subcommand 'KILL'. Try CLIENT HELP.\r\n"),
    ([], enc("HELLO", "x"), b"-ERR Protocol version is not an integer or out of range\r\n"),
    ([], enc("HELLO", "1"), b"-NOPROTO unsupported protocol version\r\n"),
    ([], enc("HELLO", "2", "AUTH", "bob", "pw"),
     b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"),
    ([], enc("HELLO", "2", "FOO"), b"-ERR Syntax error in HELLO option 'FOO'\r\n"),
    ([], enc("AUTH", "pw"),
     b"-ERR AUTH <password> called without any password configured for the default user. "
     b"Are you sure your configuration is correct?\r\n"),
    ([], enc("AUTH", "default", "pw"), OK),
    ([], enc("AUTH", "bob", "pw"), b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"),
    ([enc("SET", "k", "v")], enc("EXPIRE", "k", "x"), b"-ERR value is not an integer or out of range\r\n"),
    ([enc("SET", "k", "v")], enc("EXPIRE", "k", str(2**62)),
     b"-ERR invalid expire time in 'expire' command\r\n"),
    ([enc("SET", "k", "v")], enc("EXPIRE", "k", "5", "NX", "XX"),
     b"-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"),
    ([enc("SET", "k", "v")], enc("EXPIRE", "k", "5", "GT", "LT"),
     b"-ERR GT and LT options at the same time are not compatible\r\n"),
    ([enc("SET", "k", "v")], enc("EXPIRE", "k", "5", "SOON"), b"-ERR Unsupported option SOON\r\n"),
    ([], enc("EXPIRE", "k", "5"), b":0\r\n"),
    ([enc("SET", "k", "v")], enc("EXPIRE", "k", "-1"), b":1\r\n"),
    ([enc("SET", "k", "v"), enc("EXPIRE", "k", "-1")], enc("EXISTS", "k"), b":0\r\n"),
    ([enc("SET", "k", "v")], enc("TTL", "k"), b":-1\r\n"),
    ([], enc("TTL", "k"), b":-2\r\n"),
    ([], enc("PTTL", "k"), b":-2\r\n"),
    ([enc("SET", "k", "v")], enc("PERSIST", "k"), b":0\r\n"),
    ([], enc("PERSIST", "k"), b":0\r\n"),
    ([enc("SET", "k", "v", "EX", "5")], enc("PERSIST", "k"), b":1\r\n"),
    ([enc("SET", "k", "v")], enc("KEYS", "k"), b"*1\r\n$1\r\nk\r\n"),
    ([enc("SET", "k", "v")], enc("KEYS", "x"), b"*0\r\n"),
    ([enc("MSET", "one", "1", "two", "2", "three", "3")], enc("KEYS", "t*"),
     b"*2\r\n$3\r\ntwo\r\n$5\r\nthree\r\n"),
]  # fmt: skip


@pytest.mark.parametrize(("setup", "command", "reply"), COMMANDS)
def test_command_replies(setup: list[bytes], command: bytes, reply: bytes) -> None:
    sim, conn = one()
    for s in setup:
        assert not run(conn, s).startswith(b"-"), s
    assert run(conn, command) == reply
    assert not conn.closed


def test_hello_answers_the_resp2_map_and_sets_the_name() -> None:
    sim, conn = one()
    reply = run(conn, enc("HELLO", "2", "AUTH", "default", "pw", "SETNAME", "me"))
    assert reply == (
        b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n"
        b"$5\r\nproto\r\n:2\r\n$2\r\nid\r\n:1\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n"
        b"$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n"
    )
    assert run(conn, enc("CLIENT", "GETNAME")) == bulk(b"me")
    assert run(conn, enc("HELLO")) == reply


def test_command_names_are_case_insensitive() -> None:
    sim, conn = one()
    assert run(conn, enc("sEt", "k", "v"), enc("GeT", "k")) == OK + bulk(b"v")


def test_quit_replies_then_closes_and_ignores_the_rest() -> None:
    out, conn = transcript(build(), [b"PING\r\nQUIT\r\nPING\r\n"])
    assert out == b"+PONG\r\n+OK\r\n"
    assert conn.close_reason is CloseReason.NORMAL


def test_command_count_and_list_agree() -> None:
    sim, conn = one()
    count = run(conn, enc("COMMAND", "COUNT"))
    names = run(conn, enc("COMMAND", "LIST"))
    assert count == b":%d\r\n" % names.count(b"$")
    assert b"$3\r\nget\r\n" in names and b"$4\r\nkeys\r\n" in names


def test_info_reports_keys_and_memory() -> None:
    sim, conn = one()
    run(conn, enc("SET", "k", "v"), enc("SET", "t", "v", "EX", "9"))
    info = run(conn, enc("INFO"))
    assert b"redis_version:7.0.0\r\n" in info
    assert b"db0:keys=2,expires=1,avg_ttl=0\r\n" in info
    assert b"used_memory:%d\r\n" % (2 * (KEY_OVERHEAD + 2)) in info


def test_keys_skips_and_removes_expired_keys() -> None:
    sim, conn = one()
    run(conn, enc("SET", "a", "1", "PX", "50"), enc("SET", "b", "2"))
    store = conn.machine.store
    store.sweeper = "elsewhere"  # keep active expiry out of this test
    sim.advance(1)
    assert b"a" in store.data
    assert run(conn, enc("KEYS", "*")) == b"*1\r\n$1\r\nb\r\n"
    assert b"a" not in store.data


# -- expiry on the fake clock ---------------------------------------------------------------------
def test_set_ex_ttl_counts_down_then_key_is_gone() -> None:
    sim, conn = one()
    assert run(conn, enc("SET", "k", "v", "EX", "10")) == OK
    assert run(conn, enc("TTL", "k")) == b":10\r\n"
    sim.advance(3)
    assert run(conn, enc("TTL", "k"), enc("PTTL", "k")) == b":7\r\n:7000\r\n"
    sim.advance(6.999)
    assert run(conn, enc("GET", "k")) == bulk(b"v")
    sim.advance(0.001)
    assert run(conn, enc("GET", "k"), enc("TTL", "k")) == NIL + b":-2\r\n"


def test_px_ttl_rounds_like_redis() -> None:
    sim, conn = one()
    run(conn, enc("SET", "k", "v", "PX", "1500"))
    assert run(conn, enc("TTL", "k"), enc("PTTL", "k")) == b":2\r\n:1500\r\n"
    sim.advance(1.2)
    assert run(conn, enc("TTL", "k")) == b":0\r\n"


def test_lazy_expiry_on_access_without_timers() -> None:
    sim, conn = one()
    run(conn, enc("SET", "k", "v", "PX", "100"), enc("RPUSH", "l", "x"), enc("PEXPIRE", "l", "100"))
    store = conn.machine.store
    store.sweeper = "elsewhere"  # no active expiry: only access may remove keys
    sim.advance(5)
    assert set(store.data) == {b"k", b"l"}
    for command, reply in [
        (enc("GET", "k"), NIL),
        (enc("LLEN", "l"), b":0\r\n"),
    ]:
        assert run(conn, command) == reply
    assert store.data == {} and store.expires == {}
    assert store.used == 0


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (enc("EXISTS", "k"), b":0\r\n"),
        (enc("MGET", "k"), b"*1\r\n$-1\r\n"),
        (enc("TYPE", "k"), b"+none\r\n"),
        (enc("INCR", "k"), b":1\r\n"),
        (enc("SET", "k", "w", "XX"), NIL),
        (enc("SET", "k", "w", "NX"), OK),
        (enc("DEL", "k"), b":0\r\n"),
        (enc("PERSIST", "k"), b":0\r\n"),
        (enc("EXPIRE", "k", "5"), b":0\r\n"),
        (enc("KEYS", "k"), b"*0\r\n"),
    ],
)
def test_every_command_sees_an_expired_key_as_absent(command: bytes, reply: bytes) -> None:
    sim, conn = one()
    run(conn, enc("SET", "k", "v", "PX", "10"))
    conn.machine.store.sweeper = "elsewhere"
    sim.advance(1)
    assert run(conn, command) == reply


def test_active_expiry_removes_keys_nobody_reads() -> None:
    sim, conn = one()
    run(conn, enc("SET", "a", "1", "PX", "250"), enc("SET", "b", "2", "EX", "100"))
    store = conn.machine.store
    sim.advance(0.25 + store.limits.expire_interval)
    assert list(store.data) == [b"b"]
    assert run(conn, enc("DBSIZE")) == b":1\r\n"
    sim.advance(100)
    assert store.data == {} and store.heap == [] and store.sweeper is None
    assert store.used == 0


def test_active_expiry_duty_passes_to_another_connection() -> None:
    sim = Simulator(build())
    first = sim.connect()
    run(first, enc("SET", "a", "1", "EX", "5"))
    store = first.machine.store
    assert store.sweeper is first.machine
    first.send(b"QUIT\r\n")
    assert first.closed and store.sweeper is None
    second = sim.connect()
    assert run(second, enc("GET", "b"), enc("PING")) == NIL + b"+PONG\r\n"
    assert store.sweeper is None  # lock-free commands do not take the duty
    sim.advance(10)
    assert b"a" in store.data  # nobody sweeps (GET a would still answer nil)
    assert run(second, enc("SET", "b", "2")) == OK  # any locked command takes it
    assert store.sweeper is second.machine
    sim.advance(store.limits.expire_interval)
    assert list(store.data) == [b"b"]
    sim.advance(10)
    assert store.sweeper is None  # the heap is empty: the duty ends


def test_active_expiry_work_per_pass_is_bounded() -> None:
    sim, conn = one(factory=None)
    store = conn.machine.store
    now = sim.clock.now
    for i in range(50):
        store.put(b"k%d" % i, b"v")
        store.expire_at(b"k%d" % i, now + 1)
    assert store.sweep(now + 1, 20) == 20
    assert len(store.data) == 30
    assert store.sweep(now + 1, 1000) == 30


def test_many_keys_expiring_at_once_are_swept_in_bounded_passes() -> None:
    limits = RespLimits(expire_batch=7)
    store = Keyspace(limits)
    sim = Simulator(functools.partial(Resp, store))
    conn = sim.connect()
    conn.send(b"".join(enc("SET", b"k%d" % i, "v", "PX", "100") for i in range(100)))
    conn.received()
    sim.advance(0.2)
    passes = sim.stats.transitions()[("Resp", "commands", "timer", "commands")]
    assert store.data == {}
    assert passes >= 100 // 7


def test_expiry_heap_stays_small_when_ttls_are_rewritten() -> None:
    sim, conn = one()
    run(conn, enc("SET", "k", "v"))
    for i in range(1000):
        conn.send(enc("EXPIRE", "k", 100 + i))
    conn.received()
    store = conn.machine.store
    assert len(store.heap) <= 2 * len(store.expires) + 65
    assert run(conn, enc("TTL", "k")) == b":1099\r\n"


@pytest.mark.parametrize(
    ("setup", "command", "reply", "ttl"),
    [
        ([], enc("EXPIRE", "k", "50", "NX"), b":1\r\n", b":50\r\n"),
        ([enc("EXPIRE", "k", "10")], enc("EXPIRE", "k", "50", "NX"), b":0\r\n", b":10\r\n"),
        ([], enc("EXPIRE", "k", "50", "XX"), b":0\r\n", b":-1\r\n"),
        ([enc("EXPIRE", "k", "10")], enc("EXPIRE", "k", "50", "XX"), b":1\r\n", b":50\r\n"),
        ([enc("EXPIRE", "k", "10")], enc("EXPIRE", "k", "50", "GT"), b":1\r\n", b":50\r\n"),
        ([enc("EXPIRE", "k", "10")], enc("EXPIRE", "k", "5", "GT"), b":0\r\n", b":10\r\n"),
        ([], enc("EXPIRE", "k", "5", "GT"), b":0\r\n", b":-1\r\n"),
        ([enc("EXPIRE", "k", "10")], enc("EXPIRE", "k", "5", "LT"), b":1\r\n", b":5\r\n"),
        ([enc("EXPIRE", "k", "10")], enc("EXPIRE", "k", "50", "lt"), b":0\r\n", b":10\r\n"),
        ([], enc("EXPIRE", "k", "50", "LT"), b":1\r\n", b":50\r\n"),
        ([], enc("PEXPIRE", "k", "2500"), b":1\r\n", b":3\r\n"),
        ([enc("EXPIRE", "k", "10")], enc("SET", "k", "w"), OK, b":-1\r\n"),
        ([enc("EXPIRE", "k", "10")], enc("SET", "k", "w", "KEEPTTL"), OK, b":10\r\n"),
        ([enc("EXPIRE", "k", "10")], enc("MSET", "k", "w"), OK, b":-1\r\n"),
        ([enc("SET", "k", "1", "EX", "10")], enc("INCR", "k"), b":2\r\n", b":10\r\n"),
    ],
)
def test_ttl_options(setup: list[bytes], command: bytes, reply: bytes, ttl: bytes) -> None:
    sim, conn = one()
    run(conn, enc("SET", "k", "v"), *setup)
    assert run(conn, command) == reply
    assert run(conn, enc("TTL", "k")) == ttl


# -- memory accounting -------------------------------------------------------------------------------
def _recount(store: Keyspace) -> int:
    return sum(KEY_OVERHEAD + len(k) + value_size(v) for k, v in store.data.items())


@pytest.mark.parametrize("seed", range(3))
def test_memory_estimate_follows_every_write(seed: int) -> None:
    rng = random.Random(seed)
    sim, conn = one()
    store = conn.machine.store
    for _ in range(600):
        key = b"k%d" % rng.randrange(8)
        value = b"v" * rng.randrange(30)
        command = rng.choice(
            [
                enc("SET", key, value),
                enc("SET", key, value, "PX", rng.randrange(1, 50)),
                enc("MSET", key, value, b"other", value),
                enc("DEL", key),
                enc("INCR", key),
                enc("RPUSH", key, value, b"x"),
                enc("LPOP", key),
                enc("RPOP", key, 2),
                enc("EXPIRE", key, rng.randrange(-1, 3)),
            ]
        )
        conn.send(command)
        sim.advance(rng.random() / 50)
        assert store.used == _recount(store)
    conn.send(enc("FLUSHDB"))
    assert store.used == 0


# -- concurrency: one store, several threads --------------------------------------------------------
def test_commands_are_atomic_across_threads() -> None:
    factory = build()
    threads, rounds = 4, 400

    def client(i: int) -> None:
        sim = Simulator(factory)
        conn = sim.connect()
        for j in range(rounds):
            conn.send(enc("INCR", "counter") + enc("SET", b"t%d" % i, b"x" * (j % 50)))
            conn.send(enc("RPUSH", "list", b"%d" % j) + enc("DEL", b"t%d" % i))

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    sim = Simulator(factory)
    conn = sim.connect()
    assert run(conn, enc("GET", "counter"), enc("LLEN", "list")) == (
        bulk(b"%d" % (threads * rounds)) + b":%d\r\n" % (threads * rounds)
    )
    store = conn.machine.store
    assert store.used == _recount(store)


# -- the frame cutter's helpers ---------------------------------------------------------------------
INLINE = [
    (b"SET a b", [b"SET", b"a", b"b"]),
    (b"  SET   a\tb  \r", [b"SET", b"a", b"b"]),
    (b'SET "a b" c', [b"SET", b"a b", b"c"]),
    (b'"\\x41\\n\\r\\t\\b\\a\\\\\\q"', [b"A\n\r\t\b\a\\q"]),
    (b'"\\xZZ"', [b"xZZ"]),
    (b"'it\\'s'", [b"it's"]),
    (b"'a\\nb'", [b"a\\nb"]),
    (b'a"b c"', [b"ab c"]),
    (b'""', [b""]),
    (b"''", [b""]),
    (b"a\x00b c", [b"a"]),
    (b"a\x0bb", [b"a\x0bb"]),
    (b"\x0b\x0ca", [b"a"]),
    (b"", []),
    (b" \t ", []),
]


@pytest.mark.parametrize(("line", "args"), INLINE)
def test_inline_splitting_follows_sdssplitargs(line: bytes, args: list[bytes]) -> None:
    assert split_inline(line) == args


@pytest.mark.parametrize(
    "line", [b'"abc', b"'abc", b'"a"b', b"'a'b", b'"a\\"', b'a"b c"d', b'"a\x00"']
)
def test_inline_unbalanced_quotes(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="unbalanced quotes in request"):
        split_inline(line)


@pytest.mark.parametrize(
    ("text", "value"),
    [(b"0", 0), (b"-1", -1), (b"123", 123), (b"9223372036854775807", 2**63 - 1),
     (b"-9223372036854775808", -(2**63)), (b"9223372036854775808", None), (b"01", None),
     (b"-0", None), (b"+1", None), (b" 1", None), (b"1_0", None), (b"", None), (b"1.0", None)],
)  # fmt: skip
def test_integers_parse_like_string2ll(text: bytes, value: int | None) -> None:
    assert to_int(text) == value


GLOBS = [
    (b"*", b"anything", True),
    (b"*", b"", True),
    (b"h?llo", b"hello", True),
    (b"h?llo", b"hllo", False),
    (b"h*llo", b"hllo", True),
    (b"h*llo", b"heeeello", True),
    (b"h[ae]llo", b"hello", True),
    (b"h[ae]llo", b"hillo", False),
    (b"h[^e]llo", b"hallo", True),
    (b"h[^e]llo", b"hello", False),
    (b"h[a-b]llo", b"hbllo", True),
    (b"h[b-a]llo", b"hbllo", True),  # reversed ranges are swapped
    (b"h[a-b]llo", b"hcllo", False),
    (b"h\\*llo", b"h*llo", True),
    (b"h\\*llo", b"hello", False),
    (b"[\\]]", b"]", True),
    (b"[a\\-z]", b"-", True),
    (b"[a\\-z]", b"b", False),
    (b"[", b"[", False),  # an empty class matches nothing
    (b"[]", b"]", False),
    (b"[^", b"x", True),  # an empty negated class matches any byte
    (b"[abc", b"b", True),  # unterminated: the class runs to the end
    (b"[a-", b"-", True),
    (b"[a-]", b"_", True),  # "a-]" is the range ']'..'a'
    (b"a\\", b"a\\", True),  # a trailing backslash is literal
    (b"*.txt", b"a.txt", True),
    (b"*.txt", b"a.txtx", False),
    (b"a*b*c", b"aXbYc", True),
    (b"a*b*c", b"aXcYb", False),
    (b"*a*", b"bab", True),
    (b"?", b"", False),
    (b"a**b", b"ab", True),
    (b"*ab*ab", b"xabyab", True),
    (b"*ab*ab", b"abab", True),
    (b"*ab*ab", b"aba", False),
    (b"\xff*", b"\xff\x00", True),
    (b"a*", b"a\nb", True),
    (b"foo", b"foo", True),
    (b"foo", b"fo", False),
    (b"f.o", b"fxo", False),  # regex characters are literal
]


@pytest.mark.parametrize(("pattern", "key", "matches"), GLOBS)
def test_glob_follows_stringmatchlen(pattern: bytes, key: bytes, matches: bool) -> None:
    assert Glob(pattern).match(key) is matches


def test_glob_literal_patterns_are_recognised() -> None:
    assert Glob(b"foo").literal == b"foo"
    assert Glob(b"f*").literal is None
    assert Glob(b"f\\o").literal is None


@pytest.mark.timeout(10)
def test_glob_has_no_exponential_backtracking() -> None:
    glob = Glob(b"*a" * 40 + b"*b")
    assert glob.match(b"a" * 20000) is False
    assert glob.match(b"a" * 20000 + b"b") is True


# -- the transition table, the service ------------------------------------------------------------
def test_every_explicit_transition_is_taken() -> None:
    sim = Simulator(build(max_inline=8))
    conn = sim.connect()
    run(conn, enc("SET", "k", "v", "PX", "10"))
    sim.advance(1)  # timer / expire_keys
    sim.connect().send(b"*x\r\n")  # protocol error / protocol_error
    sim.connect().send(b"x" * 9)  # frame too long / too_long
    assert sim.stats.untaken(Resp.spec) == []
    assert sim.errors == []


def test_machine_declares_shared_memory() -> None:
    assert Resp.shares_memory is True
    assert Resp.waits_for_peers is False


def test_service_builds_with_every_option_default() -> None:
    options = {opt.dest: opt.default for opt in SERVICE.options}
    factory = SERVICE.build(datagram=False, **options)
    machine = factory()
    assert isinstance(machine, Resp)
    assert machine.limits == RespLimits()
    assert machine.store.lock is not None
    assert factory().store is machine.store  # one store per server
    assert SERVICE.default_port == 6380
    assert SERVICE.connect_hint.startswith("redis-cli")
    assert SERVICE.stream and not SERVICE.datagram


def test_service_refuses_datagrams() -> None:
    with pytest.raises(ValueError, match="stream"):
        resp.build(datagram=True)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("64K", 65536), ("64kb", 65536), ("256M", 256 << 20), ("1GiB", 1 << 30)],
)
def test_size_options_take_binary_units(text: str, value: int) -> None:
    assert resp.size(text) == value
    sizes = {o.dest: o.type for o in SERVICE.options}
    assert sizes["max_memory"](text) == value


@pytest.mark.parametrize("text", ["", "1.5M", "-1", "12T", "lots"])
def test_size_options_refuse_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="not a size in bytes"):
        resp.size(text)
