"""The benchmark harness: its parsers, its accounting, its fallback machines and baselines,
and one bounded smoke run end to end (real servers, the built-in load generator, a plot)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from statemux import CloseReason
from statemux.bench import main, proc, report, tools
from statemux.bench.baselines import cut_command, http_reply, resp_reply
from statemux.bench.loadgen import count_http, count_resp, hold_idle, percentile, resp_batches
from statemux.bench.machines import MAX_HEAD, http_factory, http_response, resp_factory
from statemux.bench.runner import MODES, SERVERS, Progress, Row, _redis_result, plan, split_cpus
from statemux.testing import chunkings, transcript

pytestmark = pytest.mark.timeout(60)

BODY = b"Hello, world!"


# -- the smoke run --------------------------------------------------------------------------------
def test_smoke_run_prints_a_table_with_figures_and_writes_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    status = main(["--smoke", "--loadgen", "builtin", "--out", str(out)])
    printed = capsys.readouterr()
    assert status == 0
    assert "| workload | server" in printed.out
    assert "### Targets" in printed.out
    # progress went to stderr, one line per measurement
    assert "[ 1/" in printed.err
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    loaded = [r for r in rows if r["conns"]]
    assert {r["workload"] for r in loaded} == {"http", "resp", "resp-p16"}
    assert {r["key"] for r in loaded} == {"multiplex", "asyncio"}
    for r in loaded:
        assert r["requests"] > 0, r
        assert r["rps"] > 0 and r["cpu_us"] > 0 and r["peak_rss"] > 0, r
        assert r["p99_ms"] >= r["p50_ms"] > 0, r
        assert r["loadgen"].startswith("built-in")
    idle = [r for r in rows if r["idle"] and r["idle_bytes"] is not None]
    assert idle and all(r["idle_bytes"] > 0 for r in idle)
    assert results["environment"]["load_generators"] == ["built-in (3 procs)"]
    assert (out / "results.md").read_text().startswith("## statemux bench (smoke)")
    pytest.importorskip("matplotlib")
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (out / "bench.svg").read_text().lstrip().startswith("<?xml")


def test_unknown_server_names_are_refused_with_the_choices() -> None:
    with pytest.raises(SystemExit, match="unknown server: nginx .choose from multiplex"):
        main(["--smoke", "--servers", "nginx"])


# -- the plan ----------------------------------------------------------------------------------
def test_quick_plan_bounds_forking_and_sync_and_holds_idle_where_it_says() -> None:
    jobs = plan("quick", list(SERVERS), ["http", "resp", "resp-p16"], 2.0)
    steps = {(j.server.key, j.protocol): j.steps for j in jobs}
    assert [s.conns for s in steps[("sync", "http")]] == [1]
    assert max(s.conns for s in steps[("forking", "http")]) <= 100
    # forking refuses a shared store, sync serves one client at a time: no RESP for them
    assert ("forking", "resp") not in steps and ("sync", "resp") not in steps
    held = steps[("multiplex", "http")][-1]
    assert (held.conns, held.idle) == (MODES["quick"].active, MODES["quick"].idle)
    assert steps[("asyncio", "http")][-1].conns == 0  # idle memory only
    assert [s.workload for s in steps[("multiplex", "resp")]] == ["resp", "resp-p16"]


def test_split_cpus_without_pinning_pins_nothing() -> None:
    assert split_cpus(pin=False) == ([], [])
    server, client = split_cpus(pin=True)
    if len(os.sched_getaffinity(0)) >= 2:
        assert server and client and not set(server) & set(client)


# -- parsing what the external tools print -------------------------------------------------------
WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:40000/hello.txt
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.31ms    1.01ms  15.44ms   94.11%
    Req/Sec    40.99k     8.64k   58.33k    70.00%
  Latency Distribution
     50%  456.00us
     75%    1.32ms
     90%    1.78ms
     99%    5.69ms
  81250 requests in 2.00s, 15.58MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  40594.43
"""


def test_wrk_output_gives_requests_elapsed_percentiles_and_errors() -> None:
    assert tools.parse_wrk(WRK_OUTPUT) == {
        "requests": 81250,
        "elapsed": 2.0,
        "p50_ms": pytest.approx(0.456),
        "p99_ms": pytest.approx(5.69),
        "errors": 7,
    }


