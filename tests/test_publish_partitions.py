"""The producer side of partitioned streams: routing and grouping without a server, then the Publisher on the
standalone server (one partition unchanged, keys, round-robin, the count record, WAIT, a lost reply) and on a
3-master loopback cluster (each partition on its master, order per key, MOVED, ASK, a connection killed mid-publish).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import hiredis
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from bench.faultproxy import FaultProxy
from fastworker import EmbeddedServer, RedisUnavailable
from fastworker.config import Settings
from fastworker.edge.cluster import (
    NO_REPLY,
    Node,
    Router,
    SlotMap,
    _backoff_s,
    _without_asking,
    node_url,
    parse_shards,
    parse_slots,
)
from fastworker.edge.errors import (
    ClusterRedirectError,
    is_ask,
    is_cluster_down,
    is_cross_slot,
    is_moved,
    is_refused_by_cluster,
    is_try_again,
    redirect_target,
    reply_error,
)
from fastworker.edge.streams import Streams
from fastworker.edge.wire import pack
from fastworker.errors import ExitCode, PartitionMismatch, RedisAuthError
from fastworker.localcluster import LocalCluster
from fastworker.partitions import Partitioning, RoundRobin, key_slot, partition_for
from fastworker.publisher import Entry, PayloadError, Publisher, ReplicationError, _Placement, _RoutedEncoder
from tests.cluster_fixtures import started_cluster
from tests.conftest import cli, wait_for

pytest_plugins = ["cluster_fixtures"]

SHOPS = [f"shop_{n}" for n in range(40)]


def _jobs(count: int, shops: list[str] = SHOPS) -> list[dict[str, Any]]:
    return [{"seq": seq, "shop_id": shops[seq % len(shops)]} for seq in range(count)]


# -- error replies a cluster sends -------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "kind"), [
    ("MOVED 3999 127.0.0.1:6381", "moved"), ("ASK 3999 127.0.0.1:6381", "ask"),
    ("TRYAGAIN Multiple keys request during rehashing of slot", "tryagain"),
    ("CLUSTERDOWN The cluster is down", "down"), ("CROSSSLOT Keys in request don't hash to the same slot", "cross"),
])
def test_cluster_error_replies_are_classified_by_their_code(message: str, kind: str) -> None:
    error = reply_error(message)
    found = {"moved": is_moved(error), "ask": is_ask(error), "tryagain": is_try_again(error),
             "down": is_cluster_down(error), "cross": is_cross_slot(error)}
    assert [name for name, yes in found.items() if yes] == [kind]
    assert is_refused_by_cluster(error) == (kind != "cross")  # CROSSSLOT is not cured by sending it again


@pytest.mark.parametrize(("message", "target"), [
    ("MOVED 3999 127.0.0.1:6381", (3999, "127.0.0.1", 6381, False)),
    ("ASK 12 :7000", (12, "", 7000, True)),
    ("MOVED 16383 [::1]:7002", (16383, "::1", 7002, False)),
])
def test_redirect_target_reads_slot_and_address(message: str, target: tuple[int, str, int, bool]) -> None:
    found = redirect_target(reply_error(message))
    assert found is not None and (found.slot, found.host, found.port, found.ask) == target


def test_redirect_target_is_none_for_other_errors() -> None:
    assert redirect_target(reply_error("TRYAGAIN later")) is None
    assert redirect_target(reply_error("ERR syntax error")) is None


# -- slot maps ------------------------------------------------------------------------------------------------------

SHARDS_REPLY = [
    [b"slots", [0, 5460], b"nodes", [
        [b"id", b"a", b"port", 7000, b"ip", b"10.0.0.1", b"endpoint", b"10.0.0.1", b"role", b"master",
         b"health", b"online"],
        [b"id", b"d", b"port", 7003, b"ip", b"10.0.0.4", b"endpoint", b"10.0.0.4", b"role", b"replica",
         b"health", b"online"]]],
    [b"slots", [5461, 10922, 16000, 16383], b"nodes", [
        [b"id", b"b", b"port", 7001, b"tls-port", 8001, b"ip", b"10.0.0.2", b"endpoint", b"?", b"role",
         b"master"]]],
    [b"slots", [10923, 15999], b"nodes", [
        [b"id", b"c", b"port", 7002, b"ip", b"10.0.0.3", b"endpoint", b"", b"role", b"master"]]],
]


def test_parse_shards_takes_each_shards_master_by_its_endpoint() -> None:
    rows = parse_shards(SHARDS_REPLY, "seed.example", tls=False)
    assert rows == [(0, 5460, Node("10.0.0.1", 7000)), (5461, 10922, Node("seed.example", 7001)),
                    (16000, 16383, Node("seed.example", 7001)), (10923, 15999, Node("10.0.0.3", 7002))]


def test_parse_shards_uses_the_tls_port_for_a_tls_url() -> None:
    rows = parse_shards(SHARDS_REPLY, "seed.example", tls=True)
    assert rows[1][2] == Node("seed.example", 8001) and rows[0][2] == Node("10.0.0.1", 7000)


def test_parse_shards_takes_the_online_master_of_a_shard_after_a_failover() -> None:
    shard = [b"slots", [0, 16383], b"nodes", [
        [b"id", b"a", b"port", 7000, b"endpoint", b"10.0.0.1", b"role", b"master", b"health", b"fail"],
        [b"id", b"b", b"port", 7001, b"endpoint", b"10.0.0.2", b"role", b"master", b"health", b"online"]]]
    assert parse_shards([shard], "seed", tls=False) == [(0, 16383, Node("10.0.0.2", 7001))]


def test_parse_slots_takes_the_first_node_of_each_range() -> None:
    reply = [[0, 8191, [b"10.0.0.1", 7000, b"a"], [b"10.0.0.4", 7003, b"d"]], [8192, 16383, [b"", 7001, b"b"]]]
    assert parse_slots(reply, "seed") == [(0, 8191, Node("10.0.0.1", 7000)), (8192, 16383, Node("seed", 7001))]


def test_slot_map_routes_every_slot_and_follows_a_move() -> None:
    a, b = Node("h", 1), Node("h", 2)
    slots = SlotMap([(0, 99, a), (100, 16383, b)])
    assert (slots.node_for(0), slots.node_for(99), slots.node_for(100), slots.node_for(16383)) == (a, a, b, b)
    slots.move(5, b)
    assert slots.node_for(5) == b and slots.masters == [a, b]
    assert SlotMap([(0, 10, a)]).node_for(11) is None  # uncovered


def test_node_url_keeps_scheme_credentials_database_and_options() -> None:
    url = "rediss://app:s3cret@redis.example:6380/2?ssl_ca_certs=/ca.pem"
    assert node_url(url, Node("10.0.0.2", 7001)) == "rediss://app:s3cret@10.0.0.2:7001/2?ssl_ca_certs=/ca.pem"
    assert node_url("redis://localhost/0", Node("::1", 7000)) == "redis://[::1]:7000/0"


def _router(rows: list[tuple[int, int, Node]]) -> Router:
    """A cluster router on a map of our own (no connection is made)."""
    return Router(Streams(Settings(redis_url="redis://127.0.0.1:1/0")), SlotMap(rows))


def test_router_groups_commands_by_master_in_their_order_and_sets_aside_uncovered_slots() -> None:
    a, b = Node("h", 1), Node("h", 2)
    router = _router([(0, 8191, a), (8192, 16000, b)])
    routed = [(10, b"0"), (9000, b"1"), (11, b"2"), (16383, b"3"), (9000, b"4"), (20, b"5")]
    groups, uncovered = router._groups(routed, list(range(6)), {})
    assert groups == {a: [0, 2, 5], b: [1, 4]} and uncovered == [3]
    groups, _ = router._groups(routed, [1, 4], {4: a})  # an ASK sends one command elsewhere, this once
    assert groups == {b: [1], a: [4]}


def test_asking_replies_are_taken_out_of_a_rounds_replies() -> None:
    assert _without_asking([b"1", b"OK", b"2", b"3"], [False, True, False]) == [b"1", b"2", b"3"]


@pytest.mark.parametrize("attempt", [0, 1, 5, 30])
def test_backoff_is_jittered_and_bounded(attempt: int) -> None:
    delays = [_backoff_s(attempt) for _ in range(50)]
    ceiling = min(0.5, 0.01 * 2 ** attempt)
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)


# -- exchanges against scripted nodes: what is sent again, and what is not ----------------------------------------

A, B = Node("127.0.0.1", 1), Node("127.0.0.1", 2)  # port 1 and 2 refuse connections: a map refresh finds no node
Answer = Callable[[Node, list[bytes]], Any]  # a node's reply to one command (an exception: the connection fails)


class ScriptedLinks:
    """Stands in for `Router.links()`: each node answers each command it is sent with `answer(node, command)`,
    where an exception raised is an I/O failure after the send. `sent` logs (node, command) in order."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.sent: list[tuple[Node, list[bytes]]] = []

    async def get(self, node: Node) -> ScriptedLink:
        return ScriptedLink(self, node)

    async def aclose(self, *, discard: bool = False) -> None:
        return None


