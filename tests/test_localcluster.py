"""The loopback cluster launcher: its parsers and port choice without a server, then real clusters (3 masters
shared by the session; 3 masters + 3 replicas of its own for the failover test)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.exceptions import MovedError

from fastworker.localcluster import (
    BUS_PORT_OFFSET,
    SLOTS,
    ClusterError,
    ClusterNode,
    LocalCluster,
    NodeLine,
    covered_slots,
    ephemeral_port_floor,
    even_slot_ranges,
    free_cluster_port,
    parse_cluster_nodes,
    parse_info,
    topology,
)
from fastworker.partitions import Partitioning, key_slot
from fastworker.server import SERVER_BIN_ENV, ServerError

pytest_plugins = ["cluster_fixtures"]

# One cluster seen from two of its nodes: Valkey 8+ adds `,hostname` to the address; `myself` differs; node c is a
# replica of a; a slot being migrated is listed in brackets and not served yet.
VIEW_FROM_A = """\
aaa 127.0.0.1:7000@17000,host-a myself,master - 0 0 1 connected 0-5460 [5461->-bbb]
bbb 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922 10923
ccc 127.0.0.1:7002@17002 slave aaa 0 1 1 connected
ddd 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected
"""
VIEW_FROM_B = """\
aaa 127.0.0.1:7000@17000 master - 0 1 1 connected 0-5460
bbb 127.0.0.1:7001@17001,host-b myself,master - 0 0 2 connected 5461-10922 10923
ccc 127.0.0.1:7002@17002 slave aaa 0 1 1 connected
ddd 127.0.0.1:7003@17003 master,fail? - 0 1 3 disconnected 10924-16383
"""


def test_parse_cluster_nodes_reads_addresses_roles_and_served_slots() -> None:
    lines = parse_cluster_nodes(VIEW_FROM_A)
    assert lines[0] == NodeLine("aaa", 7000, frozenset({"master"}), None, ((0, 5460),))
    assert lines[1].slots == ((5461, 10922), (10923, 10923))
    assert (lines[2].master_id, lines[2].is_master, lines[2].healthy) == ("aaa", False, True)
    assert not lines[3].healthy


def test_topology_is_the_same_from_every_node_that_agrees() -> None:
    view = topology(parse_cluster_nodes(VIEW_FROM_A))
    assert view == topology(parse_cluster_nodes(VIEW_FROM_B))
    assert view == ((0, 5460, 7000, (7002,)), (5461, 10922, 7001, ()), (10923, 10923, 7001, ()))
    assert covered_slots(view) == 10924  # the failed node's slots are not counted as served


def test_parse_info_reads_fields_and_skips_sections() -> None:
    text = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n\r\ncluster_state:ok\r\n"
    assert parse_info(text) == {"role": "slave", "master_link_status": "up", "cluster_state": "ok"}


@pytest.mark.parametrize("masters", [1, 2, 3, 5, 7])
def test_even_slot_ranges_cover_every_slot_once(masters: int) -> None:
    ranges = even_slot_ranges(masters)
    assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
    assert all(ranges[i][1] + 1 == ranges[i + 1][0] for i in range(masters - 1))
    sizes = [last - first + 1 for first, last in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_free_cluster_port_pairs_avoid_the_ephemeral_range_and_taken_ports() -> None:
    taken: set[int] = set()
    for _ in range(20):
        port = free_cluster_port(taken)
        assert port + BUS_PORT_OFFSET < ephemeral_port_floor()
        assert not {port, port + BUS_PORT_OFFSET, port - BUS_PORT_OFFSET} & taken
        taken |= {port, port + BUS_PORT_OFFSET}


def test_local_cluster_says_when_the_binary_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(SERVER_BIN_ENV, "no-such-server-binary")
    with pytest.raises(ServerError, match=r"no-such-server-binary.*not an executable"):
        LocalCluster()
    with pytest.raises(ServerError, match=r"binary '.*missing' is not an executable"):
        LocalCluster(binary=str(tmp_path / "missing"), base_dir=tmp_path)
    (tmp_path / "fails").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "fails").chmod(0o755)
    with pytest.raises(ClusterError, match=r"cluster node on port \d+ did not start: .*fails exited with 1"):
        LocalCluster(binary=str(tmp_path / "fails"), base_dir=tmp_path).start()


def _server_pids(base_dir: Path) -> list[int]:
    """The processes running with a working directory under base_dir: the nodes of that cluster."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "cwd")).is_relative_to(base_dir):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.server
