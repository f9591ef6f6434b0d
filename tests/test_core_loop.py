"""The selectors loop and its timer heap, without servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from statemux import Loop
from statemux.timers import TimerQueue

pytestmark = pytest.mark.timeout(10)


# -- the timer heap --------------------------------------------------------------------------------
def test_due_timers_come_out_in_deadline_then_insertion_order() -> None:
    q = TimerQueue()
    fired: list[str] = []
    for when, name in [(3.0, "c"), (1.0, "a"), (2.0, "b1"), (2.0, "b2"), (9.0, "late")]:
        q.add(when, fired.append, name)
    assert q.next_deadline() == 1.0
    assert q.run_due(2.0) == 3
    assert fired == ["a", "b1", "b2"]
    assert q.run_due(5.0) == 1
    assert fired == ["a", "b1", "b2", "c"]
    assert len(q) == 1
    assert q.next_deadline() == 9.0


def test_cancelled_timers_never_fire_and_cancel_is_idempotent() -> None:
    q = TimerQueue()
    fired: list[str] = []
    t1 = q.add(1.0, fired.append, "one")
    q.add(2.0, fired.append, "two")
    t1.cancel()
    t1.cancel()
    assert len(q) == 1
    assert q.next_deadline() == 2.0
    q.run_due(10.0)
    assert fired == ["two"]
    assert len(q) == 0


def test_cancelling_a_timer_that_already_fired_changes_nothing() -> None:
    q = TimerQueue()
    t = q.add(1.0, lambda: None)
    q.add(5.0, lambda: None)
    assert q.run_due(1.0) == 1
    t.cancel()
    assert len(q) == 1
    assert q.next_deadline() == 5.0


def test_cancelling_many_timers_cannot_grow_the_heap_without_bound() -> None:
    q = TimerQueue()
    keep = q.add(1e9, lambda: None)
    for i in range(10_000):
        q.add(float(i), lambda: None).cancel()
    assert len(q) == 1
    assert len(q._heap) <= 200  # rebuilt as cancelled timers pile up
    assert q.next_deadline() == keep.when


# -- the loop --------------------------------------------------------------------------------------
@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.shutdown()
    loop.close()


@pytest.fixture
def running(loop: Loop) -> Iterator[Loop]:
    thread = threading.Thread(target=loop.run, kwargs={"poll_interval": 5}, daemon=True)
    thread.start()
    assert loop.started.wait(5)
    yield loop
    loop.shutdown()
    thread.join(5)
    assert not thread.is_alive()


def test_call_soon_runs_at_the_end_of_the_pass_in_order(loop: Loop) -> None:
    calls: list[str] = []

    def first() -> None:
        calls.append("first")
        loop.call_soon(calls.append, "scheduled by first")

    loop.call_soon(first)
    loop.call_soon(calls.append, "second")
    assert loop.run_once(0) == 0  # callbacks are not readiness
    assert calls == ["first", "second"]
    loop.run_once(0)
    assert calls == ["first", "second", "scheduled by first"]


def test_run_once_waits_for_the_nearest_timer_and_counts_it(loop: Loop) -> None:
    fired = []
    loop.call_later(0.05, fired.append, "t")
    start = time.monotonic()
    assert loop.run_once(5) == 1
    assert fired == ["t"]
    assert time.monotonic() - start < 2


def test_run_once_returns_zero_when_nothing_happens(loop: Loop) -> None:
    assert loop.run_once(0.01) == 0


def test_a_timer_wakes_a_loop_with_a_long_poll_interval(running: Loop) -> None:
    done = threading.Event()
    start = time.monotonic()
    running.call_soon_threadsafe(running.call_later, 0.05, done.set)
    assert done.wait(4)
    assert time.monotonic() - start < 2  # not the 5 s poll interval


def test_call_soon_threadsafe_wakes_a_sleeping_loop(running: Loop) -> None:
    seen: list[threading.Thread] = []
    done = threading.Event()

    def record() -> None:
        seen.append(threading.current_thread())
        done.set()

    start = time.monotonic()
    running.call_soon_threadsafe(record)
    assert done.wait(4)
    assert time.monotonic() - start < 2
    assert seen and seen[0] is not threading.current_thread()


def test_shutdown_from_another_thread_returns_without_polling(loop: Loop) -> None:
    thread = threading.Thread(target=loop.run, kwargs={"poll_interval": 5}, daemon=True)
    thread.start()
    assert loop.started.wait(5)
    start = time.monotonic()
    loop.shutdown()
    assert time.monotonic() - start < 0.5
    assert not loop.running
    thread.join(5)
    assert not thread.is_alive()


def test_shutdown_from_a_callback_stops_the_loop_without_deadlock(loop: Loop) -> None:
    loop.call_later(0.01, loop.shutdown)
    thread = threading.Thread(target=loop.run, kwargs={"poll_interval": 5}, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()


def test_shutdown_of_a_loop_that_is_not_running_returns_at_once(loop: Loop) -> None:
    start = time.monotonic()
    loop.shutdown()
    assert time.monotonic() - start < 0.1


def test_shutdown_racing_the_start_of_run_still_stops_it(loop: Loop) -> None:
    # The stdlib pattern: start serving in a thread, then shut down at once.
    thread = threading.Thread(target=loop.run, kwargs={"poll_interval": 5}, daemon=True)
    thread.start()
    loop.shutdown()
    thread.join(5)
    assert not thread.is_alive()


def test_a_loop_cannot_run_twice_at_once(running: Loop) -> None:
    with pytest.raises(RuntimeError, match="^this loop is already running$"):
        running.run()


def test_a_closed_loop_cannot_run() -> None:
    loop = Loop()
    loop.close()
    loop.close()  # idempotent
    with pytest.raises(RuntimeError, match="^this loop is closed$"):
        loop.run()


def test_the_loop_can_run_again_after_shutdown(loop: Loop) -> None:
    for _ in range(2):
        done = threading.Event()
        loop.call_later(0.01, done.set)
        thread = threading.Thread(target=loop.run, kwargs={"poll_interval": 5}, daemon=True)
        thread.start()
        assert done.wait(5)
        loop.shutdown()
        thread.join(5)
        assert not thread.is_alive()
