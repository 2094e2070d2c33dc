"""The recent handler failures of this worker process, for `fastworker inspect`: a small ring, newest last.

Fed from dispatch's failure log (`note`, once per failed entry, off the hot path: only failures get here) and read
by the worker's once-a-second report to the supervisor. Bounded: RECENT_MAX entries, each error text cut to
ERROR_MAX_CHARS, so a flood of failures costs the same as a few.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

RECENT_MAX = 20
ERROR_MAX_CHARS = 300


class RecentFailures:
    def __init__(self, size: int = RECENT_MAX) -> None:
        self._ring: deque[tuple[float, str, str, str, int, str, str, str]] = deque(maxlen=size)
        self.total = 0

    def note(self, handler: str, stream: str, entry_id: str, deliveries: int, error_class: str, error: str,
             action: str) -> None:
        """One failed entry: its handler, where it came from, what it raised, and what became of it (retry/dead)."""
        self.total += 1
        self._ring.append((time.time(), handler, stream, entry_id, deliveries, error_class, error[:ERROR_MAX_CHARS],
                           action))

    def snapshot(self) -> list[dict[str, Any]]:
        """The failures kept, newest first, as plain dicts (they travel over the supervisor's pipe)."""
        return [{"at": at, "handler": handler, "stream": stream, "id": entry_id, "deliveries": deliveries,
                 "error_class": error_class, "error": error, "action": action}
                for at, handler, stream, entry_id, deliveries, error_class, error, action in reversed(self._ring)]


failures = RecentFailures()  # one per process: a worker process's dispatcher is the only writer
