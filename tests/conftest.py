"""Fixtures shared by the test suite: descriptor limits and short Unix socket paths."""

from __future__ import annotations

import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def raise_nofile() -> Iterator[Callable[[int], int]]:
    """``raise_nofile(n)`` lifts the soft RLIMIT_NOFILE to at least ``n`` (never above the hard
    limit; skips the test when the hard limit is lower) and returns the new soft limit. The
    original limits are restored after the test."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)

    def _raise(n: int) -> int:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"RLIMIT_NOFILE hard limit is {hard}, the test needs {n}")
        if soft != resource.RLIM_INFINITY and soft < n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    yield _raise
    resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A fresh directory under /tmp, short enough for Unix socket paths (< 107 bytes)."""
    path = tempfile.mkdtemp(prefix="smx", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
