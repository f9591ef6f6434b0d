"""The chat machine: in memory with the simulator, then several raw-socket clients over TCP."""

from __future__ import annotations

import functools
import re
import socket
import threading

import pytest

from statemachines import chat
from statemachines.chat import (
    MAX_LINE,
    MAX_MEMBERS,
    MAX_NICK,
    MAX_ROOM_NAME,
    MAX_ROOMS,
    SERVICE,
    Chat,
    ChatLimits,
    ChatRegistry,
    build,
)
from statemux import CloseReason
from statemux.testing import SimConnection, Simulator, chunkings, random_chunkings

pytestmark = pytest.mark.timeout(60)

WELCOME = b"* welcome to statemux chat; choose a nickname (1-16 letters, digits, '_' or '-')\r\n"
HELP = (
    b"* commands:\r\n"
    b"*   /join ROOM  enter ROOM (leaving the room you are in)\r\n"
    b"*   /leave      leave the room you are in\r\n"
    b"*   /who        list the members of the room you are in\r\n"
    b"*   /quit       say goodbye and disconnect\r\n"
    b"*   /help       this list\r\n"
    b"*   //text      send a line that starts with '/'\r\n"
)


def hello(nick: bytes) -> bytes:
    return b"* hello %s; /join ROOM to enter a room, /help for commands\r\n" % nick


def make_sim(registry: ChatRegistry | None = None, **limits: object) -> Simulator:
    return Simulator(functools.partial(Chat, registry or ChatRegistry()), **limits)


def login(sim: Simulator, nick: bytes, room: bytes | None = None) -> SimConnection:
    """Connect, pick ``nick``, optionally join ``room``; leave nothing unread."""
    conn = sim.connect()
    conn.send(nick + b"\r\n")
    if room is not None:
        conn.send(b"/join " + room + b"\r\n")
    assert b"ERR" not in conn.received()
    return conn


def drain(*conns: SimConnection) -> None:
    for conn in conns:
        conn.received()


# -- whole sessions, fed every way the network may cut them -----------------------------------
SOLO_IN = (
    b"alice\r\n"
    b"/help\n"
    b"/join lobby\r\n"
    b"/who\n"
    b"hello there\r\n"
    b"//slash\n"
    b"\n"
    b"/leave\n"
    b"outside\n"
    b"/quit\r\n"
    b"after quit\n"
)
SOLO_OUT = (
    WELCOME
    + hello(b"alice")
    + HELP
    + b"* you joined lobby; members: alice\r\n"
    + b"* members of lobby: alice\r\n"
    + b"* you left lobby\r\n"
    + b"ERR not in a room; /join ROOM first\r\n"
    + b"* bye alice\r\n"
)


@pytest.mark.parametrize("chunks", list(chunkings(SOLO_IN)), ids=lambda c: f"{len(c)}pieces")
def test_solo_session_every_split(chunks: list[bytes]) -> None:
    sim = make_sim()
    conn = sim.connect()
    for chunk in chunks:
        if conn.closed:
            break
        conn.send(chunk)
    assert conn.received() == SOLO_OUT
    assert conn.close_reason is CloseReason.NORMAL


ALICE_IN = b"alice\n/join lobby\nfirst\r\nsecond\n//third\n/who\nfourth\n"
BOB_SEES = (
    b"* alice joined lobby\r\n"
    b"<alice> first\r\n"
    b"<alice> second\r\n"
    b"<alice> /third\r\n"
    b"<alice> fourth\r\n"
)


@pytest.mark.parametrize(
    "chunks",
    [*chunkings(ALICE_IN), *random_chunkings(ALICE_IN, count=30, seed=7)],
    ids=lambda c: f"{len(c)}pieces",
)
def test_room_members_receive_every_line_in_order(chunks: list[bytes]) -> None:
    sim = make_sim()
    bob = login(sim, b"bob", b"lobby")
    alice = sim.connect()
    for chunk in chunks:
        alice.send(chunk)
    assert bob.received() == BOB_SEES
    assert alice.received() == (
        WELCOME
        + hello(b"alice")
        + b"* you joined lobby; members: bob, alice\r\n"
        + b"* members of lobby: bob, alice\r\n"
    )


