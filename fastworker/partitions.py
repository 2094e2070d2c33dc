"""Partitions of a logical stream over a Redis / Valkey cluster's hash slots: key names, slots, and the record of
the partition count on the server. Pure: no I/O here; the commands are built and their replies parsed, the edge
sends them.

A logical stream `S` with N partitions is N real streams. With N = 1 it is `S` itself, as before partitions
existed. With N > 1, partition i is `S:{p<i>.<k>}`: the hash tag `p<i>.<k>` puts it in a slot of its own, and
everything a settle step of that partition touches carries the same tag (its dead letters, its retry schedule,
the result streams it emits to), so one script per partition stays in one slot and atomic.

The tag of partition i of N hashes to the middle slot of the i-th of N equal slot ranges,
`(2i + 1) * 16384 // (2N)`, and `k` is the smallest integer >= 0 that makes `p<i>.<k>` hash there. Centring (rather
than landing anywhere in the range) is what makes the spread even on any cluster whose M masters own equal
contiguous ranges (as `redis-cli --cluster create` and `LocalCluster` assign them): master m receives the
partitions whose centre falls in its range, N/M of them rounded up or down, so counts differ by at most one.

An entry with a key goes to partition `key_slot(key) % N`, which a Node producer computes with the package ioredis
already depends on: `require('cluster-key-slot')(shopId) % N`. The count is recorded under `S:fw-partitions` as
`count=N tags=v1` (`SET ... NX GET`: the first producer or consumer records it, every later one compares), so
that code configured with another N fails with `PartitionMismatch` instead of writing to keys nobody reads.
"""

from __future__ import annotations

import itertools
from binascii import crc_hqx
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from fastworker.errors import ConfigError, PartitionMismatch

SLOTS = 16384
# Naming N partitions costs about N * 16384 hash tries (~1.5 ms per partition): a bound keeps that to seconds, and
# far more partitions than masters buys nothing.
MAX_PARTITIONS = 1024
RECORD_SUFFIX = ":fw-partitions"
TAG_SCHEME = "v1"  # the tag rule above; a later rule gets a new name, so that old and new code cannot mix silently
Key = str | bytes


def key_slot(key: Key) -> int:
    """The cluster slot (0..16383) of `key`: CRC16/XMODEM of the key mod 16384, where a key containing `{...}`
    with at least one character between its first `{` and the first `}` after it hashes only those characters.
    A str key hashes as its UTF-8 bytes (UnicodeEncodeError for lone surrogates, which no client can send)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    # binascii's CRC-CCITT with initial value 0 is XMODEM, the CRC16 of the cluster spec
    return crc_hqx(data, 0) & (SLOTS - 1)


def _check_count(count: int) -> None:
    if not 1 <= count <= MAX_PARTITIONS:
        raise ConfigError(f"a partition count must be 1..{MAX_PARTITIONS}, got {count}")


def _check_index(index: int, count: int) -> None:
    if not 0 <= index < count:
        raise IndexError(f"partition {index} of {count}: must be 0..{count - 1}")


def slot_centre(index: int, count: int) -> int:
    """The slot partition `index` of `count` hashes to: the middle of the index-th of `count` equal slot ranges."""
    _check_count(count)
    _check_index(index, count)
    return (2 * index + 1) * SLOTS // (2 * count)


@lru_cache(maxsize=4096)
def partition_tag(index: int, count: int) -> str | None:
    """The hash tag content of partition `index` of `count` (e.g. 'p3.17342'), None when count is 1 (no tag).
    ConfigError for a count outside 1..MAX_PARTITIONS, IndexError for an index outside 0..count-1."""
    target = slot_centre(index, count)
    if count == 1:
        return None
    # One candidate in 16384 matches, so ~16k tries (~1.5 ms), cached per (index, count). The CRC of the fixed
    # prefix is computed once and continued over each candidate's digits.
    prefix = crc_hqx(b"p%d." % index, 0)
    k = next(k for k in itertools.count() if crc_hqx(b"%d" % k, prefix) & (SLOTS - 1) == target)
    return f"p{index}.{k}"


def _check_name(stream: str) -> None:
    # a `{` before our tag would start the key's hash tag early (even `{}`: then the whole key is hashed)
    if "{" in stream:
        raise ConfigError(f"stream name {stream!r} contains '{{': partitioned streams carry their own hash tag")


def partition_key(stream: str, index: int, count: int) -> str:
    """The key of partition `index` of `count` of `stream`: `stream` itself when count is 1, else
    `stream:{<tag>}`. ConfigError for a stream name with `{` (when count > 1) or a bad count, IndexError for an
    index outside 0..count-1."""
    tag = partition_tag(index, count)
    if tag is None:
        return stream
    _check_name(stream)
    return f"{stream}:{{{tag}}}"


def partition_for(key: Key, count: int) -> int:
    """The partition (0..count-1) an entry with this key goes to: `key_slot(key) % count`, what Node computes as
    `require('cluster-key-slot')(key) % count`. Entries with one key stay in one partition, in order.

    cluster-key-slot (1.1.2) agrees with the server on every key except those with an empty tag `{}` followed
    later by a `}` (it skips the empty tag where the server hashes the whole key): ids such as shop ids have no
    braces, so the app and fastworker pick the same partition."""
    _check_count(count)
    return key_slot(key) % count


class RoundRobin(Iterator[int]):
    """Partition indexes in turn, `start`, start+1, ..., count-1, 0, ..., for entries without a key. One per
    producer (not thread-safe); different `start`s keep producers from all beginning on partition 0."""

    def __init__(self, count: int, start: int = 0) -> None:
        _check_count(count)
        self.count = count
        self._next = start % count

    def __next__(self) -> int:
        index = self._next
        self._next = (index + 1) % self.count
        return index


def record_key(stream: str) -> str:
    """The key recording the partition count of the logical stream `stream`: `stream:fw-partitions`. One key per
    stream (not one hash for all), so that an ACL key pattern that covers a stream's keys (`~myapp:*`) covers its
    record too, and no application can change another's count."""
    return stream + RECORD_SUFFIX


