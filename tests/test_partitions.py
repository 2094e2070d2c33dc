"""Partitions of a logical stream: slots, key names, spread, picking, and the record of the count (pure), then the
same keys on a real 3-master cluster (slots as the server computes them, routing, one-slot scripts)."""

from __future__ import annotations

import random

import pytest
import redis
from redis.exceptions import ClusterCrossSlotError, MovedError

from fastworker import EmbeddedServer
from fastworker.errors import ConfigError, PartitionMismatch
from fastworker.localcluster import LocalCluster, even_slot_ranges
from fastworker.partitions import (
    MAX_PARTITIONS,
    SLOTS,
    Partitioning,
    RoundRobin,
    key_slot,
    parse_record,
    partition_for,
    partition_key,
    partition_tag,
    record_key,
    slot_centre,
)
from fastworker.settlement import retry_key

pytest_plugins = ["cluster_fixtures"]

# Tricky hash tags: the first `{`, then the first `}` after it, and an empty tag means the whole key.
TAGGED = [
    ("{user1000}.following", "user1000"), ("{user1000}.followers", "user1000"), ("foo{}{bar}", "foo{}{bar}"),
    ("foo{{bar}}zap", "{bar"), ("foo{bar}{zap}", "bar"), ("{}", "{}"), ("a{", "a{"), ("}a{b}", "b"),
    ("{a}{b}", "a"), ("x{é}", "é"), ("{ключ}1", "ключ"), ("", ""),
]


@pytest.mark.parametrize(("key", "hashed"), TAGGED)
def test_key_slot_hashes_only_the_first_non_empty_tag(key: str, hashed: str) -> None:
    assert key_slot(key) == key_slot(hashed.encode()) == key_slot(key.encode())


@pytest.mark.parametrize(("key", "slot"), [("123456789", 0x31C3), ("foo", 12182), ("bar", 5061), ("", 0)])
def test_key_slot_is_crc16_xmodem_mod_16384(key: str, slot: int) -> None:
    assert key_slot(key) == slot  # 0x31C3: the XMODEM check value; foo and bar: the cluster tutorial's


def test_partitioning_of_one_keeps_the_stream_name() -> None:
    single = Partitioning("betterbundle:data-jobs", 1)
    assert single.keys == ("betterbundle:data-jobs",)
    assert single.tag(0) is None
    assert single.dead_letter_key(0) == "betterbundle:data-jobs:dead"
    assert single.retry_key(0, "workers") == retry_key("betterbundle:data-jobs", "workers")
    assert single.partition_of("betterbundle:results", 0) == "betterbundle:results"
    assert Partitioning("legacy{name}", 1).key(0) == "legacy{name}"  # a plain stream may carry its own tag


def test_partition_keys_carry_a_tag_per_partition() -> None:
    parts = Partitioning("betterbundle:data-jobs", 4)
    assert parts.keys == tuple(f"betterbundle:data-jobs:{{{partition_tag(i, 4)}}}" for i in range(4))
    assert all(tag is not None and tag.startswith(f"p{i}.") for i, tag in enumerate(map(parts.tag, range(4))))
    assert parts.keys == Partitioning("betterbundle:data-jobs", 4).keys  # deterministic
    assert parts.key(1) == partition_key("betterbundle:data-jobs", 1, 4)


@pytest.mark.parametrize("count", range(2, 17))
def test_partition_tags_hash_to_the_middle_of_their_slot_range(count: int) -> None:
    parts = Partitioning("s", count)
    for index in range(count):
        assert parts.slot(index) == slot_centre(index, count)
        assert index * SLOTS // count <= parts.slot(index) < (index + 1) * SLOTS // count


@pytest.mark.parametrize("masters", range(1, 9))
def test_partitions_spread_evenly_over_masters_with_equal_slot_ranges(masters: int) -> None:
    ranges = even_slot_ranges(masters)
    for count in range(1, 17):
        slots = [Partitioning("s", count).slot(index) for index in range(count)]
        per_master = [sum(first <= slot <= last for slot in slots) for first, last in ranges]
        assert max(per_master) - min(per_master) <= 1 if count >= masters else max(per_master) == 1, (
            f"{count} partitions over {masters} masters: {per_master}")


def test_a_partitions_dead_letters_retries_and_results_share_its_slot() -> None:
    parts = Partitioning("betterbundle:data-jobs", 6)
    for index in range(6):
        slot = parts.slot(index)
        assert parts.dead_letter_key(index) == parts.key(index) + ":dead"
        assert parts.retry_key(index, "workers") == retry_key(parts.key(index), "workers")
        names = [parts.dead_letter_key(index), parts.dead_letter_key(index, ":dlq"),
                 parts.retry_key(index, "workers"), parts.partition_of("betterbundle:results", index)]
        assert [key_slot(name) for name in names] == [slot] * 4
    assert len({parts.slot(index) for index in range(6)}) == 6