def test_local_cluster_failing_start_leaves_no_process(tmp_path: Path) -> None:
    # the nodes start, then the wait for cluster_state:ok runs out (a new master waits 2 s before it says ok)
    local = LocalCluster(masters=3, base_dir=tmp_path)
    with pytest.raises(ClusterError, match=r"timed out after 0\.3 s waiting for"):
        local.start(timeout_s=0.3)
    assert local.nodes == []
    assert _server_pids(tmp_path) == []


@pytest.mark.server
def test_cluster_three_masters_cover_every_slot_and_agree(cluster: LocalCluster) -> None:
    view = cluster.wait_until_ok(timeout_s=5)
    assert [(first, last) for first, last, _, _ in view] == even_slot_ranges(3)
    assert [port for _, _, port, _ in view] == [node.port for node in cluster.masters]
    for node in cluster.nodes:
        info = parse_info(node.command("CLUSTER", "INFO"))
        assert (info["cluster_state"], info["cluster_slots_assigned"], info["cluster_known_nodes"]) == (
            "ok", str(SLOTS), "3")
    assert cluster.start_s is not None and cluster.start_s < 15
    assert cluster.startup_nodes == [("127.0.0.1", node.port) for node in cluster.masters]


@pytest.mark.server
def test_cluster_master_for_slot_is_where_the_server_sends_a_key(cluster: LocalCluster) -> None:
    for slot in (0, 5460, 5461, 10922, 16383):
        key = next(f"t-localcluster-{i}" for i in range(1_000_000) if key_slot(f"t-localcluster-{i}") == slot)
        master = cluster.master_for_slot(slot)
        assert master.client().set(key, "1")
        for node in cluster.nodes:
            if node is not master:
                with pytest.raises(MovedError, match=f"^{slot} 127.0.0.1:{master.port}$"):
                    node.client().set(key, "1")


@pytest.mark.server
def test_cluster_with_replicas_fails_over_after_kill_of_a_master(
        start_cluster: Callable[..., LocalCluster]) -> None:
    local = start_cluster(masters=3, replicas_per_master=1, node_timeout_ms=2000)
    _fail_over(local)
    local.stop()
    assert _server_pids(local.base_dir) == []


def _fail_over(local: LocalCluster) -> None:
    assert local.start_s is not None
    print(f"3+3 cluster started in {local.start_s:.2f} s")
    partitions = Partitioning("t-failover", 3)
    victim = local.master_for_slot(partitions.slot(0))
    survivor_key = partitions.key(1)
    client = victim.client()
    for n in range(100):
        client.xadd(partitions.key(0), {"n": n})
    assert client.execute_command("WAIT", 1, 2000) == 1  # both copies hold the 100 entries
    replica = next(node for node in local.replicas if node.replica_of is victim)

    killed_at = time.monotonic()
    local.kill(victim)
    other = local.master_for_slot(partitions.slot(1))
    assert other.client().xadd(survivor_key, {"n": 0})  # other partitions keep taking writes meanwhile
    pause_s = _first_write_after(replica, partitions.key(0), killed_at)
    print(f"failover pause (kill -9 to first XADD accepted by the promoted replica): {pause_s:.2f} s")
    assert local.wait_for_failover(victim, timeout_s=30) is replica
    assert replica.client().xlen(partitions.key(0)) == 101
    assert pause_s < 15


def _first_write_after(replica: ClusterNode, key: str, since: float, timeout_s: float = 30) -> float:
    """Seconds from `since` to the first XADD on `key` that the replica accepts (it answers MOVED until promoted)."""
    while time.monotonic() - since < timeout_s:
        try:
            replica.client().xadd(key, {"n": "after"})
            return time.monotonic() - since
        except (redis.ResponseError, redis.ConnectionError):
            time.sleep(0.01)
    raise AssertionError(f"port {replica.port} did not take writes within {timeout_s} s")