class ScriptedLink:
    def __init__(self, links: ScriptedLinks, node: Node) -> None:
        self.links, self.node, self.commands = links, node, list[list[bytes]]()

    async def send(self, data: bytes) -> None:
        reader = hiredis.Reader()
        reader.feed(data)
        while (command := reader.gets()) is not False:
            self.commands.append(command)
            self.links.sent.append((self.node, command))

    async def replies(self, count: int) -> list[Any]:
        commands, self.commands = self.commands[:count], self.commands[count:]
        return [b"OK" if command == [b"ASKING"] else self.links.answer(self.node, command) for command in commands]


def _xadds(*slots: int) -> list[tuple[int, bytes]]:
    return [(slot, pack([("XADD", f"s{index}", "*", "n", index)])) for index, slot in enumerate(slots)]


def _scripted(router: Router, answer: Answer, routed: list[tuple[int, bytes]]) -> tuple[Any, ScriptedLinks]:
    links = ScriptedLinks(answer)
    return asyncio.run(router.exchange(routed, links)), links  # type: ignore[arg-type]


def _sent_keys(links: ScriptedLinks) -> list[tuple[int, bytes]]:
    return [(node.port, command[1]) for node, command in links.sent if command != [b"ASKING"]]


def test_exchange_resends_only_the_commands_refused_with_tryagain() -> None:
    router = _router([(0, 8191, A), (8192, 16383, B)])
    refused = {b"s1"}

    def answer(node: Node, command: list[bytes]) -> Any:
        if command[1] in refused:
            refused.discard(command[1])
            return reply_error("TRYAGAIN Multiple keys request during rehashing of slot")
        return b"1-%s" % command[1][1:]

    result, links = _scripted(router, answer, _xadds(10, 20, 9000))
    assert result.replies == [b"1-0", b"1-1", b"1-2"] and result.lost == 0
    assert _sent_keys(links) == [(1, b"s0"), (1, b"s1"), (2, b"s2"), (1, b"s1")]
    assert router.redirects["wait"] == 1


