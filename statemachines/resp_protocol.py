"""RESP2 wire format for the ``resp`` machine: the whole-command frame cutter, Redis's inline
argument splitting, reply encoders and Redis's glob matching.

The cutter, :class:`RespCommand`, is a :class:`~statemux.Framing`: it cuts one whole command
(an inline line or a ``*N`` multibulk) per frame and returns its arguments as a list of bytes,
so a pipelined command costs one handler call. Its limits are read from the machine's
``limits`` attribute (a :class:`RespLimits`), so each server may choose them.

Two paths, both O(bytes received):

* the fast path: when the buffer (up to :data:`FAST_BATCH_BYTES`) starts with whole ordinary
  multibulk commands, one ``bytes.split(b"\\r\\n")`` cuts all of them; they wait on the machine
  (``_ready``, ``_batched``) and are handed out one per frame;
* the careful path, for everything else (inline commands, values holding CRLF or longer than
  4 KiB, incomplete commands, errors): the arguments already parsed are removed from the
  receive buffer and kept on the machine (``_argv``, ``_need``, ``_bulk``, ``_size``), a value
  whose header was read waits for exactly its bytes, and ``buffer.scan`` records how far a
  header line (or an inline line) was already searched for its end. A command trickling in byte
  by byte is examined once, but for the two bytes that may straddle a CRLF.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import attrs

from statemux import FrameTooLong, ProtocolError
from statemux.framing import Framing, ReceiveBuffer

__all__ = [
    "RespLimits",
    "RespCommand",
    "split_inline",
    "Glob",
    "bulk",
    "integer",
    "array",
    "error",
    "OK",
    "PONG",
    "NIL",
    "EMPTY_ARRAY",
    "MAX_INLINE",
    "MAX_BULK",
    "MAX_ARGS",
    "MAX_COMMAND",
    "MAX_MEMORY",
    "MAX_KEYS",
    "EXPIRE_BATCH",
    "EXPIRE_INTERVAL",
]

#: Longest inline command line, and longest ``*N``/``$N`` header line (Redis: 64 KiB).
MAX_INLINE = 64 * 1024
#: Largest single argument (Redis ``proto-max-bulk-len``: 512 MB). 64 MiB holds any sane value
#: while a few concurrent maximal uploads (each held twice while parsing) still fit in memory.
MAX_BULK = 64 * 1024 * 1024
#: Most arguments in one multibulk command (Redis refuses more than 1024 * 1024 too).
MAX_ARGS = 1024 * 1024
#: Most argument bytes in one command (Redis ``client-query-buffer-limit``: 1 GB).
MAX_COMMAND = 128 * 1024 * 1024
#: Estimated store size beyond which writes get ``-OOM`` (Redis ``maxmemory``).
MAX_MEMORY = 256 * 1024 * 1024
#: Keys the store may hold; a write that would create one more gets ``-OOM``.
MAX_KEYS = 1_000_000
#: Expired keys removed per active-expiry pass (bounded work per timer callback).
EXPIRE_BATCH = 1000
#: Longest pause between active-expiry passes while keys with a TTL exist (Redis hz 10).
EXPIRE_INTERVAL = 0.1


#: Buffers up to this size are cut by the fast batch path (one ``split`` for many commands);
#: larger ones (a big value arriving) by the incremental path, which never copies the buffer.
FAST_BATCH_BYTES = 256 * 1024
#: Header tables of the fast path: ``*1``..``*64`` and ``$0``..``$4095``.
_FAST_MAX_COUNT = 64
_FAST_MAX_LENGTH = 4095


def _positive(inst: object, attr: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be positive, not {value!r}")


@attrs.frozen(kw_only=True)
class RespLimits:
    """Every bound the ``resp`` service enforces, with its default. One per server."""

    #: longest inline command and longest ``*N``/``$N`` header line, in bytes
    max_inline: int = attrs.field(default=MAX_INLINE, validator=_positive)
    #: largest argument, in bytes
    max_bulk: int = attrs.field(default=MAX_BULK, validator=_positive)
    #: most arguments in one command
    max_args: int = attrs.field(default=MAX_ARGS, validator=_positive)
    #: most argument bytes in one command
    max_command: int = attrs.field(default=MAX_COMMAND, validator=_positive)
    #: estimated bytes of keys and values beyond which writes are refused with -OOM
    max_memory: int = attrs.field(default=MAX_MEMORY, validator=_positive)
    #: most keys; a write that would create another is refused with -OOM
    max_keys: int = attrs.field(default=MAX_KEYS, validator=_positive)
    #: expired keys removed per active-expiry pass
    expire_batch: int = attrs.field(default=EXPIRE_BATCH, validator=_positive)
    #: seconds between active-expiry passes while keys with a TTL exist
    expire_interval: float = attrs.field(default=EXPIRE_INTERVAL, validator=_positive)


@functools.lru_cache(maxsize=8)
def header_tables(limits: RespLimits) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """``({b"*3": 3, ...}, {b"$5": 5, ...})`` for the fast path, within ``limits`` (a header
    outside them, legal or not, goes to the careful path, which knows every rule)."""
    top = min(_FAST_MAX_COUNT, limits.max_args)
    counts = {b"*%d" % n: n for n in range(1, top + 1)}
    top = min(_FAST_MAX_LENGTH, limits.max_bulk, limits.max_command // _FAST_MAX_COUNT)
    lengths = {b"$%d" % n: n for n in range(top + 1)}
    # A header line longer than max_inline is refused by the careful path: leave it there.
    short = limits.max_inline
    return (
        {h: n for h, n in counts.items() if len(h) <= short},
        {h: n for h, n in lengths.items() if len(h) <= short},
    )


# -- replies ---------------------------------------------------------------------------------

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL = b"$-1\r\n"
NIL_ARRAY = b"*-1\r\n"
EMPTY_ARRAY = b"*0\r\n"
_SMALL_INTS = [b":%d\r\n" % i for i in range(-2, 1024)]


def bulk(value: bytes) -> bytes:
    """``$len\\r\\nvalue\\r\\n``."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def integer(n: int) -> bytes:
    """``:n\\r\\n`` (small values are preformatted)."""
    if -2 <= n < 1022:
        return _SMALL_INTS[n + 2]
    return b":%d\r\n" % n


