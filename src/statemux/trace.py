"""Tracers: callables receiving ``(connection id, from state, event, to state)``.

Pass one as ``tracer=`` to a server (or simulator). :class:`LoggingTracer` logs each transition
through the ``statemux.trace`` logger; :class:`RecordingTracer` keeps them in a list for tests.
"""

from __future__ import annotations

import logging

__all__ = ["LoggingTracer", "RecordingTracer", "logger"]

logger = logging.getLogger("statemux.trace")


class LoggingTracer:
    """Log every transition at ``level`` on the ``statemux.trace`` logger."""

    def __init__(self, level: int = logging.INFO, log: logging.Logger = logger) -> None:
        self.level = level
        self.log = log

    def __call__(self, cid: int, source: str, event: str, target: str) -> None:
        if self.log.isEnabledFor(self.level):
            self.log.log(self.level, "#%d %s --%s--> %s", cid, source, event, target)


class RecordingTracer:
    """Keep transitions as tuples in ``self.transitions``."""

    def __init__(self) -> None:
        self.transitions: list[tuple[int, str, str, str]] = []

    def __call__(self, cid: int, source: str, event: str, target: str) -> None:
        self.transitions.append((cid, source, event, target))
