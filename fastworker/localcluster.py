"""A Valkey (or Redis) cluster on loopback, from the embedded server's binary: for the cluster tests, the demo and
the benchmarks.

Each node is an `EmbeddedServer` started with `cluster-enabled yes`, so the binary, the readiness check, the stop
and the die-with-parent guarantee are the embedded server's. The launcher adds what a cluster needs: port pairs
(the bus listens on port + 10000), even slot ranges (`CLUSTER ADDSLOTSRANGE`), the handshake (`CLUSTER MEET`),
replicas (`CLUSTER REPLICATE`), and waits on conditions: every node `cluster_state:ok` and every node reporting the
same topology. Invariant: no node outlives the cluster, whether it stopped, failed to start, or its owner died.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from fastworker.server import EmbeddedServer, ServerError, default_binary

if TYPE_CHECKING:
    import redis

SLOTS = 16384
BUS_PORT_OFFSET = 10000  # the cluster bus port is the client port + 10000 (the servers' default)
LOOPBACK = "127.0.0.1"
_POLL_S = 0.02  # between two looks at a condition; the timeouts bound the wait
_BAD_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})

T = TypeVar("T")


class ClusterError(ServerError):
    """The local cluster could not be started, or did not reach the awaited state in time."""


class ClusterUnsupported(ClusterError):
    """The server binary cannot build a cluster as this launcher does: it is older than Redis 7.0 and has no
    `CLUSTER ADDSLOTSRANGE`. Tests skip on it."""


def ephemeral_port_floor() -> int:
    """The lowest port the kernel hands out as a connection's source port (Linux; 32768 elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        # the servers bind with SO_REUSEADDR: a port in TIME_WAIT is as good for them as a free one
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: Iterable[int] = (), tries: int = 500) -> int:
    """A loopback port P such that P and its bus port P + 10000 are both free and neither is in `taken`.

    Chosen below the kernel's ephemeral range, so that no client connection gets either port as its source
    port between this check and the server's bind. Raises ClusterError when no such pair is found in `tries`.
    """
    avoid = set(taken)
    high = min(ephemeral_port_floor(), 65536) - BUS_PORT_OFFSET
    low = 10000 if high > 12000 else 1024
    for _ in range(tries):
        port = random.randrange(low, high) if high > low else random.randrange(1024, 65536 - BUS_PORT_OFFSET)
        pair = {port, port + BUS_PORT_OFFSET}
        if pair & avoid or {port - BUS_PORT_OFFSET} & avoid:
            continue
        if _bindable(port) and _bindable(port + BUS_PORT_OFFSET):
            return port
    raise ClusterError(f"no free loopback port pair (P, P+{BUS_PORT_OFFSET}) found in {tries} tries")


