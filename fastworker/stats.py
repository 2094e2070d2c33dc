"""Per-process counters, moved once per batch (never per message) so that counting costs nothing measurable.

Keys are (group, counter name); the fleet's metrics endpoint aggregates them over worker processes.
"""

from __future__ import annotations

from collections import Counter

from fastworker.streams import Settlement

COUNTERS = ("received", "acked", "retried", "dead", "deleted", "claimed", "batches")


class Stats:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def record(self, settlement: Settlement, received: int, claimed: int = 0) -> None:
        group = settlement.group
        counts = self.counts
        counts[group, "received"] += received
        counts[group, "acked"] += settlement.acked
        counts[group, "retried"] += settlement.retried
        counts[group, "dead"] += len(settlement.dead)
        counts[group, "deleted"] += settlement.deleted
        counts[group, "claimed"] += claimed
        counts[group, "batches"] += 1

    def total(self, name: str) -> int:
        return sum(value for (_, counter), value in self.counts.items() if counter == name)

    def snapshot(self) -> dict[str, dict[str, int]]:
        by_group: dict[str, dict[str, int]] = {}
        for (group, counter), value in self.counts.items():
            by_group.setdefault(group, dict.fromkeys(COUNTERS, 0))[counter] = value
        return by_group
