"""One timer heap for every deadline of a loop: state timeouts, idle timeouts, named timers.

Cancelled timers stay in the heap and are skipped when popped (cheap cancel); when more than
half the heap is cancelled it is rebuilt, so cancelling many timers cannot grow it without bound.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

__all__ = ["Timer", "TimerQueue"]


class Timer:
    """A scheduled callback. ``cancel()`` is idempotent."""

    __slots__ = ("when", "seq", "callback", "args", "cancelled", "queue", "quiet")

    def __init__(
        self,
        when: float,
        seq: int,
        callback: Callable[..., Any],
        args: tuple[Any, ...],
        queue: TimerQueue,
    ) -> None:
        self.when = when
        self.seq = seq
        self.callback = callback
        self.args = args
        self.cancelled = False
        self.queue = queue
        #: housekeeping (a sweep, a retry): firing it is not activity for handle_request()
        self.quiet = False

    def __lt__(self, other: Timer) -> bool:
        when, other_when = self.when, other.when  # no tuples: this runs on every heap push
        return when < other_when or (when == other_when and self.seq < other.seq)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.queue._cancelled += 1
            self.callback = _noop
            self.args = ()


def _noop(*args: Any) -> None:
    pass


class TimerQueue:
    """A heap of :class:`Timer` ordered by deadline."""

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        self._cancelled = 0

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def add(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(when, next(self._seq), callback, args, self)
        heapq.heappush(self._heap, timer)
        if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
            self._heap = [t for t in self._heap if not t.cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0
        return timer

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0].when if heap else None

    def pop_due(self, now: float) -> list[Timer]:
        """Remove and return the timers due at ``now``, in deadline order."""
        heap = self._heap
        due: list[Timer] = []
        while heap and heap[0].when <= now:
            timer = heapq.heappop(heap)
            if timer.cancelled:
                self._cancelled -= 1
            else:
                timer.cancelled = True  # fired: a later cancel() is a no-op
                due.append(timer)
        return due

    def run_due(self, now: float) -> int:
        """Pop and run due timers one at a time, so one that raises loses no other; return
        how many fired, not counting quiet (housekeeping) ones."""
        heap = self._heap
        fired = 0
        while heap and heap[0].when <= now:
            timer = heapq.heappop(heap)
            if timer.cancelled:
                self._cancelled -= 1
                continue
            timer.cancelled = True
            if not timer.quiet:
                fired += 1
            timer.callback(*timer.args)
        return fired