def test_exchange_follows_moved_and_ask_to_the_named_node() -> None:
    router = _router([(0, 16383, A)])

    def answer(node: Node, command: list[bytes]) -> Any:
        if node == A and command[1] == b"s0":
            return reply_error("MOVED 10 127.0.0.1:2")
        if node == A and command[1] == b"s1":
            return reply_error("ASK 20 127.0.0.1:2")
        return b"id-" + command[1]

    result, links = _scripted(router, answer, _xadds(10, 20, 30))
    assert result.replies == [b"id-s0", b"id-s1", b"id-s2"] and result.nodes == [B, B, A]
    assert [command for node, command in links.sent if node == B] == [
        [b"XADD", b"s0", b"*", b"n", b"0"], [b"ASKING"], [b"XADD", b"s1", b"*", b"n", b"1"]]
    assert router.node_for(10) == B and router.node_for(20) == A  # MOVED changes the map, ASK does not


def test_exchange_waits_out_clusterdown_then_gives_up_after_its_window() -> None:
    router = _router([(0, 16383, A)])
    router.retry_window_s = 0.05
    result, links = _scripted(router, lambda node, command: reply_error("CLUSTERDOWN The cluster is down"),
                              _xadds(10, 20))
    assert all(isinstance(reply, ClusterRedirectError) for reply in result.replies)
    assert "CLUSTERDOWN" in str(result.replies[0]) or "cluster is down" in str(result.replies[0])
    assert len(links.sent) >= 4 and result.lost == 0  # sent more than once: each time, the server ran nothing


def test_exchange_never_resends_a_command_whose_reply_was_lost() -> None:
    router = _router([(0, 8191, A), (8192, 16383, B)])

    def answer(node: Node, command: list[bytes]) -> Any:
        if node == A:  # the connection drops after the commands went out: were they applied? Unknown.
            raise RedisUnavailable("cannot reach the server: Connection closed by server.")
        return b"ok"

    result, links = _scripted(router, answer, _xadds(10, 20, 9000))
    assert isinstance(result.error, RedisUnavailable) and (result.lost, result.unsent) == (2, 0)
    assert result.replies == [NO_REPLY, NO_REPLY, b"ok"]  # the other master's reply still counts
    assert _sent_keys(links) == [(1, b"s0"), (1, b"s1"), (2, b"s2")]  # once each, never again