def test_three_members_messages_interleave_in_publish_order() -> None:
    sim = make_sim()
    a, b, c = (login(sim, n, b"room") for n in (b"a", b"b", b"c"))
    drain(a, b, c)
    for i in range(50):
        sender = (a, b, c)[i % 3]
        sender.send(b"m%d\n" % i)
    lines = {conn: conn.received().splitlines() for conn in (a, b, c)}
    for idx, (conn, nick) in enumerate(((a, b"a"), (b, b"b"), (c, b"c"))):
        expected = [b"<%s> m%d" % ((b"a", b"b", b"c")[i % 3], i) for i in range(50) if i % 3 != idx]
        assert lines[conn] == expected, nick


def test_rooms_are_separate_and_switching_rooms_tells_both() -> None:
    sim = make_sim()
    alice = login(sim, b"alice", b"red")
    bob = login(sim, b"bob", b"blue")
    carol = login(sim, b"carol", b"red")
    drain(alice, bob, carol)
    alice.send(b"in red\n")
    assert bob.received() == b""
    assert carol.received() == b"<alice> in red\r\n"
    alice.send(b"/join Blue\n")
    assert alice.received() == b"* you joined blue; members: bob, alice\r\n"
    assert carol.received() == b"* alice left red\r\n"
    assert bob.received() == b"* alice joined blue\r\n"
    alice.send(b"in blue\n")
    assert bob.received() == b"<alice> in blue\r\n"
    assert carol.received() == b""


def test_message_queued_from_a_room_just_left_is_not_shown() -> None:
    registry = ChatRegistry()
    sim = make_sim(registry)
    alice = login(sim, b"alice", b"red")
    bob = login(sim, b"bob", b"red")
    drain(alice, bob)
    # As in one pass of the loop: bob's line is read first (its message queued for alice),
    # then alice's "/join blue" is read, then queued messages are handled.
    bob.receive(b"late\n")
    alice.receive(b"/join blue\n")
    sim.run_ready()
    assert alice.received() == b"* you joined blue; members: alice\r\n"


def test_control_bytes_in_messages_are_neutralised() -> None:
    sim = make_sim()
    alice, bob = login(sim, b"alice", b"r"), login(sim, b"bob", b"r")
    drain(alice, bob)
    alice.send(b"\x1b[2Jboom\x00\x07\tt\xc3\xa9\x7f\rx\n")
    assert bob.received() == b"<alice> ?[2Jboom??\tt\xc3\xa9??x\r\n"


def test_blank_lines_are_not_broadcast() -> None:
    sim = make_sim()
    alice, bob = login(sim, b"alice", b"r"), login(sim, b"bob", b"r")
    drain(alice, bob)
    alice.send(b"\n\r\n   \n")
    assert bob.received() == b""
    assert alice.received() == b""


# -- malformed input: exact errors, and the client may try again -------------------------------------
NICK_ERRORS = [
    (b"", b"ERR nickname must not be empty"),
    (b"   ", b"ERR nickname must not be empty"),
    (b"n" * (MAX_NICK + 1), b"ERR nickname longer than 16 characters"),
    (b"two words", b"ERR nickname may contain only letters, digits, '_' and '-'"),
    (b"caf\xc3\xa9", b"ERR nickname may contain only letters, digits, '_' and '-'"),
    (b"/join", b"ERR nickname may contain only letters, digits, '_' and '-'"),
    (b"a.b", b"ERR nickname may contain only letters, digits, '_' and '-'"),
    (b"taken", b"ERR nickname 'taken' is taken"),
    (b"TAKEN", b"ERR nickname 'TAKEN' is taken"),
]


@pytest.mark.parametrize(("nick", "error"), NICK_ERRORS)
def test_bad_nickname_is_refused_and_may_be_retried(nick: bytes, error: bytes) -> None:
    sim = make_sim()
    login(sim, b"taken")
    conn = sim.connect()
    conn.received()
    conn.send(nick + b"\r\n")
    assert conn.received() == error + b"\r\n"
    assert conn.state_name == "naming"
    conn.send(b"good_nick-2\n")
    assert conn.received() == hello(b"good_nick-2")
    assert conn.state_name == "outside"


