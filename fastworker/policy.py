"""Pure decisions, kept apart from I/O so they can be table-tested: a message's fate, its retry delay, consumer
sharding, reconnect backoff.

Retry means leaving the entry pending: the PEL's delivery counter is the attempt count, and the retry's due time is
kept on the server (see `fastworker.settlement`), so no retry state lives in a worker and a crash loses none of it.
"""

from __future__ import annotations

import dataclasses
import enum
import random

from fastworker.errors import PayloadInvalid, Reject, Retry

MAX_RETRY_DELAY_S = 86_400.0  # a retry is never scheduled further ahead than this, whatever asked for it


class Action(enum.Enum):
    ACK = "ack"  # handled: acknowledge (and publish its results)
    RETRY = "retry"  # leave pending: the reclaimer hands it out again once its retry delay has passed
    DEAD = "dead"  # move to the dead-letter stream and acknowledge, atomically


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Retry delays that grow with each failure: `first_s`, then times `factor` per failure, at most `max_s`.

    `jitter` spreads each delay uniformly over +/- that fraction (0.1: 10% either way), so that entries that failed
    together (an outage downstream) do not all come back in the same instant. Seconds throughout.
    """

    first_s: float = 1.0
    factor: float = 2.0
    max_s: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not (self.first_s >= 0 and self.factor >= 1 and self.max_s >= self.first_s and 0 <= self.jitter < 1):
            raise ValueError(f"Backoff needs first_s >= 0, factor >= 1, max_s >= first_s and 0 <= jitter < 1; got "
                             f"{self}")
        if self.max_s > MAX_RETRY_DELAY_S:
            raise ValueError(f"Backoff max_s may be at most {MAX_RETRY_DELAY_S:g} s, got {self.max_s:g}")

    def delay_s(self, failures: int, rng: random.Random | None = None) -> float:
        """The delay after failure number `failures` (1 for the first), in seconds."""
        base = min(self.max_s, self.first_s * self.factor ** min(failures - 1, 64))
        if not self.jitter:
            return base
        return min(self.max_s, base * (rng or random).uniform(1 - self.jitter, 1 + self.jitter))


def decide(error: BaseException | None, deliveries: int, max_deliveries: int,
           dead_on: tuple[type[BaseException], ...] = ()) -> Action:
    """The fate of a message whose handler returned (`error` None) or raised `error` on this delivery."""
    if error is None:
        return Action.ACK
    if isinstance(error, Reject | PayloadInvalid) or (dead_on and isinstance(error, dead_on)):
        return Action.DEAD
    if deliveries >= max_deliveries:
        return Action.DEAD
    return Action.RETRY


def retry_delay_s(error: BaseException, deliveries: int, backoff: Backoff, rng: random.Random | None = None) -> float:
    """How long to wait before delivering again a message that failed on delivery number `deliveries`."""
    if isinstance(error, Retry) and error.delay_s is not None:
        return min(error.delay_s, MAX_RETRY_DELAY_S)
    return backoff.delay_s(deliveries, rng)


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