# -- placement and grouping -------------------------------------------------------------------------------------


def test_placement_by_key_field_is_the_key_slot_mod_the_count() -> None:
    placement = _Placement(Partitioning("jobs", 6), "shop_id", RoundRobin(6))
    for job in _jobs(100):
        assert placement.index(job) == partition_for(job["shop_id"], 6)
    assert placement.index({"shop_id": 4821}) == partition_for("4821", 6)  # an int key is its decimal text


def test_placement_reads_entry_fields_and_an_entrys_own_key_first() -> None:
    placement = _Placement(Partitioning("jobs", 6), "shop_id", RoundRobin(6))
    assert placement.index(Entry(fields={"shop_id": "shop_7"})) == partition_for("shop_7", 6)
    assert placement.index(Entry({"shop_id": "shop_7"})) == partition_for("shop_7", 6)
    assert placement.index(Entry({"shop_id": "shop_7"}, key="shop_9")) == partition_for("shop_9", 6)


def test_placement_by_function_and_round_robin_without_a_key() -> None:
    by_function = _Placement(Partitioning("jobs", 4), lambda job: job["shop_id"].upper(), RoundRobin(4))
    assert by_function.index({"shop_id": "a"}) == partition_for("A", 4)
    turns = _Placement(Partitioning("jobs", 4), None, RoundRobin(4, start=2))
    assert [turns.index({}) for _ in range(6)] == [2, 3, 0, 1, 2, 3]


def test_routed_encoder_tags_each_xadd_with_its_partitions_slot() -> None:
    parts = Partitioning("jobs", 4)
    encoder = _RoutedEncoder(_Placement(parts, "shop_id", RoundRobin(4)), None, [], 1000, 1 << 20)
    jobs = _jobs(50)
    for job in jobs:
        encoder.add(job)
    chunk, count = encoder.take()
    assert count == 50
    for job, (slot, command) in zip(jobs, chunk, strict=True):
        key = parts.key(partition_for(job["shop_id"], 4))
        assert slot == key_slot(key)
        assert command == pack([("XADD", key, "*", "data", orjson.dumps(job))])


def test_a_payload_without_its_key_is_a_payload_error() -> None:
    encoder = _RoutedEncoder(_Placement(Partitioning("jobs", 4), "shop_id", RoundRobin(4)), None, [], 10, 1 << 20)
    encoder.add({"shop_id": "a"})
    with pytest.raises(PayloadError, match=r"payload 1 .*no field 'shop_id'"):
        encoder.add({"other": 1})
    with pytest.raises(PayloadError, match="must be a str, bytes or int, not NoneType"):
        encoder.add({"shop_id": None})
    encoder.add({"shop_id": 1})
    with pytest.raises(PayloadError, match="not float"):  # equal to 1, yet not a key the app would send
        encoder.add({"shop_id": 1.0})


# -- on the standalone server -----------------------------------------------------------------------------------


@pytest.fixture
async def publisher(server: EmbeddedServer) -> AsyncIterator[Publisher]:
    async with Publisher(server.url) as pub:
        yield pub


async def _seqs(client: aioredis.Redis, key: str) -> list[int]:
    return [orjson.loads(fields[b"data"])["seq"] for _, fields in await client.xrange(key)]


async def test_one_partition_keeps_the_stream_name_and_records_nothing(publisher: Publisher, rc: aioredis.Redis,
                                                                       uid: str) -> None:
    ids = await publisher.publish_many(uid, _jobs(300), key="shop_id")
    assert len(ids) == 300 and await _seqs(rc, uid) == list(range(300))
    assert await rc.exists(Partitioning(uid, 1).record_key) == 0
    assert not (await publisher.router()).cluster


async def test_partitions_by_key_keep_each_key_in_one_partition_in_order(publisher: Publisher, rc: aioredis.Redis,
                                                                         uid: str) -> None:
    jobs = _jobs(2000)
    assert len(await publisher.publish_many(uid, jobs, key="shop_id", partitions=4)) == 2000
    parts = Partitioning(uid, 4)
    seen: dict[str, int] = {}
    for index, key in enumerate(parts.keys):
        seqs = await _seqs(rc, key)
        assert seqs == sorted(seqs)  # payload order within a partition
        for seq in seqs:
            shop = jobs[seq]["shop_id"]
            assert partition_for(shop, 4) == index and seen.setdefault(shop, index) == index
    assert sum([await rc.xlen(key) for key in parts.keys]) == 2000 and len(seen) == len(SHOPS)
    # stable: a later publish (here by a publisher that reads the record) puts a shop in the same partition
    async with Publisher(publisher.streams.url) as later:
        await later.publish(uid, {"seq": 2000}, key=SHOPS[3])
    assert (await _seqs(rc, parts.key(partition_for(SHOPS[3], 4))))[-1] == 2000


