"""What a server process tree costs, read from ``/proc`` (Linux).

CPU: ``utime + stime + cutime + cstime`` of the server and of every live descendant (zombies
included), so threads, forked children still running and children already reaped are all
counted once. Memory: ``VmHWM`` (peak) and ``VmRSS`` (now) summed over the tree, and the
tree's ``Pss`` (proportional set size), which counts pages shared by forked children once.
"""

from __future__ import annotations

import os

__all__ = [
    "TICK", "descendants", "tree_cpu", "tree_memory", "tree_pss", "fd_count", "parse_stat",
    "cpus_busy",
]  # fmt: skip

TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[int, float]:
    """``(ppid, cpu seconds incl. reaped children)`` from the text of ``/proc/PID/stat``."""
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) * TICK


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process is gone
        return None


def _all_stats() -> dict[int, tuple[int, float]]:
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            text = _read(f"/proc/{name}/stat")
            if text:
                stats[int(name)] = parse_stat(text)
    return stats


def descendants(root: int, stats: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """``root`` and every live descendant process."""
    stats = _all_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by ``root``'s process tree (see the module docstring)."""
    stats = _all_stats()
    return sum(stats[pid][1] for pid in descendants(root, stats) if pid in stats)


def _status_kb(pid: int, fields: tuple[str, ...]) -> list[int]:
    text = _read(f"/proc/{pid}/status") or ""
    values = [0] * len(fields)
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            values[fields.index(key)] = int(rest.split()[0])
    return values


def tree_memory(root: int) -> tuple[int, int]:
    """``(sum of VmHWM, sum of VmRSS)`` over ``root``'s tree, in bytes."""
    hwm = rss = 0
    for pid in descendants(root):
        peak, now = _status_kb(pid, ("VmHWM", "VmRSS"))
        hwm += peak * 1024
        rss += now * 1024
    return hwm, rss


def tree_pss(root: int) -> tuple[int, int]:
    """``(processes, sum of Pss)`` over ``root``'s tree, in bytes: pages shared by forked
    children are divided between them, so the sum counts each page once."""
    pids = descendants(root)
    total = 0
    for pid in pids:
        text = _read(f"/proc/{pid}/smaps_rollup") or ""
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return len(pids), total


def cpus_busy(cpus: list[int]) -> float:
    """Seconds the given CPUs have spent busy (not idle, not waiting for I/O), from
    ``/proc/stat``; everything that ran there counts, whoever it was."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = 0
    text = _read("/proc/stat") or ""
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name in wanted:
            values = [int(v) for v in rest.split()]
            busy += sum(values[:8]) - values[3] - values[4]  # minus idle and iowait
    return busy * TICK


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (0 when it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0
