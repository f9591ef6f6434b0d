"""Addresses and socket files, for every server family of every model.

:class:`SocketsMixIn` sits directly before a stdlib server class (``TCPServer``,
``UDPServer``, ``UnixStreamServer``, ``UnixDatagramServer``) and decides how its socket is
made:

- **IP addresses.** A host containing ``':'`` (``("::1", 0)``) makes an IPv6 socket; the
  class's ``address_family`` need not change. An IPv6 socket is IPv6-only unless
  ``dual_stack=True``, which listens on every IPv4 and IPv6 address of the host (the host
  must be ``""`` or ``"::"``; IPv4 peers then appear as ``::ffff:a.b.c.d``).
- **Unix socket files.** The socket is bound inside a private (0o700) directory created next
  to the target, given its final mode (``socket_mode``, default 0o600), then linked into
  place, so the file is never more open than asked, at any moment, without touching the
  process umask. A file left by a dead server (nothing accepts on it) is replaced; a live
  server's socket, or anything that is not a socket, is never touched (``OSError`` with
  ``EADDRINUSE``/``EEXIST``). On close the file is removed only if it is still the one this
  server bound (same device and inode) and only by the process that bound it. A path longer
  than :data:`UNIX_PATH_MAX` bytes is refused with ``ValueError``. Note: as the socket was
  bound under its private name, ``socket.getsockname()`` reports that name;
  ``server_address`` is the path peers use.
- **Inherited sockets** (systemd socket activation, a supervisor): pass ``socket=`` (a
  socket object) or ``fileno=`` (a descriptor). The socket is used as it is — never bound
  again, as with ``bind_and_activate=False`` — and ``server_activate()`` (``listen``) runs
  only when ``bind_and_activate`` is true (harmless on an already listening socket). The
  server owns it from then on and closes it in ``server_close()``; it never removes an
  inherited socket's file.

Callers pass these as keyword arguments to any server class: ``socket``, ``fileno``,
``dual_stack``, ``socket_mode``. Subclasses may set ``socket_mode`` and ``dual_stack`` as
class attributes, and may override ``server_bind``/``server_close`` (calling ``super()``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import socketserver
import stat
import tempfile
from typing import Any

__all__ = [
    "SocketsMixIn",
    "SOCKET_OPTIONS",
    "UNIX_PATH_MAX",
    "DEFAULT_SOCKET_MODE",
    "pop_socket_options",
    "unix_socket_path",
]

log = logging.getLogger("statemux")

#: Keyword arguments every server class accepts for its socket (see the module docstring).
SOCKET_OPTIONS = frozenset({"socket", "fileno", "dual_stack", "socket_mode"})
#: Longest Unix socket path in bytes: ``sun_path`` holds 108 bytes with the terminating NUL.
UNIX_PATH_MAX = 107
#: Mode of a Unix socket file unless ``socket_mode`` says otherwise: owner read/write only.
DEFAULT_SOCKET_MODE = 0o600

_AF_UNIX = getattr(socket, "AF_UNIX", None)
_WILDCARD_HOSTS = ("", "::", "0.0.0.0", None)


def pop_socket_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the :data:`SOCKET_OPTIONS` found in ``kwargs`` (for mix-ins whose
    other keyword arguments mean something else, such as limits)."""
    return {name: kwargs.pop(name) for name in SOCKET_OPTIONS if name in kwargs}


def unix_socket_path(address: Any) -> str | bytes | None:
    """The filesystem path of a Unix address, or ``None`` for an abstract (``"\\0name"``) or
    unnamed (``""``) address, which have no file. Raises ``ValueError`` past
    :data:`UNIX_PATH_MAX` bytes."""
    path = os.fspath(address)
    raw = os.fsencode(path)
    if len(raw) > UNIX_PATH_MAX:
        raise ValueError(
            f"Unix socket path longer than {UNIX_PATH_MAX} bytes ({len(raw)} bytes): {path!r}"
        )
    if not raw or raw.startswith(b"\0"):
        return None
    return path