async def test_round_robin_spreads_entries_evenly(publisher: Publisher, rc: aioredis.Redis, uid: str) -> None:
    await publisher.publish_many(uid, _jobs(400), partitions=4)
    assert [await rc.xlen(key) for key in Partitioning(uid, 4).keys] == [100, 100, 100, 100]


async def test_declared_count_is_recorded_and_a_different_one_refused(publisher: Publisher, rc: aioredis.Redis,
                                                                      uid: str) -> None:
    await publisher.publish(uid, {"seq": 0}, key="a", partitions=4)
    assert await rc.get(Partitioning(uid, 4).record_key) == b"count=4 tags=v1"
    async with Publisher(publisher.streams.url) as other:
        with pytest.raises(PartitionMismatch) as caught:
            await other.publish_many(uid, _jobs(10), partitions=3)
        assert await other.partition_count(uid) == 4  # and without a declared count, the recorded one is used
    assert "\n" not in str(caught.value) and "configured with 3 partition(s), but the server records 4" in str(
        caught.value)
    assert sum([await rc.xlen(key) for key in Partitioning(uid, 4).keys]) == 1  # nothing of the refused publish


async def test_payload_without_its_key_publishes_the_prefix(publisher: Publisher, rc: aioredis.Redis,
                                                            uid: str) -> None:
    jobs: list[dict[str, Any]] = [*_jobs(1500), {"seq": 1500}, *_jobs(10)]
    with pytest.raises(PayloadError) as caught:
        await publisher.publish_many(uid, jobs, key="shop_id", partitions=4)
    assert (caught.value.index, caught.value.published) == (1500, 1500)
    assert sum([await rc.xlen(key) for key in Partitioning(uid, 4).keys]) == 1500


async def test_wait_replicas_without_replicas_says_how_many_were_confirmed(publisher: Publisher, rc: aioredis.Redis,
                                                                           uid: str) -> None:
    with pytest.raises(ReplicationError) as caught:
        await publisher.publish_many(uid, _jobs(50), wait_replicas=(1, 20))
    assert (caught.value.confirmed, caught.value.unreplicated) == (0, 50)
    assert "0 entries were confirmed with 1 replica(s), 50 more were written to their master" in str(caught.value)
    assert await rc.xlen(uid) == 50


