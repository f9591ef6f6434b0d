"""Unix socket files: modes, stale and live files, removal on close, path limits — the same
for every model."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Iterator
from typing import Any

import pytest

import statemux
from statemachines.echo import DatagramEcho, Echo
from statemux.sockets import UNIX_PATH_MAX
from statemux.testing import serving

pytestmark = pytest.mark.timeout(20)

MODELS = ["", "Threading", "Forking", "Multiplexing"]
MODEL_IDS = ["sync", "threading", "forking", "multiplexing"]
FAMILIES = ["UnixStream", "UnixDatagram"]


def server_class(model: str, family: str) -> Any:
    return getattr(statemux, f"{model}{family}Server")


def factory_for(family: str) -> Any:
    return DatagramEcho if family == "UnixDatagram" else Echo


def mode_of(path: str | bytes) -> int:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode)


def echo_over(path: str, family: str, tmp: str) -> bytes:
    if family == "UnixStream":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"ping\n")
            reply = s.recv(100)
            # Hang up explicitly: a forked child holds a copy of this socket too.
            s.shutdown(socket.SHUT_RDWR)
            return reply
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.bind(os.path.join(tmp, "client"))
        s.sendto(b"ping\n", path)
        return s.recv(100)


def stale_socket_file(path: str, kind: int = socket.SOCK_STREAM) -> int:
    """Leave a socket file nobody listens on, as a server that died would; its inode."""
    with socket.socket(socket.AF_UNIX, kind) as s:
        s.bind(path)
    return os.lstat(path).st_ino


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# -- modes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_socket_files_are_owner_only_by_default_and_serve(
    model: str, family: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "srv.sock")
    with umask(0):  # the loosest umask: the mode must not depend on it
        srv = server_class(model, family)(path, factory_for(family))
    with srv, serving(srv):
        assert mode_of(path) == 0o600
        assert srv.server_address == path
        assert os.listdir(short_tmp) == ["srv.sock"]  # no private directory left behind
        assert echo_over(path, family, short_tmp) == b"ping\n"
    assert not os.path.exists(path)


@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_socket_mode_is_configurable(model: str, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "srv.sock")
    with server_class(model, "UnixStream")(path, Echo, socket_mode=0o660):
        assert mode_of(path) == 0o660

    class GroupWritable(server_class(model, "UnixDatagram")):  # type: ignore[misc]
        socket_mode = 0o620

    with GroupWritable(path, DatagramEcho):
        assert mode_of(path) == 0o620


@pytest.mark.parametrize("bad", [0o1777, -1, "0600", 1.5])
def test_a_bad_socket_mode_is_refused(bad: Any, short_tmp: str) -> None:
    with pytest.raises(ValueError, match="socket_mode must be a permission mode like 0o600"):
        statemux.UnixStreamServer(os.path.join(short_tmp, "s"), Echo, socket_mode=bad)
    assert os.listdir(short_tmp) == []


def test_the_umask_is_left_alone(short_tmp: str) -> None:
    with umask(0o027):
        with statemux.ThreadingUnixStreamServer(os.path.join(short_tmp, "s"), Echo):
            assert os.umask(0o027) == 0o027


class SpyingSocket:
    """Records where a server's socket is bound and how open that place is at that moment."""

    def __init__(self, sock: socket.socket, seen: list[tuple[str, int, int]]) -> None:
        self._sock = sock
        self._seen = seen

    def bind(self, path: str) -> None:
        self._sock.bind(path)
        directory = os.path.dirname(path)
        self._seen.append((directory, stat.S_IMODE(os.stat(directory).st_mode), mode_of(path)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_the_file_is_never_reachable_more_open_than_its_mode(model: str, short_tmp: str) -> None:
    os.chmod(short_tmp, 0o755)  # a shared directory, where others could reach a new file
    seen: list[tuple[str, int, int]] = []

    class Spied(server_class(model, "UnixStream")):  # type: ignore[misc]
        def server_bind(self) -> None:
            real = self.socket
            self.socket = SpyingSocket(real, seen)
            try:
                super().server_bind()
            finally:
                self.socket = real

    with umask(0):
        with Spied(os.path.join(short_tmp, "srv.sock"), Echo):
            pass
    ((directory, dir_mode, file_mode),) = seen
    # Bound inside a private directory next to the target, with whatever mode the umask
    # gave; only then given its mode and moved into place.
    assert os.path.dirname(directory) == short_tmp and directory != short_tmp
    assert dir_mode == 0o700
    assert file_mode == 0o777


# -- stale and live files --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_a_stale_file_left_by_a_dead_server_is_replaced(
    model: str, family: str, short_tmp: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="statemux")
    path = os.path.join(short_tmp, "srv.sock")
    kind = socket.SOCK_DGRAM if family == "UnixDatagram" else socket.SOCK_STREAM
    old = stale_socket_file(path, kind)
    with server_class(model, family)(path, factory_for(family)) as srv, serving(srv):
        assert os.lstat(path).st_ino != old
        assert echo_over(path, family, short_tmp) == b"ping\n"
    assert "replacing stale socket file" in caplog.text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("first", "second"), [("Multiplexing", ""), ("Threading", "Forking"), ("", "Multiplexing")]
)
def test_a_live_servers_socket_is_never_deleted(
    first: str, second: str, family: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "srv.sock")
    with server_class(first, family)(path, factory_for(family)) as live, serving(live):
        inode = os.lstat(path).st_ino
        with pytest.raises(
            OSError, match=f"a server is listening on {path}; not replacing"
        ) as info:
            server_class(second, family)(path, factory_for(family))
        assert info.value.errno == errno.EADDRINUSE
        assert os.listdir(short_tmp) == ["srv.sock"]
        assert os.lstat(path).st_ino == inode
        assert echo_over(path, family, short_tmp) == b"ping\n"