def _executable(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise ServerError(f"server binary {binary!r} is not an executable")
    return found


def even_slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The slots split into `masters` contiguous inclusive ranges [(first, last), ...], master m owning
    [m * 16384 // masters, (m + 1) * 16384 // masters - 1]."""
    if not 1 <= masters <= SLOTS:
        raise ValueError(f"masters must be 1..{SLOTS}, got {masters}")
    return [(m * SLOTS // masters, (m + 1) * SLOTS // masters - 1) for m in range(masters)]


@dataclass(frozen=True)
class NodeLine:
    """One line of `CLUSTER NODES`: a node as another node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None  # the master a replica follows; None for a master
    slots: tuple[tuple[int, int], ...]  # inclusive ranges served, in order

    @property
    def healthy(self) -> bool:
        return not self.flags & _BAD_FLAGS

    @property
    def is_master(self) -> bool:
        return "master" in self.flags


def _slot_ranges(tokens: list[str]) -> tuple[tuple[int, int], ...]:
    ranges = []
    for token in tokens:
        if token.startswith("["):  # a slot being imported or migrated: not served by this node yet
            continue
        first, _, last = token.partition("-")
        ranges.append((int(first), int(last or first)))
    return tuple(sorted(ranges))


def parse_cluster_nodes(text: str) -> list[NodeLine]:
    """`CLUSTER NODES` text into NodeLines. The address field is `ip:port@busport[,hostname]`; the flag `myself`
    is dropped, so that every node's description of the same cluster compares equal."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split(",", 1)[0].split("@", 1)[0]
        flags = frozenset(parts[2].split(",")) - {"myself"}
        nodes.append(NodeLine(node_id=parts[0], port=int(address.rsplit(":", 1)[1]), flags=flags,
                              master_id=None if parts[3] == "-" else parts[3], slots=_slot_ranges(parts[8:])))
    return nodes


def parse_info(text: str) -> dict[str, str]:
    """`CLUSTER INFO` or `INFO` text into {field: value}."""
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


Topology = tuple[tuple[int, int, int, tuple[int, ...]], ...]  # (first slot, last slot, master port, replica ports)


def topology(lines: list[NodeLine]) -> Topology:
    """The healthy part of one node's view: each slot range with the port of its master and of that master's
    healthy replicas. Nodes that agree on the cluster produce equal topologies."""
    healthy = [line for line in lines if line.healthy]
    replicas: dict[str, list[int]] = {}
    for line in healthy:
        if line.master_id is not None:
            replicas.setdefault(line.master_id, []).append(line.port)
    rows = [(first, last, line.port, tuple(sorted(replicas.get(line.node_id, ()))))
            for line in healthy if line.is_master for first, last in line.slots]
    return tuple(sorted(rows))


def covered_slots(view: Topology) -> int:
    return sum(last - first + 1 for first, last, _, _ in view)


@dataclass(eq=False)
class ClusterNode:
    """One node: its server process and the id the cluster knows it by. `replica_of` is the master it was started
    to follow (None for a master); after a failover, `LocalCluster.master_for_slot` tells who serves what."""

    server: EmbeddedServer
    replica_of: ClusterNode | None = None
    node_id: str = ""
    killed: bool = False
    served: tuple[tuple[int, int], ...] = ()  # the slot ranges it served when it was killed
    _client: redis.Redis | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> redis.Redis:
        """A blocking redis-py client of this node alone (decoded replies, 2 s socket timeout), made once."""
        if self._client is None:
            import redis

            self._client = redis.Redis(host=LOOPBACK, port=self.port, decode_responses=True,
                                       socket_timeout=2.0, socket_connect_timeout=2.0)
        return self._client

    def command(self, *args: str | int) -> str:
        """One command, its reply as text. The words go as separate arguments (`"CLUSTER", "NODES"`), so that
        redis-py hands back the server's reply instead of its own parse of it."""
        return str(self.client().execute_command(*args))  # type: ignore[no-untyped-call]

    def view(self) -> list[NodeLine]:
        return parse_cluster_nodes(self.command("CLUSTER", "NODES"))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _wait(condition: Callable[[], T | None], timeout_s: float, what: Callable[[], str]) -> T:
    """Poll `condition` until it returns a value other than None; ClusterError naming `what()` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, _redis_errors()):
            result = condition()
            if result is not None:
                return result
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s:g} s waiting for {what()}")
        time.sleep(_POLL_S)


def _redis_errors() -> type[Exception]:
    import redis.exceptions

    return redis.exceptions.RedisError


class LocalCluster:
    """A cluster of `masters` masters with `replicas_per_master` replicas each, on 127.0.0.1.

    Use as a context manager, or `start()` / `stop()`. Masters own equal contiguous slot ranges, the m-th of
    `masters` the m-th range (see `even_slot_ranges`). `node_timeout_ms` is the servers' `cluster-node-timeout`:
    how long a master may be unreachable before its replica takes over, so about the pause a failover costs.
    Without `base_dir` a temporary directory holds the nodes' files and is removed on stop.
    """

    def __init__(self, masters: int = 3, replicas_per_master: int = 0, node_timeout_ms: int = 2000, *,
                 base_dir: str | Path | None = None, binary: str | None = None,
                 options: dict[str, str] | None = None) -> None:
        if masters < 1 or replicas_per_master < 0 or node_timeout_ms < 1:
            raise ValueError(f"need masters >= 1, replicas_per_master >= 0, node_timeout_ms >= 1; got {masters}, "
                             f"{replicas_per_master}, {node_timeout_ms}")
        self.binary = _executable(binary) if binary else default_binary()
        self.masters_count = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="fastworker-cluster-")).resolve()
        self.options = options or {}
        self.nodes: list[ClusterNode] = []
        self.start_s: float | None = None  # how long the last start took, from the first process to all agreeing

    # -- what the cluster is made of

    @property
    def masters(self) -> list[ClusterNode]:
        """The nodes started as masters (a failover may have demoted one since)."""
        return [node for node in self.nodes if node.replica_of is None]

    @property
    def replicas(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.replica_of is not None]

    @property
    def urls(self) -> list[str]:
        """redis:// URLs of the running nodes, masters first (empty before start and after stop)."""
        return [node.url for node in self._running()]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of the running nodes, for a cluster client's start-up list."""
        return [(LOOPBACK, node.port) for node in self._running()]

    def _running(self) -> list[ClusterNode]:
        return [node for node in self.nodes if not node.killed and node.server.process is not None]

    def _live(self) -> list[ClusterNode]:
        """The running nodes; ClusterError when there is none to ask."""
        live = self._running()
        if not live:
            raise ClusterError("no node of this cluster is running (not started, stopped, or all killed)")
        return live

    def node_at(self, port: int) -> ClusterNode:
        """The node listening on `port`; KeyError when none of this cluster does."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    # -- lifecycle

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        """Start the nodes, assign the slots, join them and their replicas, and wait until every node reports
        `cluster_state:ok` and the same topology. Returns self. Raises ClusterUnsupported when the binary cannot
        run such a cluster, ClusterError on a timeout (`timeout_s` bounds each wait); on any failure every node
        started so far is stopped before the error propagates. Takes about 2 s: a new master waits 2 s before it
        reports ok, so that a restarted one cannot take writes before the cluster has had a say."""
        if self.nodes:
            return self
        began = time.monotonic()
        try:
            self._spawn()
            self._assign_slots()
            self._meet(timeout_s)
            self._attach_replicas(timeout_s)
            self.wait_until_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - began
        return self

    def _node_options(self) -> dict[str, str]:
        options = {"cluster-enabled": "yes", "cluster-config-file": "nodes.conf",
                   "cluster-node-timeout": str(self.node_timeout_ms),
                   # a replica's first sync would otherwise wait 5 s for more replicas to share the transfer
                   "repl-diskless-sync-delay": "0"}
        options.update(self.options)
        return options

    def _spawn(self) -> None:
        total = self.masters_count * (1 + self.replicas_per_master)
        for index in range(total):
            master = self.nodes[index % self.masters_count] if index >= self.masters_count else None
            self.nodes.append(ClusterNode(self._start_server(), replica_of=master))
        for node in self.nodes:
            node.node_id = node.command("CLUSTER", "MYID")

    def _start_server(self, attempts: int = 3) -> EmbeddedServer:
        """One node's server on a fresh port pair. A port can be taken between our look and the server's bind,
        so a failed start is tried again on other ports before it counts."""
        taken = {port for node in self.nodes for port in (node.port, node.port + BUS_PORT_OFFSET)}
        for attempt in range(attempts):
            port = free_cluster_port(taken)
            server = EmbeddedServer(port=port, data_dir=self.base_dir / f"node-{port}", binary=self.binary,
                                    options=self._node_options())
            try:
                return server.start()
            except ServerError as exc:
                server.stop()
                if attempt == attempts - 1:
                    raise ClusterError(f"cluster node on port {port} did not start: {exc}") from exc
                taken |= {port, port + BUS_PORT_OFFSET}
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _assign_slots(self) -> None:
        for node, (first, last) in zip(self.masters, even_slot_ranges(self.masters_count), strict=True):
            try:
                node.command("CLUSTER", "ADDSLOTSRANGE", first, last)
            except _redis_errors() as exc:
                if "unknown" in str(exc).lower():
                    raise ClusterUnsupported(f"{self.binary} has no CLUSTER ADDSLOTSRANGE (Redis 7.0 or newer and "
                                             f"Valkey have it): {exc}") from exc
                raise ClusterError(f"CLUSTER ADDSLOTSRANGE {first} {last} on port {node.port}: {exc}") from exc

    def _meet(self, timeout_s: float) -> None:
        """Introduce every node to the first; gossip does the rest. Waits until every node knows every other one,
        past the handshake, since CLUSTER REPLICATE needs its master known."""
        first = self.nodes[0]
        for node in self.nodes[1:]:
            first.command("CLUSTER", "MEET", LOOPBACK, node.port)
        ids = {node.node_id for node in self.nodes}

        def all_known() -> bool | None:
            return all({line.node_id for line in node.view() if "handshake" not in line.flags} >= ids
                       for node in self.nodes) or None

        _wait(all_known, timeout_s, lambda: f"all {len(self.nodes)} nodes to know each other")

    def _attach_replicas(self, timeout_s: float) -> None:
        for node in self.replicas:
            self._replicate(node, timeout_s)

    @staticmethod
    def _replicate(node: ClusterNode, timeout_s: float) -> None:
        assert node.replica_of is not None
        master_id = node.replica_of.node_id
        # -ERR Unknown node (retried by _wait) until this node has heard of its master through gossip
        _wait(lambda: node.command("CLUSTER", "REPLICATE", master_id) == "OK" or None, timeout_s,
              lambda: f"port {node.port} to become a replica of port {node.replica_of and node.replica_of.port}")

    def wait_until_ok(self, timeout_s: float = 30.0) -> Topology:
        """Wait until every live node reports `cluster_state:ok` and the same topology, all 16384 slots covered,
        each started master with its replicas, and each replica's link to its master up. Returns the topology
        (sorted (first slot, last slot, master port, replica ports) rows). ClusterError after `timeout_s`."""
        return _wait(self._settled, timeout_s, self._describe)

    def _settled(self) -> Topology | None:
        live = self._live()
        views = [topology(node.view()) for node in live]
        if any(view != views[0] for view in views) or covered_slots(views[0]) != SLOTS:
            return None
        if not all(parse_info(node.command("CLUSTER", "INFO")).get("cluster_state") == "ok" for node in live):
            return None
        serving = {port for _, _, port, replicas in views[0] for port in (port, *replicas)}
        if serving & {node.port for node in self.nodes if node.killed}:
            return None  # a killed node is still taken for healthy: its failover has not happened yet
        if not {node.port for node in self.masters if not node.killed} <= serving:
            return None  # after a failover a promoted replica serves; before one, every master must
        if any(len(replicas) < self._expected_replicas(port) for _, _, port, replicas in views[0]):
            return None
        return views[0] if all(self._replica_linked(node) for node in live) else None

    @staticmethod
    def _replica_linked(node: ClusterNode) -> bool:
        """True for a master, and for a replica whose link to its master is up (its data synced)."""
        info = parse_info(node.command("INFO", "replication"))
        return info.get("role") != "slave" or info.get("master_link_status") == "up"

    def _expected_replicas(self, master_port: int) -> int:
        return sum(1 for node in self._running() if node.replica_of is not None and node.replica_of.port == master_port)

    def _describe(self) -> str:
        states = []
        for node in self._running():
            try:
                state = parse_info(node.command("CLUSTER", "INFO")).get("cluster_state", "?")
                rows = topology(node.view())
                states.append(f"{node.port}: state={state} slots={covered_slots(rows)} masters={len(rows)}")
            except (OSError, _redis_errors()) as exc:
                states.append(f"{node.port}: {exc}")
        return "the cluster to settle (" + "; ".join(states) + ")"

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 5 s) and remove the temporary directory. Idempotent."""
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            node.close()
            node.server.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- who serves what, and faults

    def master_for_slot(self, slot: int) -> ClusterNode:
        """The node serving `slot` now, as the first live node reports it. ValueError for a slot outside 0..16383,
        ClusterError when no healthy master serves it."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"slot must be 0..{SLOTS - 1}, got {slot}")
        for first, last, port, _ in topology(self._live()[0].view()):
            if first <= slot <= last:
                return self.node_at(port)
        raise ClusterError(f"no healthy master serves slot {slot}")

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL the node, as a crash would. A master's replica takes over after about `node_timeout_ms`
        (`wait_for_failover`); the slots it served are remembered in `node.served`."""
        with contextlib.suppress(OSError, _redis_errors(), IndexError):
            others = [other for other in self._live() if other is not node]
            node.served = tuple((first, last) for first, last, port, _ in topology(others[0].view())
                                if port == node.port)
        node.close()
        node.server.kill()
        node.killed = True

    def wait_for_failover(self, dead: ClusterNode, timeout_s: float = 30.0) -> ClusterNode:
        """Wait until the live nodes agree again with every slot served (`wait_until_ok`) after the master `dead`
        was killed; returns the node that took over its slots. ClusterError when `dead` served no slots, or after
        `timeout_s` (a master without a replica never fails over)."""
        if not dead.killed or not dead.served:
            raise ClusterError(f"port {dead.port} was not a killed master: it left no slots to take over")
        self.wait_until_ok(timeout_s)
        return self.master_for_slot(dead.served[0][0])