async def test_a_lost_reply_is_not_sent_again(server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    proxy = FaultProxy(server.port)
    async with proxy, Publisher(f"redis://127.0.0.1:{proxy.port}/0", chunk_size=100) as pub:
        await pub.partition_count(uid, 4)  # recorded (and a connection made) before replies are held
        proxy.set_delay(to_client_s=30.0)  # replies held back: the cut below loses them
        task = asyncio.create_task(pub.publish_many(uid, _jobs(1000), key="shop_id", partitions=4))
        parts = Partitioning(uid, 4)

        async def written() -> int:
            return sum([await rc.xlen(key) for key in parts.keys])

        async def first_chunk_applied() -> bool:
            return task.done() or await written() >= 100

        await wait_for(first_chunk_applied, what="the first chunk to reach the server")
        proxy.cut()
        with pytest.raises(RedisUnavailable) as caught:
            await task
    message = str(caught.value)
    sent = re.search(r"(\d+) entries were confirmed, (\d+) more were sent without a reply", message)
    assert sent is not None and sent.group(1) == "0", message
    seqs = [seq for key in parts.keys for seq in await _seqs(rc, key)]
    assert len(seqs) == len(set(seqs)) and 100 <= len(seqs) <= int(sent.group(2))  # none twice, none re-sent


async def test_a_user_without_info_or_cluster_publishes_to_a_standalone_server(server: EmbeddedServer,
                                                                              r: redis.Redis, uid: str) -> None:
    r.execute_command("ACL", "SETUSER", f"{uid}-app", "reset", "on", ">secret", f"~{uid}*", "+@all", "-info",
                      "-cluster")
    try:
        async with Publisher(f"redis://{uid}-app:secret@127.0.0.1:{server.port}/0") as pub:
            await pub.publish_many(uid, _jobs(20), key="shop_id", partitions=2)
            assert not (await pub.router()).cluster
    finally:
        r.execute_command("ACL", "DELUSER", f"{uid}-app")
    assert sum(r.xlen(key) for key in Partitioning(uid, 2).keys) == 20


async def test_a_producer_allowed_xadd_alone_publishes_to_the_stream_itself(server: EmbeddedServer, r: redis.Redis,
                                                                            uid: str) -> None:
    """An ACL written before partitions (`+xadd`) keeps working, as one partition; declaring a count needs more."""
    r.execute_command("ACL", "SETUSER", f"{uid}-xadd", "reset", "on", ">secret", f"~{uid}*", "+xadd")
    try:
        async with Publisher(f"redis://{uid}-xadd:secret@127.0.0.1:{server.port}/0") as pub:
            assert len(await pub.publish_many(uid, _jobs(5), key="shop_id")) == 5
            with pytest.raises(RedisAuthError, match="no permissions to run the 'set' command"):
                await pub.publish(f"{uid}-other", {"seq": 0}, partitions=2)
    finally:
        r.execute_command("ACL", "DELUSER", f"{uid}-xadd")
    assert r.xlen(uid) == 5


def test_cli_publish_key_and_partitions(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                        r: redis.Redis, uid: str, tmp_path: Any) -> None:
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("\n".join(orjson.dumps(job).decode() for job in _jobs(30)) + "\n")
    code, out, _ = cli(capsys, "publish", uid, "--file", str(lines), "--key", "shop_id", "--partitions", "3",
                       "--quiet", "--redis-url", server.url)
    assert (code, out.strip()) == (ExitCode.OK, "30")
    parts = Partitioning(uid, 3)
    for index, key in enumerate(parts.keys):
        assert all(partition_for(orjson.loads(fields[b"data"])["shop_id"], 3) == index
                   for _, fields in r.xrange(key))
    code, _, err = cli(capsys, "publish", uid, "--json", '{"seq": 1}', "--partitions", "4", "--redis-url", server.url)
    assert code == ExitCode.CONFIG and "records 3" in err and err.count("\n") == 1


def test_cli_publish_line_without_the_key_names_the_line(capsys: pytest.CaptureFixture[str], server: EmbeddedServer,
                                                         r: redis.Redis, uid: str, tmp_path: Any) -> None:
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"shop_id": "a"}\n{"shop_id": 7}\n{"shop": "b"}\n{"shop_id": "c"}\n')
    code, _, err = cli(capsys, "publish", uid, "--file", str(lines), "--key", "shop_id", "--partitions", "2",
                       "--quiet", "--redis-url", server.url)
    assert code == ExitCode.FAILURE
    assert err == (f"fastworker: error: {lines}, line 3: no field 'shop_id' to pick the partition by (--key "
                   "shop_id); the 2 entries before it were published, none from this line on\n")
    assert sum(r.xlen(key) for key in Partitioning(uid, 2).keys) == 2


# -- on a 3-master cluster ----------------------------------------------------------------------------------------


async def _cluster_seqs(local: LocalCluster, parts: Partitioning) -> dict[int, list[int]]:
    """Each partition's seqs, read from the master that serves it."""
    out = {}
    for index, key in enumerate(parts.keys):
        client = local.master_for_slot(parts.slot(index)).client()
        out[index] = [orjson.loads(fields["data"])["seq"] for _, fields in client.xrange(key)]
    return out


@pytest.mark.server
async def test_cluster_entries_land_on_their_partitions_master(cluster: LocalCluster, uid: str) -> None:
    parts = Partitioning(uid, 6)
    async with Publisher(cluster.urls[0]) as pub:
        jobs = _jobs(3000)
        assert await pub.publish_stream(uid, jobs, key="shop_id", partitions=6) == 3000
        assert (await pub.router()).cluster and len((await pub.router()).masters) == 3
    for index, key in enumerate(parts.keys):
        owner = cluster.master_for_slot(parts.slot(index))
        assert owner.client().xlen(key) == sum(partition_for(job["shop_id"], 6) == index for job in jobs)
        assert all(node.command("CLUSTER", "COUNTKEYSINSLOT", parts.slot(index)) == "0"
                   for node in cluster.masters if node is not owner)