def array(items: list[bytes]) -> bytes:
    """An array of bulk strings; ``None`` items become nil bulks."""
    parts = [b"*%d\r\n" % len(items)]
    for v in items:
        parts.append(NIL if v is None else b"$%d\r\n%b\r\n" % (len(v), v))
    return b"".join(parts)


def error(message: str | bytes) -> bytes:
    """An error reply. ``message`` starts with its code (``ERR``, ``WRONGTYPE`` ...); CR and LF
    become spaces, as Redis does, so an echoed argument cannot break the reply."""
    if isinstance(message, str):
        message = message.encode("utf-8", "surrogateescape")
    return b"-" + message.replace(b"\r", b" ").replace(b"\n", b" ") + b"\r\n"


# -- numbers -----------------------------------------------------------------------------------

_INT = re.compile(rb"-?[1-9][0-9]{0,18}|0")
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1


def to_int(b: bytes | bytearray) -> int | None:
    """Redis's ``string2ll``: an optional minus, digits without a leading zero, in int64;
    ``None`` otherwise (no spaces, no ``+``, no ``_``)."""
    if _INT.fullmatch(b) is None:
        return None
    n = int(b)
    return n if INT_MIN <= n <= INT_MAX else None


def _length(b: bytes | bytearray) -> int:
    """A non-negative ``$``/``*`` length, or -1 when it is not one (the caller decides)."""
    # Redis rejects leading zeros, signs and spaces here too (string2ll).
    if b.isdigit() and (b[0] != 48 or len(b) == 1) and len(b) < 20:
        return int(b)
    return -1


