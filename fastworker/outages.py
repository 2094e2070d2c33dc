"""One log line per outage per process, however many loops see it.

A worker process runs a consumer loop per (group, consumer name), a reclaimer and its start-up; when the server
goes away, every one of them fails and retries on its own. Logged per loop, a 5 s restart was 9 warnings and 9
recoveries. Here the loops report to one registry per process: an unreachable server is one outage for the whole
process (the first failure is logged, the others counted), and its end is logged at INFO once every loop that saw
it works again, with how long it lasted. An error the server answered (a refused settle, a missing permission) is
specific to what the loop was doing, so it stays its loop's own outage, logged the same way.

Loops notice an outage at different times: one blocked on a read at once, another only when it next uses its
broken connection, maybe after the server is back and the outage has been logged as over. A failure within
TAIL_S of an outage's end is that outage's tail, not news: it is logged only if it lasts TAIL_S (a loop in an
outage retries with backoff capped well below that, so a lasting one is seen).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastworker.errors import FastworkerError, RedisUnavailable
from fastworker.logs import plural

logger = logging.getLogger("fastworker.outage")

SERVER = "server"
TAIL_S = 10.0


class Outages:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing: dict[str, set[str]] = {}  # outage -> loops failing in it
        self._since: dict[str, float] = {}  # outage -> when it began
        self._quiet: set[str] = set()  # outages taken for the tail of the last one: not logged (yet)
        self._ended: dict[str, float] = {}  # outage -> when it last ended

    def failed(self, loop: str, error: FastworkerError) -> None:
        """`loop` (e.g. "consumer host-0 group=jobs") failed with `error` and will retry with backoff."""
        outage = SERVER if isinstance(error, RedisUnavailable) else loop
        now = self._clock()
        if outage not in self._since:
            self._since[outage] = now
            if now - self._ended.get(outage, -TAIL_S) < TAIL_S:
                self._quiet.add(outage)
            else:
                self._log_failed(outage, loop, error)
        elif outage in self._quiet and now - self._since[outage] >= TAIL_S:  # no tail: it lasts
            self._quiet.discard(outage)
            self._log_failed(outage, loop, error)
        self._failing.setdefault(outage, set()).add(loop)

    @staticmethod
    def _log_failed(outage: str, loop: str, error: FastworkerError) -> None:
        where = "" if outage == SERVER else f"{loop}: "
        logger.warning("%s%s; retrying with backoff", where, error)

    def recovered(self, loop: str) -> None:
        """`loop` works again; the outage it was in ends when no loop is failing in it any more."""
        for outage, loops in list(self._failing.items()):
            if loop not in loops:
                continue
            loops.discard(loop)
            if loops:
                continue
            now = self._clock()
            lasted = now - self._since.pop(outage)
            del self._failing[outage]
            self._ended[outage] = now
            if outage in self._quiet:
                self._quiet.discard(outage)
            elif outage == SERVER:
                logger.info("the server is reachable again after %.1f s", lasted)
            else:
                logger.info("%s: recovered after %.1f s", loop, lasted)

    def failing(self) -> dict[str, int]:
        """Outages going on now, with how many loops are in each."""
        return {outage: len(loops) for outage, loops in self._failing.items()}

    def describe(self) -> str:
        return ", ".join(f"{outage} ({plural(count, 'loop')})" for outage, count in self.failing().items())


outages = Outages()  # one per process