@pytest.mark.server
async def test_cluster_keeps_one_keys_entries_in_order_in_one_partition(cluster: LocalCluster, uid: str) -> None:
    parts = Partitioning(uid, 6)
    jobs = _jobs(2500, shops=["shop_4821", "shop_17", "shop_9"])
    async with Publisher(cluster.urls[1], chunk_size=200) as pub:
        await pub.publish_stream(uid, jobs, key="shop_id", partitions=6)
    for index, seqs in (await _cluster_seqs(cluster, parts)).items():
        assert seqs == sorted(seqs)
        assert {partition_for(jobs[seq]["shop_id"], 6) for seq in seqs} <= {index}
    assert sum(len(seqs) for seqs in (await _cluster_seqs(cluster, parts)).values()) == 2500


@pytest.mark.server
async def test_cluster_moved_reply_is_followed_and_every_entry_lands_once(cluster: LocalCluster, uid: str) -> None:
    parts = Partitioning(uid, 3)
    async with Publisher(cluster.urls[0]) as pub:
        router = await pub.router()
        for index in range(3):  # a stale map on purpose: every partition's slot on the wrong master
            right = router.node_for(parts.slot(index))
            router.assign(parts.slot(index), next(node for node in router.masters if node != right))
        await pub.publish_stream(uid, _jobs(1200), key="shop_id", partitions=3)
        assert router.redirects["moved"] >= 1
        assert all(router.node_for(parts.slot(i)) == Node("127.0.0.1", cluster.master_for_slot(parts.slot(i)).port)
                   for i in range(3))
    seqs = [seq for part in (await _cluster_seqs(cluster, parts)).values() for seq in part]
    assert sorted(seqs) == list(range(1200))


@pytest.mark.server
async def test_cluster_node_connections_log_in_with_the_urls_user(cluster: LocalCluster, uid: str) -> None:
    user = f"{uid}-app"
    for node in cluster.masters:  # ACL users are per node in a cluster
        node.command("ACL", "SETUSER", user, "reset", "on", ">s3cret", f"~{uid}*", "+@all")
    try:
        async with Publisher(f"redis://{user}:s3cret@127.0.0.1:{cluster.masters[0].port}/0") as pub:
            assert await pub.publish_stream(uid, _jobs(600), key="shop_id", partitions=6) == 600
            for node in cluster.masters:  # the pools' idle connections: each master was reached as the user
                assert user in {client["user"] for client in node.client().client_list(_type="normal")}
    finally:
        for node in cluster.masters:
            node.command("ACL", "DELUSER", user)
    assert sum(len(part) for part in (await _cluster_seqs(cluster, Partitioning(uid, 6))).values()) == 600


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[LocalCluster]:
    """A cluster of this module's own, for tests that move slots between masters."""
    local = started_cluster(masters=3)
    yield local
    local.stop()


def _migrate(local: LocalCluster, slot: int, keys: list[str], finish: bool) -> tuple[int, int]:
    """Move `slot` (and `keys`) from its master to the next one, as `redis-cli --cluster reshard` does; with
    `finish` False the slot stays MIGRATING (the keys already moved: the source answers ASK). (source, target)
    ports."""
    source = local.master_for_slot(slot)
    target = local.masters[(local.masters.index(source) + 1) % len(local.masters)]
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    if keys:
        source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    if finish:
        for node in local.masters:
            node.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    return source.port, target.port


@pytest.mark.server
async def test_cluster_slot_migrated_between_publishes_is_followed_by_moved(own_cluster: LocalCluster,
                                                                            uid: str) -> None:
    parts = Partitioning(uid, 3)
    async with Publisher(own_cluster.urls[0]) as pub:
        await pub.publish_stream(uid, _jobs(600), key="shop_id", partitions=3)
        _, target = _migrate(own_cluster, parts.slot(1), [parts.key(1)], finish=True)
        await pub.publish_stream(uid, [{**job, "seq": job["seq"] + 600} for job in _jobs(600)], key="shop_id")
        assert (await pub.router()).redirects["moved"] >= 1
    assert own_cluster.master_for_slot(parts.slot(1)).port == target
    seqs = await _cluster_seqs(own_cluster, parts)
    assert sorted(seq for part in seqs.values() for seq in part) == list(range(1200))
    assert seqs[1] == sorted(seqs[1])  # the moved partition kept its order