def record_value(count: int) -> str:
    """The recorded value: `count=<N> tags=<scheme>`, words of `name=value` (more may be added; readers ignore
    names they do not know)."""
    _check_count(count)
    return f"count={count} tags={TAG_SCHEME}"


def parse_record(stream: str, reply: Key | None) -> int | None:
    """The partition count recorded for `stream` from a GET (or SET NX GET) reply: None when there is none.
    ConfigError when the value is malformed or was written under another tag scheme."""
    if reply is None:
        return None
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
    fields = dict(word.partition("=")[::2] for word in text.split())
    where = f"the partition record {record_key(stream)!r} = {text!r}"
    if fields.get("tags") != TAG_SCHEME:
        raise ConfigError(f"{where} names the tag scheme {fields.get('tags')!r}; this fastworker knows "
                          f"{TAG_SCHEME!r} only: run the version that recorded it")
    count = fields.get("count", "")
    if not count.isdigit() or not 1 <= int(count) <= MAX_PARTITIONS:
        raise ConfigError(f"{where} has no valid count=N (N in 1..{MAX_PARTITIONS})")
    return int(count)


@dataclass(frozen=True)
class Partitioning:
    """The partitions of the logical stream `stream`: `count` streams (1..MAX_PARTITIONS), partition i at
    `keys[i]`. ConfigError for a bad count or a stream name with `{` when count > 1."""

    stream: str
    count: int

    def __post_init__(self) -> None:
        _check_count(self.count)
        if self.count > 1:
            _check_name(self.stream)

    @property
    def keys(self) -> tuple[str, ...]:
        """The partition streams' keys, in partition order."""
        return tuple(self.key(index) for index in range(self.count))

    def key(self, index: int) -> str:
        """Partition `index`'s stream key (IndexError outside 0..count-1)."""
        return partition_key(self.stream, index, self.count)

    def tag(self, index: int) -> str | None:
        """Partition `index`'s hash tag content, None when count is 1."""
        return partition_tag(index, self.count)

    def slot(self, index: int) -> int:
        """The slot partition `index` and everything sharing its tag live in."""
        return key_slot(self.key(index))

    def partition_of(self, other_stream: str, index: int) -> str:
        """Partition `index` of another logical stream with this one's count, in the same slot: where a handler
        of partition `index` writes its results (`partition_of('myapp:results', 3)`)."""
        return partition_key(other_stream, index, self.count)

    def dead_letter_key(self, index: int, suffix: str = ":dead") -> str:
        """Partition `index`'s dead-letter stream: its key plus the dead-letter suffix, as for a plain stream."""
        return self.key(index) + suffix

    def retry_key(self, index: int, group: str) -> str:
        """The retry schedule of `group` on partition `index`: the rule of `settlement.retry_key`
        (`<stream>:fw-retry:<group>`) applied to the partition's key."""
        return f"{self.key(index)}:fw-retry:{group}"

    def for_key(self, key: Key) -> int:
        """The partition an entry with this key goes to (`partition_for`)."""
        return partition_for(key, self.count)

    # -- the record of the count on the server

    @property
    def record_key(self) -> str:
        return record_key(self.stream)

    def record_command(self) -> tuple[str, ...]:
        """Record this count unless one is recorded, and return the recorded one in the same step: `SET key value
        NX GET` (Redis 7.0+, Valkey). Reply nil: ours is now recorded. Pass the reply to `check_record`."""
        return ("SET", self.record_key, record_value(self.count), "NX", "GET")

    def read_command(self) -> tuple[str, ...]:
        """Read the recorded count without recording one: `GET key`. Pass the reply to `check_record`."""
        return ("GET", self.record_key)

    def check_record(self, reply: Key | None) -> int | None:
        """The recorded count from the reply to `record_command` or `read_command` (None when nothing was
        recorded before). PartitionMismatch when it differs from `count`; ConfigError when it is malformed."""
        recorded = parse_record(self.stream, reply)
        if recorded is not None and recorded != self.count:
            raise PartitionMismatch(self.stream, self.count, recorded, self.record_key)
        return recorded