def test_nickname_is_stripped_of_surrounding_blanks() -> None:
    sim = make_sim()
    conn = sim.connect()
    conn.send(b"  ann \t\r\n")
    assert conn.received() == WELCOME + hello(b"ann")


# (state to be in, line, exact error): the client stays where it was.
COMMAND_ERRORS = [
    ("outside", b"/frob", b"ERR unknown command '/frob'; /help lists commands"),
    ("outside", b"/\x1b[1m x", b"ERR unknown command '/?[1m'; /help lists commands"),
    ("outside", b"/join", b"ERR usage: /join ROOM"),
    ("outside", b"/join   ", b"ERR usage: /join ROOM"),
    ("outside", b"/join two words", b"ERR room name may contain only letters, digits, '_' and '-'"),
    ("outside", b"/join #x", b"ERR room name may contain only letters, digits, '_' and '-'"),
    ("outside", b"/join " + b"r" * 33, b"ERR room name longer than 32 characters"),
    ("outside", b"/leave", b"ERR not in a room; /join ROOM first"),
    ("outside", b"/who", b"ERR not in a room; /join ROOM first"),
    ("outside", b"hello?", b"ERR not in a room; /join ROOM first"),
    ("outside", b"//hello", b"ERR not in a room; /join ROOM first"),
    ("outside", b"/leave now", b"ERR usage: /leave"),
    ("outside", b"/who all", b"ERR usage: /who"),
    ("outside", b"/quit bye", b"ERR usage: /quit"),
    ("outside", b"/help me", b"ERR usage: /help"),
    ("chatting", b"/frob", b"ERR unknown command '/frob'; /help lists commands"),
    ("chatting", b"/join", b"ERR usage: /join ROOM"),
    ("chatting", b"/join lobby", b"ERR already in lobby"),
    ("chatting", b"/join LOBBY", b"ERR already in lobby"),
    ("chatting", b"/join a+b", b"ERR room name may contain only letters, digits, '_' and '-'"),
    ("chatting", b"/leave now", b"ERR usage: /leave"),
    ("chatting", b"/who else", b"ERR usage: /who"),
    ("chatting", b"/quit now", b"ERR usage: /quit"),
]


@pytest.mark.parametrize(("where", "line", "error"), COMMAND_ERRORS)
def test_bad_command_gets_an_exact_error(where: str, line: bytes, error: bytes) -> None:
    sim = make_sim()
    witness = login(sim, b"witness", b"lobby")
    conn = login(sim, b"user", b"lobby" if where == "chatting" else None)
    drain(witness)
    for chunks in chunkings(line + b"\n"):
        for chunk in chunks:
            conn.send(chunk)
        assert conn.received() == error + b"\r\n", chunks
        assert conn.state_name == where
    assert witness.received() == b""


# -- limits ------------------------------------------------------------------------------------------
def test_default_limits() -> None:
    limits = ChatLimits()
    assert (limits.max_nick, limits.max_room_name, limits.max_line) == (16, 32, 4096)
    assert (limits.max_rooms, limits.max_members) == (100, 100)
    assert (MAX_NICK, MAX_ROOM_NAME, MAX_LINE, MAX_ROOMS, MAX_MEMBERS) == (16, 32, 4096, 100, 100)


@pytest.mark.parametrize(
    "name", ["max_nick", "max_room_name", "max_line", "max_rooms", "max_members"]
)
def test_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be positive, not 0"):
        ChatLimits(**{name: 0})
    with pytest.raises(ValueError, match=f"{name} must be positive, not -1"):
        build(**{name: -1})


def test_nickname_length_limit() -> None:
    sim = make_sim(ChatRegistry(ChatLimits(max_nick=3)))
    conn = sim.connect()
    assert conn.received() == WELCOME.replace(b"1-16", b"1-3")
    conn.send(b"abcd\n")
    assert conn.received() == b"ERR nickname longer than 3 characters\r\n"
    conn.send(b"abc\n")
    assert conn.received() == hello(b"abc")


def test_room_name_length_limit() -> None:
    sim = make_sim(ChatRegistry(ChatLimits(max_room_name=4)))
    conn = login(sim, b"ann")
    conn.send(b"/join abcde\n")
    assert conn.received() == b"ERR room name longer than 4 characters\r\n"
    conn.send(b"/join abcd\n")
    assert conn.received() == b"* you joined abcd; members: ann\r\n"


