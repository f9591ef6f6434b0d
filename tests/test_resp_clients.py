"""The RESP machine against real clients over loopback TCP: redis-cli (commands, --pipe mass
insertion), the ``redis`` Python client and redis-benchmark, under every model that may serve it."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

import statemux
from statemachines.resp import Resp, build
from statemux.testing import serving

pytestmark = pytest.mark.timeout(120)

redis = pytest.importorskip("redis")

# Models that share memory between connections; the forking ones must refuse (see below).
MODELS = [
    name
    for name in ("MultiplexingTCPServer", "ThreadingTCPServer")
    if isinstance(getattr(statemux, name, None), type)
]


@pytest.fixture(params=MODELS)
def address(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A fresh resp server (its own store) on an ephemeral loopback port."""
    server_class = getattr(statemux, request.param)
    server = server_class(("127.0.0.1", 0), build())
    with serving(server) as addr:
        yield addr


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def cli(address: tuple[str, int], *args: str, stdin: bytes | None = None) -> str:
    need("redis-cli")
    host, port = address
    done = subprocess.run(
        ["redis-cli", "-h", host, "-p", str(port), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return done.stdout.decode()


def client(address: tuple[str, int], **kw: object) -> redis.Redis:
    """A redis-py client speaking RESP2 (redis-py 8 defaults to RESP3, which we refuse)."""
    host, port = address
    kw.setdefault("protocol", 2)
    return redis.Redis(host=host, port=port, socket_timeout=10, **kw)


# -- redis-cli ------------------------------------------------------------------------------------
def test_redis_cli_commands(address: tuple[str, int]) -> None:
    assert cli(address, "PING") == "PONG\n"
    assert cli(address, "SET", "greeting", "hello world") == "OK\n"
    assert cli(address, "GET", "greeting") == "hello world\n"
    assert cli(address, "--no-raw", "INCR", "n") == "(integer) 1\n"
    assert cli(address, "--no-raw", "GET", "missing") == "(nil)\n"
    # In raw mode redis-cli follows an error with an empty line.
    assert cli(address, "INCR", "greeting") == "ERR value is not an integer or out of range\n\n"
    assert cli(address, "--no-raw", "KEYS", "*e*") == '1) "greeting"\n'
    assert cli(address, "DBSIZE") == "2\n"


def test_redis_cli_reads_commands_from_stdin(address: tuple[str, int]) -> None:
    out = cli(address, stdin=b"SET x 41\nINCR x\nfoo bar\nEXPIRE x 100\nTTL x\nQUIT\n")
    assert out.splitlines() == [
        "OK",
        "42",
        "ERR unknown command 'foo', with args beginning with: 'bar' ",
        "",
        "1",
        "100",
    ]  # redis-cli leaves at QUIT without printing its reply


def test_redis_cli_pipe_mass_insertion(address: tuple[str, int]) -> None:
    data = b"".join(
        b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(k), k, len(v), v)
        for k, v in ((b"key:%d" % i, b"value:%d" % i) for i in range(10_000))
    )
    out = cli(address, "--pipe", stdin=data)
    assert "errors: 0, replies: 10000" in out
    assert cli(address, "DBSIZE") == "10000\n"
    assert cli(address, "GET", "key:9999") == "value:9999\n"


def test_redis_cli_resp3_is_refused_politely(address: tuple[str, int]) -> None:
    need("redis-cli")
    host, port = address
    done = subprocess.run(
        ["redis-cli", "-h", host, "-p", str(port), "-3", "PING"],
        capture_output=True,
        timeout=60,
    )
    assert "NOPROTO unsupported protocol version" in (done.stdout + done.stderr).decode()


# -- the redis Python client ------------------------------------------------------------------------
@pytest.mark.filterwarnings("error")
def test_redis_py_commands_and_errors(address: tuple[str, int]) -> None:
    r = client(address, client_name="tester")
    try:
        assert r.ping() is True
        assert r.client_getname() == "tester"
        assert r.set("k", "v") is True
        assert r.get("k") == b"v"
        assert r.set("k", "w", nx=True) is None
        assert r.mset({"a": 1, "b": 2}) is True
        assert r.mget("a", "b", "nope") == [b"1", b"2", None]
        assert r.incrby("a", 41) == 42
        assert r.exists("a", "b", "nope") == 2
        assert sorted(r.keys("?")) == [b"a", b"b", b"k"]
        assert r.delete("a", "nope") == 1
        assert r.config_get("appendonly") == {"appendonly": "no"}
        assert r.rpush("list", "x", "y") == 2
        assert r.lrange("list", 0, -1) == [b"x", b"y"]
        with pytest.raises(redis.ResponseError, match="^WRONGTYPE Operation against a key"):
            r.get("list")
        with pytest.raises(redis.ResponseError, match="value is not an integer or out of range"):
            r.incr("k")
        with pytest.raises(redis.ResponseError, match="unknown command 'FOO', with args"):
            r.execute_command("FOO", "a")
        with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'get'"):
            r.execute_command("GET")
        assert r.dbsize() == 3
        assert r.flushdb() is True
        assert r.dbsize() == 0
    finally:
        r.close()


@pytest.mark.filterwarnings("error")
def test_redis_py_pipelines(address: tuple[str, int]) -> None:
    r = client(address)
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(500):
            pipe.set(f"p{i}", i)
            pipe.incr("count")
        pipe.get("p250")
        results = pipe.execute()
        assert results[:-1] == [x for i in range(500) for x in (True, i + 1)]
        assert results[-1] == b"250"
        with r.pipeline(transaction=False) as pipe:
            pipe.get("p1").get("nope").lpush("p2", "x").get("count")
            out = pipe.execute(raise_on_error=False)
        assert out[:2] == [b"1", None]
        assert isinstance(out[2], redis.ResponseError)
        assert out[3] == b"500"
    finally:
        r.close()


@pytest.mark.filterwarnings("error")
def test_redis_py_ttls_and_expiry(address: tuple[str, int]) -> None:
    r = client(address)
    try:
        assert r.set("ex", "v", ex=100) is True
        assert r.ttl("ex") == 100
        assert 99_000 < r.pttl("ex") <= 100_000
        assert r.persist("ex") is True
        assert r.ttl("ex") == -1
        assert r.ttl("missing") == -2
        start = time.monotonic()
        assert r.set("px", "v", px=150) is True
        assert r.get("px") == b"v"
        # Poll (bounded in time) until the key is gone; it must not go before its 150 ms.
        deadline = start + 10
        while r.get("px") is not None:
            assert time.monotonic() < deadline, "PX 150 key still there after 10 s"
        assert time.monotonic() - start >= 0.15
        assert r.exists("px") == 0
    finally:
        r.close()


def test_redis_py_resp3_is_refused(address: tuple[str, int]) -> None:
    r = client(address, protocol=3)
    try:
        with pytest.raises(redis.RedisError, match="unsupported protocol version"):
            r.ping()
    finally:
        r.close()


# -- redis-benchmark ----------------------------------------------------------------------------------
def test_redis_benchmark_completes_without_errors(address: tuple[str, int]) -> None:
    need("redis-benchmark")
    host, port = address
    done = subprocess.run(
        ["redis-benchmark", "-h", host, "-p", str(port), "-q", "-n", "10000",
         "-t", "ping,set,get"],
        capture_output=True,
        timeout=100,
        check=True,
    )  # fmt: skip
    out = (done.stdout + done.stderr).decode().replace("\r", "\n")
    finals = [line for line in out.splitlines() if "requests per second" in line]
    assert [line.split(":")[0].strip() for line in finals] == [
        "PING_INLINE",
        "PING_MBULK",
        "SET",
        "GET",
    ]
    assert "ERR" not in out
    assert "WARNING" not in out


# -- the other models ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("error")
def test_sync_server_serves_one_client_at_a_time() -> None:
    server_class = getattr(statemux, "TCPServer", None)
    if not isinstance(server_class, type):
        pytest.skip("statemux has no synchronous TCPServer")
    with serving(server_class(("127.0.0.1", 0), build())) as addr:
        for _ in range(2):  # one client after the other, same store
            r = client(addr)
            try:
                assert r.incr("n") in (1, 2)
                assert r.set("px", "v", px=50) is True
            finally:
                r.close()
        r = client(addr)
        try:
            assert r.get("n") == b"2"
        finally:
            r.close()


def test_forking_refuses_the_shared_store() -> None:
    assert Resp.shares_memory is True
    server_class = getattr(statemux, "ForkingTCPServer", None)
    if isinstance(server_class, type):
        with pytest.raises(Exception, match="shares memory") as refused:
            server_class(("127.0.0.1", 0), build()).server_close()
        assert "Resp" in str(refused.value)

    from statemux.cli import refusal

    why = refusal("forking", 1, Resp, "resp")
    assert why is not None and "shares memory" in why
    assert refusal("multiplex", 1, Resp, "resp") is None