def test_partitioning_refuses_a_stream_name_with_a_brace_and_bad_counts() -> None:
    with pytest.raises(ConfigError, match="contains '\\{'"):
        Partitioning("{app}:jobs", 2)
    with pytest.raises(ConfigError, match="contains '\\{'"):
        Partitioning("app:jobs", 2).partition_of("{app}:results", 0)
    for count in (0, -1, MAX_PARTITIONS + 1):
        with pytest.raises(ConfigError, match="partition count must be"):
            Partitioning("app:jobs", count)
    with pytest.raises(IndexError):
        Partitioning("app:jobs", 3).key(3)


def test_partition_for_is_the_key_slot_mod_the_count() -> None:
    for key in ("shop_4821", "shop_1", b"shop_2", "ключ"):
        assert partition_for(key, 6) == key_slot(key) % 6 == Partitioning("s", 6).for_key(key)
    assert partition_for("shop_4821", 1) == 0
    # require('cluster-key-slot')('shop_4821') is 5824 in Node (1.1.2): the app computes the same partition
    assert key_slot("shop_4821") == 5824 and partition_for("shop_4821", 6) == 4


def test_round_robin_cycles_through_partitions_from_its_start() -> None:
    assert [next(RoundRobin(4)) for _ in range(2)] == [0, 0]
    spread = RoundRobin(4, start=2)
    assert [next(spread) for _ in range(6)] == [2, 3, 0, 1, 2, 3]
    with pytest.raises(ConfigError):
        RoundRobin(0)


def test_partition_record_commands_and_replies() -> None:
    parts = Partitioning("app:jobs", 4)
    assert parts.record_key == record_key("app:jobs") == "app:jobs:fw-partitions"
    assert parts.record_command() == ("SET", "app:jobs:fw-partitions", "count=4 tags=v1", "NX", "GET")
    assert parts.read_command() == ("GET", "app:jobs:fw-partitions")
    assert parts.check_record(None) is None
    assert parts.check_record(b"count=4 tags=v1") == 4
    assert parts.check_record("tags=v1 count=4 since=2026") == 4  # names it does not know are ignored


def test_partition_record_of_another_count_is_a_mismatch() -> None:
    with pytest.raises(PartitionMismatch, match=r"configured with 4 partition.*server records 6") as caught:
        Partitioning("app:jobs", 4).check_record(b"count=6 tags=v1")
    assert isinstance(caught.value, ConfigError)
    assert (caught.value.configured, caught.value.recorded, caught.value.record_key) == (4, 6, "app:jobs:fw-partitions")


@pytest.mark.parametrize("value", ["count=4", "count=4 tags=v2", "tags=v1", "count=x tags=v1", "count=0 tags=v1",
                                   "4", ""])
def test_partition_record_malformed_or_of_another_scheme_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="partition record 'app:jobs:fw-partitions'") as caught:
        parse_record("app:jobs", value)
    assert not isinstance(caught.value, PartitionMismatch)


# -- on a real cluster