@pytest.mark.parametrize(
    ("text", "ms"), [("456.00us", 0.456), ("1.32ms", 1.32), ("1.20s", 1200.0), ("2m", 120000.0)]
)
def test_wrk_durations(text: str, ms: float) -> None:
    assert tools.parse_duration_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize(
    ("text", "error"),
    [("", "wrk printed no 'N requests in T' line"), ("12 requests", "wrk printed no")],
)
def test_wrk_output_without_a_result_is_an_error(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        tools.parse_wrk(text)


REDIS_CSV = """"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"PING_MBULK","100000.00","0.494","0.120","0.447","0.871","1.087","1.319"
"SET","50000.00","0.707","0.160","0.687","1.199","1.639","4.743"
"GET","80000.00","0.744","0.176","0.743","0.975","1.383","2.287"
WARNING: Could not fetch server CONFIG
"""


def test_redis_benchmark_rows_merge_into_one_result() -> None:
    tests = tools.parse_redis_benchmark(REDIS_CSV)
    assert [t["test"] for t in tests] == ["PING_MBULK", "SET", "GET"]
    merged = _redis_result(REDIS_CSV, per_test=10_000)
    assert merged["requests"] == 30_000
    assert merged["elapsed"] == pytest.approx(0.1 + 0.2 + 0.125)
    assert merged["p50_ms"] == pytest.approx(0.743)  # the slowest command's
    assert merged["p99_ms"] == pytest.approx(1.639)


def test_redis_benchmark_without_csv_is_an_error() -> None:
    with pytest.raises(ValueError, match="redis-benchmark printed no CSV results"):
        tools.parse_redis_benchmark("WARNING: Could not fetch server CONFIG\n")


def test_tool_command_lines_are_bounded() -> None:
    cmd = tools.wrk_command("http://127.0.0.1:1/x", conns=1, seconds=0, threads=4)
    assert cmd[:4] == ["wrk", "-t1", "-c1", "-d1s"]  # never more threads than connections
    cmd = tools.redis_benchmark_command(6380, 50, 1000, 16)
    assert cmd[cmd.index("-n") + 1] == "1000" and cmd[cmd.index("-P") + 1] == "16"
    assert cmd[cmd.index("-t") + 1] == "ping_mbulk,set,get"


# -- the built-in load generator's reply counting ----------------------------------------------
HTTP_REPLIES = (
    http_response(BODY)
    + b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno\n"
    + b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nConnection: close\r\n\r\n"
)


@pytest.mark.parametrize("chunks", list(chunkings(HTTP_REPLIES)), ids=lambda c: f"{len(c)}pieces")
def test_http_replies_are_counted_however_they_arrive(chunks: list[bytes]) -> None:
    buf = bytearray()
    total = bad = 0
    close = False
    for chunk in chunks:
        buf += chunk
        n, b, c = count_http(buf)
        total, bad = total + n, bad + b
        close = c if n else close
    assert (total, bad, close, bytes(buf)) == (3, 1, True, b"")


RESP_REPLIES = b"+PONG\r\n+OK\r\n$3\r\nxxx\r\n$-1\r\n-ERR unknown\r\n:42\r\n$0\r\n\r\n"


@pytest.mark.parametrize("chunks", list(chunkings(RESP_REPLIES)), ids=lambda c: f"{len(c)}pieces")
def test_resp_replies_are_counted_however_they_arrive(chunks: list[bytes]) -> None:
    buf = bytearray()
    total = bad = 0
    for chunk in chunks:
        buf += chunk
        n, b, _ = count_resp(buf)
        total, bad = total + n, bad + b
    assert (total, bad, bytes(buf)) == (7, 1, b"")


@pytest.mark.parametrize("pipeline", [1, 2, 3, 16])
def test_resp_batches_cycle_ping_set_get(pipeline: int) -> None:
    batches = resp_batches(b"k", pipeline)
    sent = b"".join(batches[i % len(batches)] for i in range(3))
    commands = [c for c in sent.split(b"*")[1:]]
    names = [c.split(b"\r\n")[2] for c in commands]
    assert len(names) == 3 * pipeline
    assert names[:3] == [b"PING", b"SET", b"GET"]
    assert names == [b"PING", b"SET", b"GET"] * pipeline


def test_percentiles_of_a_histogram() -> None:
    hist = Counter({100: 50, 200: 49, 5000: 1})
    assert percentile(hist, 50) == 100
    assert percentile(hist, 99) == 200
    assert percentile(hist, 100) == 5000
    assert percentile(Counter(), 99) == 0.0


def test_idle_holder_opens_every_connection(raise_nofile: object) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        held = hold_idle("127.0.0.1", listener.getsockname()[1], 40, batch=16)
        try:
            assert len(held) == 40
            assert all(s.getpeername() == listener.getsockname() for s in held)
        finally:
            for s in held:
                s.close()


# -- /proc accounting ------------------------------------------------------------------------------
def test_stat_fields_are_read_after_a_command_name_with_spaces_and_parens() -> None:
    fields = ["S", "77"] + ["0"] * 9 + ["300", "100", "50", "50"] + ["0"] * 30
    text = "123 (we (ird) name) " + " ".join(fields)
    ppid, cpu = proc.parse_stat(text)
    assert ppid == 77
    assert cpu == pytest.approx(500 * proc.TICK)


def test_tree_accounting_sees_a_child_process() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in proc.descendants(os.getpid())
        hwm, rss = proc.tree_memory(os.getpid())
        assert hwm >= rss > 1_000_000
        procs, pss = proc.tree_pss(os.getpid())
        assert procs >= 2 and pss > 0
        assert proc.tree_cpu(os.getpid()) > 0
        assert proc.fd_count(os.getpid()) > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
    assert proc.fd_count(child.pid) == 0


# -- targets and the table ------------------------------------------------------------------------
def _row(
    workload: str,
    key: str,
    conns: int,
    cpu: float,
    rps: float = 1000.0,
    idle: int = 0,
    idle_bytes: float | None = None,
) -> Row:
    return Row(workload, SERVERS[key].label, key, conns, idle=idle, rps=rps, cpu_us=cpu,
               requests=int(rps), p50_ms=0.1, p99_ms=1.0, idle_bytes=idle_bytes)  # fmt: skip


def test_targets_are_reported_with_their_ratios() -> None:
    rows = [
        _row("http", "multiplex", 50, 10.0),
        _row("http", "asyncio", 50, 20.0),
        _row("http", "uvloop", 50, 8.0),
        _row("resp-p16", "multiplex", 50, 3.2),
        _row("resp-p16", "asyncio", 50, 4.0),
        _row("http", "multiplex", 100, 10.0),
        _row("http", "multiplex", 100, 11.5, idle=1000, idle_bytes=900.0),
        _row("resp-p16", "threading", 50, 2.0, rps=300_000),
        _row("resp-p16", "stdlib-threading", 50, 9.0, rps=50_000),
    ]
    got = {t.name: t for t in report.evaluate(rows, idle=1000)}
    assert got["T1a"].status == "reached" and got["T1a"].ratio == pytest.approx(0.5)
    assert got["T1b"].status == "not reached" and got["T1b"].ratio == pytest.approx(1.25)
    assert got["T1b"].profile == "http"  # a missed multiplex target asks for a profile
    assert got["T2"].status == "not reached" and got["T2"].ratio == pytest.approx(0.8)
    assert got["T3"].status == "reached" and "900 B per connection" in got["T3"].detail
    assert got["T4"].status == "not reached" and got["T4"].ratio == pytest.approx(1.15)
    assert got["T5"].status == "reached" and got["T5"].ratio == pytest.approx(6.0)


def test_a_target_missing_a_figure_is_not_applicable_and_says_which() -> None:
    got = {t.name: t for t in report.evaluate([_row("http", "multiplex", 50, 10.0)], idle=1000)}
    assert got["T1a"].status == "n/a"
    assert got["T1a"].detail == "not measured: asyncio http c=50"
    assert got["T3"].status == "n/a"


def test_table_shows_dashes_for_what_a_row_did_not_measure() -> None:
    rows = [
        _row("http", "multiplex", 50, 12.34),
        Row("http", "asyncio Protocol", "asyncio", 0, idle=1000, idle_bytes=1831.0),
    ]
    text = report.table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| workload | server")
    assert "12.3" in lines[2] and "1,000 idle" in lines[3] and "1,831" in lines[3]
    assert lines[3].count("—") >= 5


def test_progress_without_a_terminal_prints_one_line_per_step() -> None:
    import io

    stream = io.StringIO()
    progress = Progress(stream, total=2)
    progress.begin("http c=1")
    progress.update("1.0/2s")
    progress.end("done")
    assert stream.getvalue() == "[ 1/2] http c=1  done\n"


# -- the fallback machines and the baselines ---------------------------------------------------------
REQUEST = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def site(tmp_path: Path) -> str:
    (tmp_path / "hello.txt").write_bytes(BODY)
    return str(tmp_path)


@pytest.mark.parametrize("chunks", list(chunkings(REQUEST * 2)), ids=lambda c: f"{len(c)}pieces")
def test_minimal_http_machine_answers_pipelined_gets_however_they_arrive(
    site: str, chunks: list[bytes]
) -> None:
    out, conn = transcript(http_factory(site), chunks)
    assert out == http_response(BODY) * 2
    assert not conn.closed


# (request, exact reply, closes)
HTTP_CASES = [
    (b"GET /nope HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nContent-Type: text/plain\r\n\r\nnot found\n", False),
    (b"POST /hello.txt HTTP/1.1\r\n\r\n", b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 19\r\nAllow: GET\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nmethod not allowed\n", True),
    (b"GET /hello.txt HTTP/1.1\r\nConnection: close\r\n\r\n", http_response(BODY), True),
    (b"GET /hello.txt HTTP/1.0\r\n\r\n", http_response(BODY), True),
    (b"GET /" + b"x" * MAX_HEAD, b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", True),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "reply", "closes"), HTTP_CASES)
def test_minimal_http_machine_and_baseline_agree(
    site: str, request_: bytes, reply: bytes, closes: bool
) -> None:
    out, conn = transcript(http_factory(site), [request_])
    assert out == reply
    assert conn.closed == closes
    if len(request_) < MAX_HEAD:
        from statemux.bench.machines import load_files

        assert http_reply(load_files(site), request_) == (reply, closes)


RESP_SESSION = b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nxxx\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\nGET nokey\r\n"
RESP_ANSWER = b"+PONG\r\n+OK\r\n$3\r\nxxx\r\n$-1\r\n"


@pytest.mark.parametrize("chunks", list(chunkings(RESP_SESSION)), ids=lambda c: f"{len(c)}pieces")
def test_minimal_resp_machine_answers_however_commands_arrive(chunks: list[bytes]) -> None:
    out, conn = transcript(resp_factory(), chunks)
    assert out == RESP_ANSWER
    assert not conn.closed


def test_resp_baseline_parser_agrees_with_the_machine() -> None:
    buf = bytearray(RESP_SESSION)
    store: dict[bytes, bytes] = {}
    replies = []
    while (args := cut_command(buf)) is not None:
        replies.append(resp_reply(store, args))
    assert b"".join(replies) == RESP_ANSWER
    assert buf == b""


# (input, exact reply) — the connection closes after each
RESP_MALFORMED = [
    (b"*x\r\n", b"-ERR Protocol error\r\n"),
    (b"*1\r\n+PING\r\n", b"-ERR Protocol error: expected '$'\r\n"),
    (b"*1\r\n$y\r\n", b"-ERR Protocol error\r\n"),
    (b"*1\r\n$70000\r\n", b"-ERR Protocol error: RESP bulk longer than 65536 bytes\r\n"),
]


@pytest.mark.parametrize(("data", "reply"), RESP_MALFORMED)
def test_minimal_resp_machine_refuses_malformed_commands(data: bytes, reply: bytes) -> None:
    out, conn = transcript(resp_factory(), [data])
    assert out == reply
    assert conn.close_reason is CloseReason.NORMAL


@pytest.mark.parametrize(("data", "reply"), RESP_MALFORMED)
def test_resp_baseline_parser_refuses_the_same_input(data: bytes, reply: bytes) -> None:
    with pytest.raises(ValueError):
        cut_command(bytearray(data))


# -- cleanup -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_a_run_kills_every_server_and_load_generator(
    tmp_path: Path, signum: int
) -> None:
    cmd = [sys.executable, "-m", "statemux.bench", "--smoke", "--out", str(tmp_path)]
    bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert bench.stderr is not None
        ready, _, _ = select.select([bench.stderr], [], [], 30)
        assert ready, "the benchmark printed no progress"
        bench.stderr.readline()  # the plan
        ready, _, _ = select.select([bench.stderr], [], [], 30)
        assert ready and bench.stderr.readline().startswith(b"[ 1/")
        started = [pid for pid in proc.descendants(bench.pid) if pid != bench.pid]
        assert started, "no server process was running"
        bench.send_signal(signum)
        assert bench.wait(timeout=30) == 130
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        if bench.stderr is not None:
            bench.stderr.close()
    left = [pid for pid in started if _running(pid)]
    assert left == [], f"still running after the benchmark stopped: {left}"


def _running(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (dead, waiting to be reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