@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_refusing_a_live_socket_leaks_nothing(model: str, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "srv.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()  # the probe waits in its backlog: no descriptor of ours changes
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(OSError, match="a server is listening on"):
            server_class(model, "UnixStream")(path, Echo)
        assert len(os.listdir("/proc/self/fd")) == before
        assert os.listdir(short_tmp) == ["srv.sock"]


def test_a_live_socket_of_the_other_type_is_not_deleted_either(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "srv.sock")
    with statemux.UnixStreamServer(path, Echo):
        with pytest.raises(OSError, match="is in use or cannot be probed") as info:
            statemux.UnixDatagramServer(path, DatagramEcho)
        assert info.value.errno == errno.EADDRINUSE
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_something_that_is_not_a_socket_is_never_replaced(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "srv.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(FileExistsError, match="exists and is not a socket; not replacing it"):
        statemux.MultiplexingUnixStreamServer(path, Echo)
    with open(path) as f:
        assert f.read() == "precious"
    os.symlink("/nonexistent", os.path.join(short_tmp, "link"))
    with pytest.raises(FileExistsError, match="is not a socket"):
        statemux.UnixDatagramServer(os.path.join(short_tmp, "link"), DatagramEcho)
    assert os.path.islink(os.path.join(short_tmp, "link"))


# -- removal on close ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_the_file_is_removed_on_close_only_if_still_ours(model: str, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "srv.sock")
    srv = server_class(model, "UnixStream")(path, Echo)
    # Someone else took the path over (removed our file, bound their own).
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as theirs:
        theirs.bind(path)
        inode = os.lstat(path).st_ino
        srv.server_close()
        assert os.lstat(path).st_ino == inode


def test_a_forked_child_never_removes_the_file(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "srv.sock")
    with statemux.ForkingUnixStreamServer(path, Echo) as srv, serving(srv):
        for _ in range(2):
            assert echo_over(path, "UnixStream", short_tmp) == b"ping\n"
        assert srv.wait_idle(5)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert not os.path.exists(path)


# -- path limits and other kinds of address --------------------------------------------------------
def deep_path(base: str, length: int) -> str:
    """A path of exactly ``length`` bytes under ``base`` (creating the directories)."""
    path = base
    while len(path) + 60 < length:
        path = os.path.join(path, "d" * 50)
        os.mkdir(path)
    name_len = length - len(path) - 1
    return os.path.join(path, "s" * name_len)


@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_a_path_longer_than_the_kernel_limit_is_a_clear_error(model: str, short_tmp: str) -> None:
    path = deep_path(short_tmp, UNIX_PATH_MAX + 1)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(
        ValueError, match=f"Unix socket path longer than 107 bytes \\(108 bytes\\): '{path}'"
    ):
        server_class(model, "UnixStream")(path, Echo)
    assert len(os.listdir("/proc/self/fd")) == before
    assert not os.path.exists(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_path_of_exactly_the_limit_works(family: str, short_tmp: str) -> None:
    path = deep_path(short_tmp, UNIX_PATH_MAX)
    assert len(path) == 107
    with server_class("Threading", family)(path, factory_for(family)) as srv, serving(srv):
        assert mode_of(path) == 0o600
        assert echo_over(path, family, short_tmp) == b"ping\n"
    assert not os.path.exists(path)


def test_bytes_paths_work(short_tmp: str) -> None:
    path = os.fsencode(os.path.join(short_tmp, "srv.sock"))
    with statemux.UnixStreamServer(path, Echo) as srv, serving(srv):
        assert srv.server_address == path
        assert mode_of(path) == 0o600
        assert echo_over(os.fsdecode(path), "UnixStream", short_tmp) == b"ping\n"
    assert not os.path.exists(path)


@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_abstract_addresses_have_no_file(model: str, short_tmp: str) -> None:
    name = f"\0statemux-test-{os.getpid()}-{model}"
    with server_class(model, "UnixStream")(name, Echo) as srv, serving(srv):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(name)
            s.sendall(b"abstract\n")
            assert s.recv(100) == b"abstract\n"
    assert os.listdir(short_tmp) == []


def test_dual_stack_is_for_ip_servers(short_tmp: str) -> None:
    with pytest.raises(
        ValueError, match="dual_stack=True needs an IP server class, not a Unix one"
    ):
        statemux.UnixStreamServer(os.path.join(short_tmp, "s"), Echo, dual_stack=True)


@pytest.mark.parametrize("model", MODELS, ids=MODEL_IDS)
def test_an_inherited_unix_socket_is_used_and_its_file_left_alone(
    model: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    with server_class(model, "UnixStream")(None, Echo, socket=listener) as srv, serving(srv):
        assert srv.server_address == path
        assert echo_over(path, "UnixStream", short_tmp) == b"ping\n"
    assert listener.fileno() == -1  # the server owned it and closed it
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # but the file is its creator's to remove