@pytest.mark.parametrize("state", ["naming", "outside", "chatting"])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_line_length_limit_in_every_reading_state(state: str, ending: bytes) -> None:
    """The limit is the line without its ending; an over-long line is refused, whether it
    arrives whole or in pieces, and the lines after it are handled as usual."""
    limit = 20
    long_line = b"L" * (limit + 1) + ending
    exact = b"E" * limit + ending
    for chunks in chunkings(long_line + exact + b"/help\n"):
        sim = make_sim(ChatRegistry(ChatLimits(max_line=limit)))
        witness = login(sim, b"w", b"r")
        if state == "naming":
            conn = sim.connect()
        else:
            conn = login(sim, b"me", b"r" if state == "chatting" else None)
        drain(conn, witness)
        for chunk in chunks:
            conn.send(chunk)
        out = conn.received()
        assert out.startswith(b"ERR line longer than 20 bytes\r\n"), chunks
        rest = out[len(b"ERR line longer than 20 bytes\r\n") :]
        if state == "naming":
            assert rest == b"ERR nickname longer than 16 characters\r\n" + HELP
        elif state == "outside":
            assert rest == b"ERR not in a room; /join ROOM first\r\n" + HELP
        else:
            assert rest == HELP
            assert witness.received() == b"<me> " + b"E" * limit + b"\r\n"
        assert conn.state_name == state


def test_over_long_line_is_discarded_until_its_end_however_long() -> None:
    sim = make_sim(ChatRegistry(ChatLimits(max_line=10)))
    alice, bob = login(sim, b"alice", b"r"), login(sim, b"bob", b"r")
    drain(alice, bob)
    alice.send(b"x" * 50)
    assert alice.received() == b"ERR line longer than 10 bytes\r\n"
    assert alice.state_name == "discarding"
    for _ in range(20):
        alice.send(b"y" * 100)
    bob.send(b"meanwhile\n")  # messages still reach a member whose line is being discarded
    assert alice.received() == b"<bob> meanwhile\r\n"
    alice.send(b"zz\nshort\n")
    assert alice.state_name == "chatting"
    assert bob.received() == b"<alice> short\r\n"
    assert alice.received() == b""


def test_default_line_limit() -> None:
    sim = make_sim()
    alice, bob = login(sim, b"alice", b"r"), login(sim, b"bob", b"r")
    drain(alice, bob)
    alice.send(b"a" * MAX_LINE + b"\n")
    assert bob.received() == b"<alice> " + b"a" * MAX_LINE + b"\r\n"
    alice.send(b"a" * (MAX_LINE + 1) + b"\r\n")
    assert alice.received() == b"ERR line longer than 4096 bytes\r\n"
    assert bob.received() == b""


def test_rooms_per_server_limit() -> None:
    registry = ChatRegistry(ChatLimits(max_rooms=2))
    sim = make_sim(registry)
    ann = login(sim, b"ann", b"one")
    bea = login(sim, b"bea", b"two")
    cid = login(sim, b"cid")
    cid.send(b"/join three\n")
    assert cid.received() == b"ERR too many rooms: at most 2 rooms on this server\r\n"
    assert cid.state_name == "outside"
    cid.send(b"/join two\n")  # an existing room is fine
    assert cid.received() == b"* you joined two; members: bea, cid\r\n"
    # ann is alone in 'one': moving to a new room frees 'one', so the count stays at 2
    ann.send(b"/join three\n")
    assert ann.received() == b"* you joined three; members: ann\r\n"
    assert sorted(registry.rooms) == ["three", "two"]
    # bea is not alone in 'two': a new room would make three
    bea.received()
    bea.send(b"/join four\n")
    assert bea.received() == b"ERR too many rooms: at most 2 rooms on this server\r\n"
    assert bea.state_name == "chatting" and bea.machine.room.name == "two"  # type: ignore[attr-defined]


