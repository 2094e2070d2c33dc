"""Per-process counters and histograms, moved once per batch (never per message) so that counting costs nothing
measurable on the hot path.

Counters are keyed by (stream, group, outcome). `received` and `claimed` count what a read returned; every other
outcome is counted only once the server confirmed the settlement (an ack the server never confirmed is not an
ack). Handler duration is observed once per stream batch as the mean per message over that batch; batch sizes once
per batch. Snapshots are plain dicts, so a worker process can send them to the supervisor, which adds them up for
/metrics. `problems` holds what keeps a loop from working (a settle the server refuses, an outage), by loop, for
the fleet's health.
"""

from __future__ import annotations

import bisect
from typing import Any

from fastworker.settlement import Settlement

OUTCOMES = ("received", "acked", "retried", "dead", "deleted", "claimed", "deduplicated")
DURATION_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)


class Histogram:
    """Cumulative-bucket histogram as Prometheus wants it: counts per upper bound, plus sum and count."""

    __slots__ = ("bounds", "buckets", "count", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.buckets[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.count += times

    def snapshot(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "sum": self.total, "count": self.count}


class Stats:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.batch_sizes: dict[str, Histogram] = {}
        self.batches = 0
        self.problems: dict[str, str] = {}  # loop name -> what keeps it from working, while it lasts

    def _add(self, stream: str, group: str, outcome: str, value: int) -> None:
        if value:
            key = (stream, group, outcome)
            self.counts[key] = self.counts.get(key, 0) + value

    def received(self, group: str, counts: dict[str, int], claimed: bool = False) -> None:
        """Count one batch read: `counts` holds the number of entries read per stream."""
        self.batches += 1
        if group not in self.batch_sizes:
            self.batch_sizes[group] = Histogram(BATCH_BUCKETS)
        self.batch_sizes[group].observe(sum(counts.values()))
        for stream, count in counts.items():
            self._add(stream, group, "received", count)
            if claimed:
                self._add(stream, group, "claimed", count)

    def settled(self, settlement: Settlement) -> None:
        """Count what the server confirmed of one settlement, and its handler timings."""
        group = settlement.group
        for outcome, counts in (("acked", settlement.acked_by_stream), ("dead", settlement.dead_by_stream),
                                ("retried", settlement.retried_by_stream), ("deleted", settlement.deleted_by_stream),
                                ("deduplicated", settlement.deduplicated_by_stream),
                                ("retry_wait_ms", settlement.retry_wait_ms_by_stream)):
            for stream, count in counts.items():
                self._add(stream, group, outcome, count)
        for stream, (elapsed, calls) in settlement.timings.items():
            key = (stream, group)
            if key not in self.durations:
                self.durations[key] = Histogram(DURATION_BUCKETS_S)
            self.durations[key].observe(elapsed / calls, calls)

    def total(self, outcome: str) -> int:
        return sum(value for (_, _, name), value in self.counts.items() if name == outcome)

    def snapshot(self) -> dict[str, Any]:
        return {
            "counts": [[*key, value] for key, value in self.counts.items()],
            "durations": [[*key, h.snapshot()] for key, h in self.durations.items()],
            "batch_sizes": [[group, h.snapshot()] for group, h in self.batch_sizes.items()],
            "batches": self.batches,
            "problems": dict(self.problems),
        }