# -- inline commands -----------------------------------------------------------------------------

_INLINE_SLOW = re.compile(rb"[\"'\x00\x0b\x0c]")
_ISSPACE = b" \t\n\r\x0b\x0c"
_TOKEN_END = b" \n\r\t"
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX = b"0123456789abcdefABCDEF"
UNBALANCED = "unbalanced quotes in request"


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command the way Redis's ``sdssplitargs`` does.

    Blanks separate arguments; ``"..."`` understands ``\\n \\r \\t \\b \\a \\xHH`` and
    ``\\<any>``; ``'...'`` understands ``\\'`` only; a closing quote must be followed by a
    blank or the end. A NUL ends the line (Redis reads it as a C string). Raises
    :class:`ProtocolError` (``unbalanced quotes in request``) on an unterminated quote.
    """
    if _INLINE_SLOW.search(line) is None:
        return line.split()
    nul = line.find(b"\0")
    if nul >= 0:
        line = line[:nul]
    args: list[bytes] = []
    n = len(line)
    i = 0
    while True:
        while i < n and line[i] in _ISSPACE:
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        inq = insq = False
        while True:
            c = line[i] if i < n else 0
            if inq:
                if (
                    c == 92
                    and i + 3 < n
                    and line[i + 1] == 120
                    and (line[i + 2] in _HEX and line[i + 3] in _HEX)
                ):
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    cur.append(_ESCAPES.get(line[i], line[i]))
                elif c == 34:
                    if i + 1 < n and line[i + 1] not in _ISSPACE:
                        raise ProtocolError(UNBALANCED)
                    i += 1
                    break
                elif i >= n:
                    raise ProtocolError(UNBALANCED)
                else:
                    cur.append(c)
            elif insq:
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    i += 1
                    cur.append(39)
                elif c == 39:
                    if i + 1 < n and line[i + 1] not in _ISSPACE:
                        raise ProtocolError(UNBALANCED)
                    i += 1
                    break
                elif i >= n:
                    raise ProtocolError(UNBALANCED)
                else:
                    cur.append(c)
            else:
                if i >= n or c in _TOKEN_END:
                    break
                if c == 34:
                    inq = True
                elif c == 39:
                    insq = True
                else:
                    cur.append(c)
            i += 1
        args.append(bytes(cur))


# -- the frame cutter -------------------------------------------------------------------------------


class RespCommand(Framing):
    """Cuts one whole RESP command per frame and returns its arguments (``list[bytes]``).

    Reads its limits from ``machine.limits`` (:class:`RespLimits`) and keeps the arguments of a
    partly received multibulk command on the machine (see the module docstring). Raises
    :class:`FrameTooLong` when a size limit is passed (``what`` says which: ``inline request``,
    ``mbulk count string``, ``bulk count string``, ``bulk``, ``command``) and
    :class:`ProtocolError` on malformed input, with Redis's wording. Empty commands (a blank
    line, ``*0``, ``*-1``) are skipped, as Redis does.

    Used as a state's framing; callers never call :meth:`cut` themselves.
    """

    __slots__ = ()

    max_size = MAX_BULK

    def describe(self) -> str:
        return "one RESP command (inline line or *N multibulk)"

    def cut(self, buffer: ReceiveBuffer, machine: Any) -> list[bytes] | None:
        ready = machine._ready
        if ready is not None:
            args = ready.pop()
            if not ready:
                # The batch's bytes stay in the buffer until its last command is handed out,
                # so the runner sees unread input (and resumes) if its frame budget ends first.
                machine._ready = None
                del buffer.data[: machine._batched]
            return args
        data = buffer.data
        if machine._argv is not None:
            return self._resume(buffer, machine)
        if data and data[0] == 42 and not buffer.scan and len(data) <= FAST_BATCH_BYTES:
            ready = self._batch(data, machine)
            if ready is not None:
                args = ready.pop()
                if ready:
                    machine._ready = ready
                else:
                    del data[: machine._batched]
                return args
        while data:
            if data[0] != 42:  # not '*': an inline command
                args = self._inline(buffer, machine)
                if args is None:
                    return None
                if args:
                    return args
                continue
            end = data.find(b"\r\n", buffer.scan or 1)
            limits = machine.limits
            if end < 0:
                self._no_line_end(buffer, limits.max_inline, "mbulk count string")
                return None
            if end > limits.max_inline:
                raise FrameTooLong("mbulk count string", limits.max_inline, end)
            head = data[1:end]
            count = _length(head)
            if count < 0:
                if to_int(head) is None:
                    raise ProtocolError("invalid multibulk length")
                count = 0  # *-1 and other negative counts: an empty command, skipped
            if count > limits.max_args:
                raise ProtocolError(
                    f"invalid multibulk length (more than {limits.max_args} arguments)"
                )
            pos = end + 2
            buffer.scan = 0
            if count == 0:
                del data[:pos]
                continue
            args = self._args(buffer, machine, [], count, pos, 0)
            if args is not None:
                return args
            return None
        return None

    @staticmethod
    def _batch(data: bytearray, machine: Any) -> list[list[bytes]] | None:
        """Fast path: parse every whole, ordinary multibulk command at the front of ``data``
        with one ``split`` in C; stop at anything else (an inline command, a value containing
        CRLF, a header outside the precomputed tables, an incomplete command), which the
        careful path then handles. Returns the commands, last first (so ``pop()`` hands them
        out in order), or ``None`` if there was none; ``machine._batched`` is their size."""
        counts, lengths = machine.store.headers
        size = lengths.get
        lines = bytes(data).split(b"\r\n")
        last = len(lines) - 1  # lines[last] is not followed by CRLF: not a whole line
        i = 0
        ready: list[list[bytes]] = []
        append = ready.append
        # Each header must announce exactly its value's length; a value holding CRLF was split
        # in pieces and fails this, so binary values take the careful path. The common short
        # commands are spelled out: slicing and mapping cost more than they save there.
        while i < last:
            count = counts.get(lines[i])
            if count is None:
                break
            j = i + 1 + 2 * count
            if j > last:
                break
            if count == 1:
                a = lines[i + 2]
                if size(lines[i + 1]) != len(a):
                    break
                append([a])
            elif count == 2:
                a = lines[i + 2]
                b = lines[i + 4]
                if size(lines[i + 1]) != len(a) or size(lines[i + 3]) != len(b):
                    break
                append([a, b])
            elif count == 3:
                a = lines[i + 2]
                b = lines[i + 4]
                c = lines[i + 6]
                if (
                    size(lines[i + 1]) != len(a)
                    or size(lines[i + 3]) != len(b)
                    or size(lines[i + 5]) != len(c)
                ):
                    break
                append([a, b, c])
            else:
                args = lines[i + 2 : j : 2]
                if list(map(size, lines[i + 1 : j : 2])) != list(map(len, args)):
                    break
                append(args)
            i = j
        if not i:
            return None
        # Bytes of lines[i:] (joined by CRLF) are left; the rest was parsed.
        machine._batched = len(data) - sum(map(len, lines[i:])) - 2 * (last - i)
        ready.reverse()
        return ready

    def _resume(self, buffer: ReceiveBuffer, machine: Any) -> list[bytes] | None:
        data = buffer.data
        argv = machine._argv
        bulk_len = machine._bulk
        if bulk_len >= 0:
            # The header of this argument was consumed; wait for its bytes and CRLF.
            if len(data) < bulk_len + 2:
                return None
            argv.append(bytes(data[:bulk_len]))
            pos = bulk_len + 2
            need = machine._need - 1
            machine._bulk = -1
            if not need:
                del data[:pos]
                buffer.scan = 0
                machine._argv = None
                return argv
            return self._args(buffer, machine, argv, need, pos, machine._size)
        return self._args(buffer, machine, argv, machine._need, 0, machine._size)

    def _args(
        self,
        buffer: ReceiveBuffer,
        machine: Any,
        argv: list[bytes],
        need: int,
        pos: int,
        size: int,
    ) -> list[bytes] | None:
        """Parse ``need`` more bulk arguments from ``pos``; return the command when complete,
        or keep what was parsed on the machine and return ``None``."""
        data = buffer.data
        n = len(data)
        limits = machine.limits
        max_bulk = limits.max_bulk
        while True:
            if pos >= n:
                break
            if data[pos] != 36:  # '$'
                got = data[pos : pos + 1].replace(b"\r", b" ").replace(b"\n", b" ")
                raise ProtocolError(
                    f"expected '$', got '{got.decode('latin-1')}'",
                    reply=b"-ERR Protocol error: expected '$', got '" + bytes(got) + b"'\r\n",
                )
            end = data.find(b"\r\n", max(pos + 1, buffer.scan))
            if end < 0:
                # Only the header line is incomplete: remember how far it was searched.
                del data[:pos]
                pos = 0
                self._no_line_end(buffer, limits.max_inline, "bulk count string")
                break
            if end - pos > limits.max_inline:
                raise FrameTooLong("bulk count string", limits.max_inline, end - pos)
            length = _length(data[pos + 1 : end])
            if length < 0:
                raise ProtocolError("invalid bulk length")
            if length > max_bulk:
                raise FrameTooLong("bulk", max_bulk, length)
            size += length
            if size > limits.max_command:
                raise FrameTooLong("command", limits.max_command, size)
            start = end + 2
            stop = start + length
            if stop + 2 > n:
                # The header is complete, the value is not: consume the header and wait
                # for ``length + 2`` bytes without looking at them again.
                del data[:start]
                pos = 0
                buffer.scan = 0
                machine._argv = argv
                machine._need = need
                machine._bulk = length
                machine._size = size
                return None
            argv.append(bytes(data[start:stop]))
            pos = stop + 2
            need -= 1
            if not need:
                del data[:pos]
                buffer.scan = 0
                machine._argv = None
                return argv
        if pos:
            del data[:pos]
            buffer.scan = 0
        machine._argv = argv
        machine._need = need
        machine._bulk = -1
        machine._size = size
        return None

    @staticmethod
    def _no_line_end(buffer: ReceiveBuffer, limit: int, what: str) -> None:
        """No CRLF yet after the header at the buffer's start: check the limit, remember how
        far we searched (a trailing CR may be the first half of the CRLF)."""
        data = buffer.data
        n = len(data)
        pending = n - 1 if data[-1] == 13 else n
        if pending > limit:
            raise FrameTooLong(what, limit, pending)
        buffer.scan = max(n - 1, 1)

    @staticmethod
    def _inline(buffer: ReceiveBuffer, machine: Any) -> list[bytes] | None:
        data = buffer.data
        limit = machine.limits.max_inline
        nl = data.find(b"\n", buffer.scan)
        if nl < 0:
            n = len(data)
            if n > limit:
                raise FrameTooLong("inline request", limit, n)
            buffer.scan = n
            return None
        if nl > limit:
            raise FrameTooLong("inline request", limit, nl)
        line = bytes(data[:nl])
        del data[: nl + 1]
        buffer.scan = 0
        return split_inline(line)


# -- glob patterns -------------------------------------------------------------------------------------

_STAR = object()
_GLOB_SPECIAL = re.compile(rb"[*?\[\\]")


class Glob:
    """A Redis glob pattern (``KEYS``, ``CONFIG GET``), matched in O(len(key) × len(pattern)).

    ``*`` any run of bytes, ``?`` one byte, ``[abc]``, ``[^abc]``, ``[a-z]`` (reversed ranges
    are swapped) one byte of a set, ``\\x`` a literal ``x``; an unterminated ``[`` runs to the
    end of the pattern, a trailing ``\\`` is literal: Redis's ``stringmatchlen`` semantics.

    The pattern is cut at its stars into fixed-length pieces; the first must match at the start,
    the last at the end, and each middle piece at its leftmost place after the previous one.
    Leftmost placement is always right for ``*``, so there is no backtracking and a hostile
    pattern cannot make matching exponential (Redis's CVE-2022-36021).
    """

    __slots__ = (
        "pattern",
        "literal",
        "exact",
        "head",
        "tail",
        "middle",
        "min_len",
        "any",
        "tail_len",
    )

    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern
        #: the pattern itself when it has no special byte: matching is one dict lookup
        self.literal: bytes | None = None if _GLOB_SPECIAL.search(pattern) else pattern
        segments: list[list[bytes]] = [[]]
        for piece in self._parse(pattern):
            if piece is _STAR:
                segments.append([])
            else:
                segments[-1].append(piece)
        self.min_len = sum(len(s) for s in segments)
        self.exact: re.Pattern[bytes] | None = None
        self.head: re.Pattern[bytes] | None = None
        self.tail: re.Pattern[bytes] | None = None
        self.middle: list[re.Pattern[bytes]] = []
        self.any = False
        self.tail_len = 0
        if len(segments) == 1:
            self.exact = re.compile(b"".join(segments[0]), re.DOTALL)
            return
        first, *mids, last = segments
        self.any = self.min_len == 0
        if first:
            self.head = re.compile(b"".join(first), re.DOTALL)
        if last:
            self.tail = re.compile(b"".join(last), re.DOTALL)
        self.middle = [re.compile(b"".join(m), re.DOTALL) for m in mids if m]
        self.tail_len = len(last)

    @staticmethod
    def _parse(p: bytes) -> list[Any]:
        """Pieces: ``_STAR`` or a regex matching exactly one byte."""
        out: list[Any] = []
        i, n = 0, len(p)
        while i < n:
            c = p[i]
            if c == 42:  # *
                out.append(_STAR)
            elif c == 63:  # ?
                out.append(b".")
            elif c == 92:  # backslash
                if i + 1 < n:
                    i += 1
                out.append(re.escape(p[i : i + 1]))
            elif c == 91:  # [
                i += 1
                negate = i < n and p[i] == 94
                if negate:
                    i += 1
                members: list[bytes] = []
                while True:
                    if i < n and p[i] == 92 and i + 1 < n:
                        i += 1
                        members.append(re.escape(p[i : i + 1]))
                    elif i < n and p[i] == 93:
                        break
                    elif i >= n:
                        i -= 1  # unterminated: the class runs to the end
                        break
                    elif i + 2 < n and p[i + 1] == 45:  # a-z
                        lo, hi = sorted((p[i], p[i + 2]))
                        members.append(b"\\x%02x-\\x%02x" % (lo, hi))
                        i += 2
                    else:
                        members.append(re.escape(p[i : i + 1]))
                    i += 1
                body = b"".join(members)
                if negate:
                    out.append(b"[^" + body + b"]" if body else b".")
                else:
                    out.append(b"[" + body + b"]" if body else b"(?!)")
            else:
                out.append(re.escape(p[i : i + 1]))
            i += 1
        return out

    def match(self, key: bytes) -> bool:
        """True if ``key`` matches the whole pattern."""
        if self.exact is not None:
            return self.exact.fullmatch(key) is not None
        if self.any:
            return True
        n = len(key)
        if n < self.min_len:
            return False
        pos = 0
        if self.head is not None:
            m = self.head.match(key)
            if m is None:
                return False
            pos = m.end()
        stop = n - self.tail_len
        for piece in self.middle:
            m = piece.search(key, pos, stop)
            if m is None:
                return False
            pos = m.end()
        if self.tail is not None:
            return self.tail.fullmatch(key, stop) is not None
        return True