def test_members_per_room_limit() -> None:
    sim = make_sim(ChatRegistry(ChatLimits(max_members=2)))
    ann = login(sim, b"ann", b"r")
    bea = login(sim, b"bea", b"r")
    cid = login(sim, b"cid", b"other")
    drain(ann, bea)
    cid.send(b"/join r\n")
    assert cid.received() == b"ERR room 'r' is full: at most 2 members per room\r\n"
    assert cid.machine.room.name == "other"  # type: ignore[attr-defined]
    bea.send(b"/leave\n")
    assert ann.received() == b"* bea left r\r\n"
    cid.send(b"/join R\n")
    assert cid.received() == b"* you joined r; members: ann, cid\r\n"


# -- leaving, disconnecting, nickname release ------------------------------------------------------
@pytest.mark.parametrize(
    ("how", "notice", "reason"),
    [
        ("quit", b"* bob left lobby (quit)\r\n", CloseReason.NORMAL),
        ("eof", b"* bob left lobby (peer closed)\r\n", CloseReason.PEER_CLOSED),
        ("eof-mid-line", b"* bob left lobby (peer closed)\r\n", CloseReason.PEER_CLOSED),
    ],
)
def test_room_is_told_when_a_member_goes(how: str, notice: bytes, reason: CloseReason) -> None:
    registry = ChatRegistry()
    sim = make_sim(registry)
    alice = login(sim, b"alice", b"lobby")
    bob = login(sim, b"bob", b"lobby")
    drain(alice, bob)
    if how == "quit":
        bob.send(b"/quit\n")
        assert bob.received() == b"* bye bob\r\n"
    elif how == "eof":
        bob.send_eof()
    else:
        bob.send(b"half a li")
        bob.send_eof()
    assert bob.close_reason is reason
    assert alice.received() == notice
    assert registry.nicks == {"alice": "alice"}
    assert registry.members(registry.rooms["lobby"]) == ["alice"]
    again = sim.connect()
    again.send(b"bob\n")
    assert again.received().endswith(hello(b"bob"))


def test_last_member_leaving_forgets_the_room() -> None:
    registry = ChatRegistry()
    sim = make_sim(registry)
    ann = login(sim, b"ann", b"solo")
    assert list(registry.rooms) == ["solo"]
    ann.send(b"/leave\n")
    assert registry.rooms == {}
    ann.send_eof()
    assert registry.nicks == {}


def test_quit_before_choosing_a_nickname() -> None:
    sim = make_sim()
    conn = sim.connect()
    conn.send(b"/help\n/quit\n")
    assert conn.received() == WELCOME + HELP + b"* bye\r\n"
    assert conn.close_reason is CloseReason.NORMAL


def test_idle_member_is_closed_by_the_server_idle_timeout() -> None:
    """Chat keeps the server's idle timeout: no bytes either way for that long closes."""
    sim = make_sim(idle_timeout=300)
    bob = login(sim, b"bob", b"quiet")
    carol = login(sim, b"carol", b"quiet")
    drain(bob, carol)
    sim.advance(200)
    carol.send(b"/who\n")  # carol is active; bob neither sends nor receives
    assert carol.received() == b"* members of quiet: bob, carol\r\n"
    sim.advance(101)
    assert bob.close_reason is CloseReason.IDLE
    assert carol.received() == b"* bob left quiet (idle)\r\n"
    assert not carol.closed


def test_slow_consumer_is_disconnected_and_the_others_miss_nothing() -> None:
    sim = make_sim(output_high_water=512, output_low_water=128, output_limit=2048)
    alice = login(sim, b"alice", b"lobby")
    slow = login(sim, b"slow", b"lobby")
    carol = login(sim, b"carol", b"lobby")
    drain(alice, slow, carol)
    slow.stop_reading()
    sent = []
    for i in range(200):
        line = b"message %03d %s" % (i, b"." * 40)
        sent.append(b"<alice> " + line + b"\r\n")
        alice.send(line + b"\n")
        if slow.closed:
            break
    assert slow.close_reason is CloseReason.SLOW_CONSUMER
    assert 2048 // 60 <= len(sent) < 200
    for i in range(len(sent), len(sent) + 20):
        line = b"after %d" % i
        sent.append(b"<alice> " + line + b"\r\n")
        alice.send(line + b"\n")
    got = carol.received()
    notice = b"* slow left lobby (slow consumer)\r\n"
    assert got.replace(notice, b"") == b"".join(sent)
    assert got.count(notice) == 1
    assert alice.received() == notice
    assert not carol.closed and not alice.closed
    assert sim.stats.close_reasons[CloseReason.SLOW_CONSUMER] == 1


