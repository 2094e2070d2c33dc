"""Pure decisions, kept apart from I/O so they can be table-tested: a message's fate, consumer sharding, backoff.

Retry means leaving the entry pending: the PEL's delivery counter is the attempt count and the claim idle time is
the retry delay, so no retry state lives in the worker and a crash loses none of it.
"""

from __future__ import annotations

import enum
import random

from fastworker.errors import Reject


class Action(enum.Enum):
    ACK = "ack"  # handled: acknowledge (and publish its results)
    RETRY = "retry"  # leave pending: the reclaimer hands it out again after claim_idle_ms
    DEAD = "dead"  # move to the dead-letter stream and acknowledge, atomically


def decide(error: BaseException | None, deliveries: int, max_deliveries: int) -> Action:
    """The fate of a message whose handler returned (`error` None) or raised `error` on this delivery."""
    if error is None:
        return Action.ACK
    if isinstance(error, Reject):
        return Action.DEAD
    if deliveries >= max_deliveries:
        return Action.DEAD
    return Action.RETRY


def exhausted(deliveries: int, max_deliveries: int) -> bool:
    """A message delivered more often than allowed without being settled (its worker kept dying on it):
    dead-letter it without calling the handler again."""
    return deliveries > max_deliveries


def shard(names: list[str], processes: int) -> list[list[str]]:
    """Spread consumer names over processes round-robin; every process gets at least one name."""
    if processes < 1 or len(names) < processes:
        raise ValueError(f"cannot spread {len(names)} consumer names over {processes} processes")
    return [names[index::processes] for index in range(processes)]


def backoff_s(attempt: int, base_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter, for reconnecting after attempt number `attempt` (0-based)."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return (rng or random).uniform(ceiling / 2, ceiling)