def _is_ipv6_host(address: Any) -> bool:
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        return ":" in address[0]
    return False


class SocketsMixIn:
    """Socket creation, IPv6/dual-stack, Unix socket files and inherited sockets.

    Mix in directly before the stdlib server class. Its constructor replaces
    ``TCPServer.__init__`` (same signature plus the keyword arguments of
    :data:`SOCKET_OPTIONS`) and, like it, calls ``server_close()`` when binding or activating
    fails, so nothing leaks.
    """

    #: mode of a Unix socket file this server creates
    socket_mode: int = DEFAULT_SOCKET_MODE
    #: listen on IPv4 and IPv6 at once (IP families, wildcard host only)
    dual_stack: bool = False

    address_family: int
    socket_type: int
    server_address: Any
    socket: socket.socket

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
        *,
        socket: socket.socket | None = None,  # noqa: A002 - the socketserver attribute's name
        fileno: int | None = None,
        dual_stack: bool | None = None,
        socket_mode: int | None = None,
    ) -> None:
        inherited = socket
        if inherited is not None and fileno is not None:
            raise TypeError("give socket= or fileno=, not both")
        if socket_mode is not None:
            if not isinstance(socket_mode, int) or not 0 <= socket_mode <= 0o777:
                raise ValueError(
                    f"socket_mode must be a permission mode like 0o600, not {socket_mode!r}"
                )
            self.socket_mode = socket_mode
        if dual_stack is not None:
            self.dual_stack = bool(dual_stack)
        self._socket_file: tuple[str | bytes, int, int, int] | None = None
        if fileno is not None:
            inherited = _socket_module.socket(fileno=fileno)
        if inherited is not None:
            try:
                self._check_inherited(inherited)
            except BaseException:
                if fileno is not None:
                    inherited.detach()  # the descriptor stays the caller's
                raise
            base_init: Any = socketserver.BaseServer.__init__
            base_init(self, server_address, RequestHandlerClass)
            self.address_family = inherited.family
            self.socket = inherited
            try:
                self.server_address = inherited.getsockname()
                if bind_and_activate:
                    self.server_activate()  # type: ignore[attr-defined]
            except BaseException:
                self.server_close()  # type: ignore[attr-defined]
                raise
            return
        server_address = self._prepare_address(server_address)
        base_init = socketserver.BaseServer.__init__
        base_init(self, server_address, RequestHandlerClass)
        self.socket = _socket_module.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()  # type: ignore[attr-defined]
            except BaseException:
                self.server_close()  # type: ignore[attr-defined]
                raise

    # -- addresses -----------------------------------------------------------------------------
    def _prepare_address(self, address: Any) -> Any:
        family = self.address_family
        if family == _AF_UNIX:
            if self.dual_stack:
                raise ValueError("dual_stack=True needs an IP server class, not a Unix one")
            unix_socket_path(address)  # the length check, before anything is created
            return address
        if self.dual_stack:
            if not socket.has_dualstack_ipv6():
                raise OSError(
                    errno.EAFNOSUPPORT, "this host cannot listen on IPv4 and IPv6 at once"
                )
            host = address[0] if isinstance(address, tuple) else None
            if host not in _WILDCARD_HOSTS:
                raise ValueError(
                    "dual_stack=True listens on every IPv4 and IPv6 address; give the host "
                    f"'' or '::', not {host!r}"
                )
            self.address_family = socket.AF_INET6
            return ("::", *address[1:])
        if family == socket.AF_INET and _is_ipv6_host(address):
            self.address_family = socket.AF_INET6
        return address

    def _check_inherited(self, sock: socket.socket) -> None:
        cls = type(self).__name__
        if sock.type != self.socket_type:
            want = "SOCK_DGRAM" if self.socket_type == socket.SOCK_DGRAM else "SOCK_STREAM"
            raise ValueError(f"{cls} needs a {want} socket; the one given is {sock.type.name}")
        unix_class = type(self).address_family == _AF_UNIX
        if (sock.family == _AF_UNIX) != unix_class:
            want = "an AF_UNIX" if unix_class else "an AF_INET or AF_INET6"
            raise ValueError(f"{cls} needs {want} socket; the one given is {sock.family.name}")

    # -- binding -----------------------------------------------------------------------------------
    def server_bind(self) -> None:
        """Bind the socket: a Unix file through a private directory; an IPv6 socket as
        IPv6-only unless ``dual_stack``; anything else as the stdlib does. May be extended."""
        if self.address_family == _AF_UNIX:
            path = unix_socket_path(self.server_address)
            if path is not None:
                self._bind_socket_file(path)
                return
        elif self.address_family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            self.socket.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.dual_stack else 1
            )
        super().server_bind()  # type: ignore[misc]

    def _bind_socket_file(self, path: str | bytes) -> None:
        target = os.path.abspath(path)
        raw = isinstance(target, bytes)
        # mkdtemp makes the directory 0o700: nobody else can reach the socket inside it.
        private = tempfile.mkdtemp(prefix=b".smx" if raw else ".smx", dir=os.path.dirname(target))
        name = b"s" if raw else "s"
        temp = os.path.join(private, name)
        dirfd = -1
        try:
            bind_to: str | bytes = temp
            if len(os.fsencode(temp)) > UNIX_PATH_MAX:
                # The private directory's name made the path too long: reach it through its
                # descriptor, whose /proc name is short.
                dirfd = os.open(private, os.O_RDONLY | os.O_DIRECTORY)
                bind_to = f"/proc/self/fd/{dirfd}/s"
            self.socket.bind(bind_to)
            os.chmod(temp, self.socket_mode)
            self._place(temp, target)
        finally:
            if dirfd >= 0:
                os.close(dirfd)
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            os.rmdir(private)
        st = os.lstat(target)
        self._socket_file = (target, st.st_dev, st.st_ino, os.getpid())
        self.server_address = path

    def _place(self, temp: str | bytes, target: str | bytes) -> None:
        """Move the bound socket to ``target``, never over a live server's socket."""
        try:
            os.link(temp, target)  # atomic, and fails if anything is there
            return
        except FileExistsError:
            pass
        except OSError as exc:  # a filesystem without hard links: check, then rename
            log.debug("link(%r) failed (%s); renaming instead", target, exc)
        self._check_replaceable(target)
        os.replace(temp, target)

    def _check_replaceable(self, target: str | bytes) -> None:
        """Return if ``target`` is absent or a stale socket file; raise otherwise."""
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST, f"{os.fsdecode(target)} exists and is not a socket; not replacing it"
            )
        probe = _socket_module.socket(_AF_UNIX, self.socket_type)  # type: ignore[arg-type]
        probe.setblocking(False)
        try:
            probe.connect(target)
        except ConnectionRefusedError:
            log.info("replacing stale socket file %s (nothing accepts on it)", os.fsdecode(target))
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # EAGAIN (a full backlog), EPROTOTYPE (a live socket of another type), EACCES:
            # someone may be using it, so it is not ours to remove.
            raise OSError(
                errno.EADDRINUSE,
                f"{os.fsdecode(target)} is in use or cannot be probed ({exc.strerror}); "
                "not replacing it",
            ) from exc
        finally:
            probe.close()
        raise OSError(
            errno.EADDRINUSE,
            f"a server is listening on {os.fsdecode(target)}; not replacing its socket file",
        )

    # -- closing -----------------------------------------------------------------------------------
    def server_close(self) -> None:
        """Remove the socket file if it is still the one this process bound, then close the
        socket. Idempotent. May be extended."""
        record = self._socket_file
        self._socket_file = None
        if record is not None:
            path, dev, ino, pid = record
            if pid == os.getpid():
                try:
                    st = os.lstat(path)
                    if (st.st_dev, st.st_ino) == (dev, ino):
                        os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove socket file %s: %s", os.fsdecode(path), exc)
        super().server_close()  # type: ignore[misc]


_socket_module = socket