# -- coverage of the table, the service --------------------------------------------------------------
def test_every_explicit_transition_is_taken() -> None:
    sim = make_sim(ChatRegistry(ChatLimits(max_line=8)))
    a = sim.connect()  # naming: opened
    a.send(b"bad nick\n")  # naming -> naming
    a.send(b"x" * 20)  # naming -> discarding
    a.send(b"\n")  # discarding -> naming
    a.send(b"/quit\n")  # naming -> done

    b = login(sim, b"b")  # naming -> outside
    b.send(b"nope\n")  # outside -> outside
    b.send(b"y" * 20)  # outside -> discarding
    b.send(b"\n")  # discarding -> outside
    b.send(b"/quit\n")  # outside -> done

    c = login(sim, b"c", b"r")  # outside -> chatting
    d = login(sim, b"d", b"r")
    c.send(b"hi\n")  # chatting -> chatting (frame); d: message
    c.send(b"z" * 20)  # chatting -> discarding
    d.send(b"yo\n")  # c: discarding -> discarding (message)
    c.send(b"\n")  # discarding -> chatting
    c.send(b"/leave\n")  # chatting -> outside
    d.send(b"/quit\n")  # chatting -> done
    assert sim.stats.untaken(Chat.spec) == []


def test_service() -> None:
    assert SERVICE.name == "chat"
    assert SERVICE.stream and not SERVICE.datagram
    assert [o.dest for o in SERVICE.options] == [
        "max_nick",
        "max_room_name",
        "max_line",
        "max_rooms",
        "max_members",
    ]
    assert [o.default for o in SERVICE.options] == [16, 32, 4096, 100, 100]
    assert Chat.shares_memory and Chat.waits_for_peers
    with pytest.raises(ValueError, match="chat needs a stream transport"):
        build(datagram=True)
    factory = build(max_nick=5, max_rooms=None)
    one, two = factory(), factory()
    assert isinstance(one, Chat)
    assert one.registry is two.registry  # one registry per server
    assert one.registry.limits == ChatLimits(max_nick=5)
    assert build()().registry is not one.registry


def test_registry_lock_is_held_while_changing_tables() -> None:
    class CountingLock:
        def __init__(self) -> None:
            self.entered = 0
            self.held = False

        def __enter__(self) -> None:
            assert not self.held
            self.held = True
            self.entered += 1

        def __exit__(self, *exc: object) -> None:
            self.held = False

    lock = CountingLock()
    registry = ChatRegistry(lock=lock)
    assert registry.claim_nick("a") is None
    room = registry.join("r", "a")
    assert not isinstance(room, bytes)
    assert registry.members(room) == ["a"]
    registry.leave(room, "a")
    registry.release_nick("a")
    assert lock.entered == 5
    assert isinstance(build()().registry._lock, type(threading.Lock()))


def test_module_exports() -> None:
    assert set(chat.__all__) <= set(dir(chat))


# -- real sockets ------------------------------------------------------------------------------------
class LineClient:
    """A raw-socket chat client that reads whole lines."""

    def __init__(self, address: tuple[str, int], **sockopts: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        for opt, value in sockopts.items():
            self.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, opt), value)
        self.sock.settimeout(15)
        self.sock.connect(address)
        self.buf = bytearray()

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(bytes(self.buf))
            self.buf += data

    def expect(self, line: bytes) -> None:
        assert self.line() == line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def _login_tcp(address: tuple[str, int], nick: bytes, room: bytes, **sockopts: int) -> LineClient:
    client = LineClient(address, **sockopts)
    client.expect(WELCOME[:-2])
    client.send(nick + b"\r\n/join " + room + b"\r\n")
    client.expect(hello(nick)[:-2])
    assert client.line().startswith(b"* you joined " + room)
    return client