@pytest.mark.server
async def test_cluster_key_migrating_is_followed_by_ask(own_cluster: LocalCluster, uid: str) -> None:
    parts = Partitioning(uid, 4)  # slots of their own: those of 3 partitions are the MOVED test's
    async with Publisher(own_cluster.urls[0]) as pub:
        await pub.publish_stream(uid, _jobs(500), key="shop_id", partitions=4)
        source, target = _migrate(own_cluster, parts.slot(2), [parts.key(2)], finish=False)
        await pub.publish_stream(uid, [{**job, "seq": job["seq"] + 500} for job in _jobs(500)], key="shop_id")
        assert (await pub.router()).redirects["ask"] >= 1
    assert own_cluster.node_at(source).command("CLUSTER", "COUNTKEYSINSLOT", parts.slot(2)) == "0"
    for node in own_cluster.masters:  # finish the migration, so the module's cluster is whole again
        node.command("CLUSTER", "SETSLOT", parts.slot(2), "NODE", own_cluster.node_at(target).node_id)
    seqs = (await _cluster_seqs(own_cluster, parts))[2]
    assert seqs == sorted(seqs) and len(seqs) == 2 * sum(partition_for(job["shop_id"], 4) == 2 for job in _jobs(500))


@pytest.mark.server
async def test_cluster_connection_killed_mid_publish_is_not_sent_again(cluster: LocalCluster, uid: str) -> None:
    parts = Partitioning(uid, 6)
    progress: list[int] = []

    def jobs() -> Iterator[dict[str, Any]]:
        for job in _jobs(6000):
            if job["seq"] == 3000:  # a chunk is on the wire: kill the publisher's connections on every master
                for node in cluster.masters:
                    for client in node.client().client_list(_type="normal"):
                        if client["cmd"] == "xadd":
                            node.client().client_kill_filter(_id=client["id"])
            yield job

    async with Publisher(cluster.urls[0], chunk_size=500) as pub:
        with pytest.raises(RedisUnavailable) as caught:
            await pub.publish_stream(uid, jobs(), key="shop_id", partitions=6, on_progress=progress.append)
    confirmed = progress[-1] if progress else 0
    sent = re.search(r"(\d+) entries were confirmed, (\d+) more were sent without a reply", str(caught.value))
    assert sent is not None and int(sent.group(1)) == confirmed, str(caught.value)
    seqs = [seq for part in (await _cluster_seqs(cluster, parts)).values() for seq in part]
    assert len(seqs) == len(set(seqs))  # nothing written twice
    assert confirmed <= len(seqs) <= confirmed + int(sent.group(2))


@pytest.mark.server
async def test_cluster_wait_replicas_confirms_each_chunk_on_a_replica(
        start_cluster: Callable[..., LocalCluster], uid: str) -> None:
    local = start_cluster(masters=3, replicas_per_master=1)
    parts = Partitioning(uid, 6)
    async with Publisher(local.urls[0], chunk_size=300) as pub:
        ids = await pub.publish_many(uid, _jobs(1500), key="shop_id", partitions=6, wait_replicas=(1, 2000))
    assert len(ids) == 1500
    for index, key in enumerate(parts.keys):  # WAIT 1 answered: each master's replica holds its partitions
        master = local.master_for_slot(parts.slot(index))
        replica = next(node for node in local.replicas if node.replica_of is master)
        with redis.Redis(port=replica.port, single_connection_client=True) as client:
            client.execute_command("READONLY")
            assert client.xlen(key) == master.client().xlen(key) > 0


@pytest.mark.server
async def test_cluster_publish_after_a_master_is_killed_waits_for_its_replica(
        start_cluster: Callable[..., LocalCluster], uid: str) -> None:
    local = start_cluster(masters=3, replicas_per_master=1, node_timeout_ms=1000)
    parts = Partitioning(uid, 6)
    async with Publisher(local.urls[0]) as pub:
        await pub.publish_many(uid, _jobs(600), key="shop_id", partitions=6)
        local.kill(local.masters[1])
        # An idle pooled connection to the dead master: if the pool hands it out, what was sent on it is lost and
        # said so; if the pool notices the close first, nothing was sent, and the publish waits like the next one.
        second: Exception | None = None
        try:
            await pub.publish_many(uid, [{**job, "seq": job["seq"] + 600} for job in _jobs(600)], key="shop_id")
        except RedisUnavailable as exc:
            second = exc
        assert second is None or "entries were confirmed" in str(second)
        # the node refuses connections now: the publish waits, reads the map again and follows the promoted replica
        await pub.publish_many(uid, [{**job, "seq": job["seq"] + 1200} for job in _jobs(600)], key="shop_id")
        assert (await pub.router()).redirects["wait"] >= 1
    seqs = [seq for part in (await _cluster_seqs(local, parts)).values() for seq in part]
    assert len(seqs) == len(set(seqs)) and set(range(600)) | set(range(1200, 1800)) <= set(seqs)
    assert second is not None or set(range(600, 1200)) <= set(seqs)