def _random_keys(count: int, seed: int = 12) -> list[str | bytes]:
    rng = random.Random(seed)
    alphabet = "ab{}{}:.xé✓ключ0"
    keys: list[str | bytes] = [key for key, _ in TAGGED]
    keys += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12))) for _ in range(count)]
    keys += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 10))) for _ in range(count // 4)]
    keys += [key for parts in (Partitioning("app:jobs", n) for n in (2, 3, 6, 16)) for key in parts.keys]
    return keys


@pytest.mark.server
def test_key_slot_agrees_with_the_servers_cluster_keyslot(cluster: LocalCluster) -> None:
    keys = _random_keys(400)
    with redis.Redis(port=cluster.nodes[0].port) as client, client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", key)
        server_slots = pipe.execute()
    assert [key_slot(key) for key in keys] == server_slots


@pytest.mark.server
def test_partitions_of_six_land_two_per_master(cluster: LocalCluster) -> None:
    parts = Partitioning("t-spread", 6)
    owners = [cluster.master_for_slot(parts.slot(index)).port for index in range(6)]
    assert sorted(owners.count(node.port) for node in cluster.masters) == [2, 2, 2]


@pytest.mark.server
def test_stream_commands_on_each_partition_land_on_its_master(cluster: LocalCluster) -> None:
    parts = Partitioning("t-route", 6)
    for index, key in enumerate(parts.keys):
        master = cluster.master_for_slot(parts.slot(index))
        client = master.client()
        entry_id = client.xadd(key, {"data": f"job {index}"})
        client.xgroup_create(key, "workers", id="0")
        [[_, [(read_id, fields)]]] = client.xreadgroup("workers", "c1", {key: ">"}, count=10)
        assert (read_id, fields) == (entry_id, {"data": f"job {index}"})
        assert client.xack(key, "workers", entry_id) == 1
        for node in cluster.nodes:
            if node is not master:
                with pytest.raises(MovedError, match=f"127.0.0.1:{master.port}$"):
                    node.client().xadd(key, {"data": "elsewhere"})


# A settle step in miniature: ack the entry on the partition and write its result to the result stream of the
# same partition, in one script. KEYS: the partition, the result stream. ARGV: group, entry id, result.
SETTLE = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XADD', KEYS[2], '*', 'result', ARGV[3])
"""


@pytest.mark.server
def test_settle_script_runs_on_one_partition_and_is_refused_across_partitions(cluster: LocalCluster) -> None:
    parts = Partitioning("t-settle", 3)
    client = cluster.master_for_slot(parts.slot(0)).client()
    entry_id = client.xadd(parts.key(0), {"data": "job"})
    client.xgroup_create(parts.key(0), "workers", id="0")
    client.xreadgroup("workers", "c1", {parts.key(0): ">"})
    same = parts.partition_of("t-settle-results", 0)
    assert client.eval(SETTLE, 2, parts.key(0), same, "workers", entry_id, "ok")
    assert client.xlen(same) == 1 and client.xpending(parts.key(0), "workers")["pending"] == 0

    other = parts.partition_of("t-settle-results", 1)
    with pytest.raises(ClusterCrossSlotError):  # the server's -CROSSSLOT
        client.eval(SETTLE, 2, parts.key(0), other, "workers", entry_id, "ok")
    assert cluster.master_for_slot(parts.slot(1)).client().exists(other) == 0  # nothing written


def _send(client: redis.Redis, command: tuple[str, ...]) -> object:
    """The server's reply to `command` as it is: redis-py would turn a SET's reply into a bool."""
    client.set_response_callback(command[0], lambda reply, **_: reply)
    return client.execute_command(*command)


@pytest.mark.server
def test_partition_count_is_recorded_once_and_a_mismatch_is_refused(cluster: LocalCluster) -> None:
    parts = Partitioning("t-record", 4)
    port = cluster.master_for_slot(key_slot(parts.record_key)).port
    with redis.Redis(port=port, decode_responses=True) as client:
        assert parts.check_record(_send(client, parts.record_command())) is None  # recorded now
        assert parts.check_record(_send(client, parts.record_command())) == 4
        assert parts.check_record(_send(client, parts.read_command())) == 4
        other = Partitioning("t-record", 6)
        with pytest.raises(PartitionMismatch, match=r"configured with 6 partition.*server records 4"):
            other.check_record(_send(client, other.record_command()))
        assert client.get(parts.record_key) == "count=4 tags=v1"  # the mismatch did not overwrite it


@pytest.mark.server
def test_partitions_work_on_a_standalone_server(server: EmbeddedServer, uid: str) -> None:
    parts = Partitioning(uid, 3)
    with redis.Redis.from_url(server.url) as client:
        assert parts.check_record(_send(client, parts.record_command())) is None
        for key in parts.keys:
            client.xadd(key, {"data": "job"})
        assert [client.xlen(key) for key in parts.keys] == [1, 1, 1]
        assert parts.check_record(_send(client, parts.read_command())) == 3


@pytest.mark.server
def test_partition_keys_and_record_fall_under_the_applications_acl_key_pattern(server: EmbeddedServer,
                                                                                uid: str) -> None:
    parts = Partitioning(f"{uid}:jobs", 3)
    with redis.Redis.from_url(server.url) as admin:
        admin.execute_command("ACL", "SETUSER", f"{uid}-app", "on", ">secret", f"~{uid}:*", "+@all")
        try:
            with redis.Redis(port=server.port, username=f"{uid}-app", password="secret") as app:
                assert parts.check_record(_send(app, parts.record_command())) is None
                for key in (*parts.keys, parts.dead_letter_key(0)):
                    app.xadd(key, {"data": "job"})
                app.zadd(parts.retry_key(0, "workers"), {"0-1": 1})
        finally:
            admin.execute_command("ACL", "DELUSER", f"{uid}-app")