def test_concurrent_tcp_clients_exchange_messages_in_order() -> None:
    from statemux import MultiplexingTCPServer
    from statemux.testing import serving

    nicks = [b"n%d" % i for i in range(5)]
    per_client = 40
    with MultiplexingTCPServer(("127.0.0.1", 0), build()) as srv, serving(srv) as address:
        clients = []
        try:
            for nick in nicks:
                clients.append(_login_tcp(address, nick, b"lobby"))
            # everyone has joined: each earlier client sees the later joins
            for i, client in enumerate(clients):
                for later in nicks[i + 1 :]:
                    client.expect(b"* %s joined lobby" % later)
            errors: list[BaseException] = []
            received: dict[bytes, list[bytes]] = {}

            def talk(index: int) -> None:
                client, me = clients[index], nicks[index]
                try:
                    # send in uneven pieces so lines cross packet boundaries
                    data = b"".join(b"%s says %d\r\n" % (me, k) for k in range(per_client))
                    for start in range(0, len(data), 7):
                        client.send(data[start : start + 7])
                    lines = [client.line() for _ in range(per_client * (len(nicks) - 1))]
                    received[me] = lines
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

            threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(clients))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors, errors
            for me in nicks:
                lines = received[me]
                for other in nicks:
                    if other == me:
                        continue
                    mine = [ln for ln in lines if ln.startswith(b"<%s> " % other)]
                    assert mine == [
                        b"<%s> %s says %d" % (other, other, k) for k in range(per_client)
                    ]
                assert all(re.fullmatch(rb"<n\d> n\d says \d+", ln) for ln in lines)
            clients[0].send(b"/who\r\n")
            clients[0].expect(b"* members of lobby: " + b", ".join(nicks))
        finally:
            for client in clients:
                client.close()


def test_tcp_member_that_never_reads_is_cut_off_and_others_continue() -> None:
    from statemux import MultiplexingTCPServer
    from statemux.testing import serving

    limits = {"output_high_water": 4096, "output_low_water": 1024, "output_limit": 16384}
    with MultiplexingTCPServer(("127.0.0.1", 0), build(), **limits) as srv, serving(srv) as address:
        alice = _login_tcp(address, b"alice", b"lobby")
        carol = _login_tcp(address, b"carol", b"lobby")
        alice.expect(b"* carol joined lobby")
        sleeper = _login_tcp(address, b"sleeper", b"lobby", SO_RCVBUF=4096)
        alice.expect(b"* sleeper joined lobby")
        carol.expect(b"* sleeper joined lobby")
        try:
            notice = b"* sleeper left lobby (slow consumer)"
            padding = b"p" * 1000
            seen_notice = False
            sent = 0
            # Bounded: kernel buffers on both sides of the sleeper plus output_limit are far
            # below 20000 * 1 KB.
            while not seen_notice and sent < 20000:
                alice.send(b"%d %s\n" % (sent, padding))
                while True:
                    line = carol.line()
                    if line == notice:
                        seen_notice = True
                        continue
                    assert line == b"<alice> %d %s" % (sent, padding)
                    break
                sent += 1
            assert seen_notice, f"sleeper still connected after {sent} messages"
            alice.expect(notice)
            for k in range(3):
                alice.send(b"after %d\n" % k)
                carol.expect(b"<alice> after %d" % k)
            carol.send(b"/who\n")
            carol.expect(b"* members of lobby: alice, carol")
        finally:
            for client in (alice, carol, sleeper):
                client.close()
    assert srv.stats.close_reasons[CloseReason.SLOW_CONSUMER] == 1


def test_tcp_client_beyond_max_connections_is_told_the_server_is_full() -> None:
    from statemux import MultiplexingTCPServer
    from statemux.testing import serving

    with MultiplexingTCPServer(("127.0.0.1", 0), build(), max_connections=1) as srv:
        with serving(srv) as address:
            first = LineClient(address)
            try:
                first.expect(WELCOME[:-2])
                second = LineClient(address)
                try:
                    second.expect(b"ERR server full: too many connections")
                    with pytest.raises(EOFError):
                        second.line()
                finally:
                    second.close()
                first.send(b"still\r\n")
                first.expect(hello(b"still")[:-2])
            finally:
                first.close()
    assert srv.stats.close_reasons[CloseReason.REFUSED] == 1
