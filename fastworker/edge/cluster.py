"""Cluster routing: which server a key's command goes to, and what to do when a cluster refuses it.

A `Router` is made by `Router.discover(streams)`: on a standalone server (INFO cluster says `cluster_enabled:0`)
every slot goes to that server over the pool `streams` holds; on a cluster node it reads the slot map (CLUSTER
SHARDS, or CLUSTER SLOTS on servers without it) and keeps one connection pool per master, made from the URL with
only the host and port replaced, so credentials, TLS options and timeouts are the URL's. redis-py's RedisCluster
is not used: it sends two COMMAND GETKEYS round trips per command to learn keys we already know, and its retry
re-sends a write whose reply was lost.

`Router.exchange` sends commands whose slots the caller computed, one pipeline per master, concurrently, and
handles what the cluster refuses. Invariant: a command is sent again only when the server said it did not run it:
- MOVED: the map is read again (the named node serves the slot at once) and the refused commands re-sent;
- ASK: the refused command goes to the named node, preceded by ASKING, this once;
- TRYAGAIN, CLUSTERDOWN, and a node that refuses the connection before anything was sent: wait with jittered
  exponential backoff, read the map again, and re-send, for at most `retry_window_s`;
- a command sent on a connection that then failed has an unknown fate: it is never re-sent; the exchange reports
  it as lost and stops re-sending anything.
Re-sends go in the commands' order. MOVED and ASK refuse a key's commands from some point on, so a slot's order is
kept; a CLUSTERDOWN or TRYAGAIN that clears while one pipeline is being run can let a later command of a slot through
before an earlier one that was refused and is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fastworker.edge.errors import (
    ClusterRedirectError,
    Redirect,
    is_no_permission,
    is_refused_by_cluster,
    redirect_target,
    translate,
)
from fastworker.edge.link import Link
from fastworker.edge.streams import Streams
from fastworker.edge.wire import Command, pack
from fastworker.errors import FastworkerError, RedisCommandError, RedisTLSError, RedisUnavailable
from fastworker.partitions import SLOTS

RETRY_WINDOW_S = 10.0  # longer than a failover at the default node timeouts (about 3 s at 2000 ms, 8 s at 5000 ms)
BACKOFF_FIRST_S = 0.01
BACKOFF_MAX_S = 0.5
_ASKING = pack([("ASKING",)])


@dataclass(frozen=True, order=True)
class Node:
    """A server by its address as the cluster announces it (or the URL's, for a standalone server)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _NoReply:
    """The reply of a command that got none: never sent, refused until the end, or lost with its connection."""

    def __repr__(self) -> str:
        return "NO_REPLY"


NO_REPLY: Any = _NoReply()
Routed = tuple[int, bytes]  # (slot, one command packed in RESP)


@dataclass
class Exchange:
    """What became of the commands of one `Router.exchange`, index for index.

    `replies[i]`: the reply (bytes, int, list; a server error as a redis-py exception value; ClusterRedirectError
    when the cluster kept refusing it), or NO_REPLY when it has none. `nodes[i]`: the node that answered. `lost`:
    commands sent on a connection that failed before their reply came (maybe applied); `unsent`: commands left
    unsent or refused when the exchange stopped on that failure (not applied); `error`: that failure.
    `trailers[node]`: the reply to the trailing command sent after the node's last batch (e.g. WAIT)."""

    replies: list[Any]
    nodes: list[Node | None]
    lost: int = 0
    unsent: int = 0
    error: FastworkerError | None = None
    trailers: dict[Node, Any] = field(default_factory=dict)


def _pairs(value: Any) -> dict[bytes, Any]:
    """A RESP3 map, or the flat [name, value, ...] list RESP2 gives for it, as a dict with bytes names."""
    if isinstance(value, dict):
        return {(k if isinstance(k, bytes) else str(k).encode()): v for k, v in value.items()}
    return {name if isinstance(name, bytes) else str(name).encode(): item
            for name, item in zip(value[::2], value[1::2], strict=False)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _host(announced: Any, seed_host: str) -> str:
    """An announced address; "" or "?" (unknown to the node itself) means the host we reached the cluster by."""
    host = _text(announced or "")
    return seed_host if host in ("", "?") else host


def parse_shards(reply: Any, seed_host: str, tls: bool) -> list[tuple[int, int, Node]]:
    """CLUSTER SHARDS into (first slot, last slot, master) rows: each shard's master, by its `endpoint` (else `ip`),
    on its `tls-port` when the URL is rediss:// and the node has one. After a failover a shard lists its failed
    master beside the promoted one, both as masters: the one whose health is `online` is taken. Shards without a
    master are left out."""
    rows = []
    for shard in reply:
        info = _pairs(shard)
        masters = [node for node in map(_pairs, info.get(b"nodes") or []) if _text(node.get(b"role")) == "master"]
        if not masters:
            continue
        node = next((node for node in masters if _text(node.get(b"health", b"online")) == "online"), masters[0])
        port = node.get(b"tls-port") if tls and node.get(b"tls-port") else node.get(b"port")
        master = Node(_host(node.get(b"endpoint") or node.get(b"ip"), seed_host), int(port or 0))
        bounds = [int(bound) for bound in info.get(b"slots") or []]
        rows += [(bounds[i], bounds[i + 1], master) for i in range(0, len(bounds) - 1, 2)]
    return rows


def parse_slots(reply: Any, seed_host: str) -> list[tuple[int, int, Node]]:
    """CLUSTER SLOTS into (first slot, last slot, master) rows: the first node of each range is its master."""
    return [(int(row[0]), int(row[1]), Node(_host(row[2][0], seed_host), int(row[2][1]))) for row in reply]


class SlotMap:
    """Who serves each of the 16384 slots; None for a slot no master serves (uncovered, or mid-failover)."""

    def __init__(self, rows: Iterable[tuple[int, int, Node]]) -> None:
        self._owners: list[Node | None] = [None] * SLOTS
        for first, last, node in rows:
            self._owners[first:last + 1] = [node] * (last - first + 1)

    def node_for(self, slot: int) -> Node | None:
        return self._owners[slot]

    def move(self, slot: int, node: Node) -> None:
        """What a MOVED reply says: `slot` is now served by `node`."""
        self._owners[slot] = node

    @property
    def masters(self) -> list[Node]:
        """The masters serving at least one slot, sorted."""
        return sorted({node for node in self._owners if node is not None})


def node_url(url: str, node: Node) -> str:
    """`url` with its host and port replaced by `node`'s: the same scheme, credentials, database and options."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + str(node)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Links:
    """One Link per node for a series of exchanges by one task (`Router.links()`); `aclose()` returns them."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._links: dict[Node, Link] = {}

    async def get(self, node: Node) -> Link:
        """The node's link, opened (again, after it broke). Raises RedisUnavailable (nothing sent),
        RedisAuthError, RedisTLSError."""
        link = self._links.get(node)
        if link is not None and not link.broken:
            return link
        if link is not None:
            await link.aclose(discard=True)
        link = Link(pool=self._router.pool(node), url=self._router.url_of(node))
        await link.open()
        self._links[node] = link
        return link

    async def aclose(self, *, discard: bool = False) -> None:
        """Return every connection to its pool (dropped when `discard`, or when it broke)."""
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.aclose(discard=discard)


@dataclass
class _Round:
    """One node's share of one round of an exchange: what it was sent and what came back."""

    node: Node
    indexes: list[int]
    replies: list[Any] = field(default_factory=list)
    trailer: Any = NO_REPLY
    error: FastworkerError | None = None
    sent: bool = False  # False: the connection failed before a byte was written (nothing can have been applied)
    final: bool = False  # a refusal a re-send cannot cure (credentials, TLS): the exchange stops


class Router:
    """Routes commands by slot: to the one server of a standalone URL, or to each slot's master on a cluster.

    `Router.discover(streams)` makes one; `aclose()` closes the cluster's node pools (a standalone router uses the
    pool of `streams`, which stays open). Safe to share between tasks; each task uses `links()` of its own."""

    def __init__(self, streams: Streams, slot_map: SlotMap | None, *, retry_window_s: float = RETRY_WINDOW_S) -> None:
        self._streams = streams
        self.url = streams.url
        self._seed_host = urlsplit(streams.url).hostname or "127.0.0.1"
        self._tls = urlsplit(streams.url).scheme == "rediss"
        kwargs = streams.redis.connection_pool.connection_kwargs
        self._standalone = Node(str(kwargs.get("host", self._seed_host)), int(kwargs.get("port", 0) or 0))
        self._map = slot_map
        self._clients: dict[Node, aioredis.Redis] = {}
        self._socket_timeout_s = kwargs.get("socket_timeout")
        self.retry_window_s = retry_window_s
        self._refreshing: asyncio.Lock = asyncio.Lock()
        # refusals met so far, by kind ("moved", "ask", "wait": TRYAGAIN, CLUSTERDOWN, a connection refused)
        self.redirects: dict[str, int] = {"moved": 0, "ask": 0, "wait": 0}

    @classmethod
    async def discover(cls, streams: Streams, *, retry_window_s: float = RETRY_WINDOW_S) -> Router:
        """A router for the server `streams` reaches. HELLO without arguments (Redis 6.2+, Valkey; every ACL user
        may run it, and the protocol stays as it is) says `mode` cluster or standalone; older servers are asked
        INFO cluster, and where that is refused, CLUSTER SHARDS or SLOTS (a server refusing those too is taken for
        a standalone one). On a cluster the slot map is read at once. Raises RedisUnavailable, RedisAuthError (the
        connection refused), RedisTLSError, RedisCommandError (the slot map unreadable)."""
        router = cls(streams, None, retry_window_s=retry_window_s)
        async with Link(streams) as link:
            mode = await _mode(link)
            if mode == "standalone":
                return router
            rows = await router._read_map(link, probing=mode is None)
        if rows is not None:
            router._map = SlotMap(rows)
        return router

    @property
    def cluster(self) -> bool:
        """Whether the URL's server is a cluster node."""
        return self._map is not None

    @property
    def masters(self) -> list[Node]:
        """The masters serving slots (the one server, standalone), sorted."""
        return self._map.masters if self._map is not None else [self._standalone]

    def node_for(self, slot: int) -> Node | None:
        """The node serving `slot` as the map last read says; None when no master serves it."""
        return self._map.node_for(slot) if self._map is not None else self._standalone

    def assign(self, slot: int, node: Node) -> None:
        """Take `slot` for served by `node` until a MOVED reply or a refresh says otherwise, as a MOVED reply does
        (for tests: a stale map on purpose). No effect on a standalone router."""
        if self._map is not None:
            self._map.move(slot, node)

    def pool(self, node: Node) -> aioredis.ConnectionPool:
        """The connection pool of `node`: the URL's own on a standalone server, else one per node, made once."""
        if self._map is None:
            return self._streams.redis.connection_pool
        client = self._clients.get(node)
        if client is None:
            # as Streams makes its client: our retries, not redis-py's (which would re-send a lost write)
            client = aioredis.Redis.from_url(
                node_url(self.url, node), socket_timeout=self._socket_timeout_s,
                socket_connect_timeout=min(self._socket_timeout_s or 5.0, 5.0), retry=Retry(NoBackoff(), 0),
                health_check_interval=0)
            self._clients[node] = client
        return client.connection_pool

    def url_of(self, node: Node) -> str:
        return self.url if self._map is None else node_url(self.url, node)

    def links(self) -> Links:
        return Links(self)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # -- the slot map

    async def _read_map(self, link: Link, probing: bool = False) -> list[tuple[int, int, Node]] | None:
        """The slot map as `link`'s node sees it. When `probing` (INFO was refused), None where the server has
        cluster support disabled or refuses both commands (taken for a standalone server)."""
        [shards] = await link.exchange([("CLUSTER", "SHARDS")])
        if not isinstance(shards, Exception):
            return parse_shards(shards, self._seed_host, self._tls)
        if probing and "cluster support disabled" in str(shards):
            return None
        [slots] = await link.exchange([("CLUSTER", "SLOTS")])  # servers before Redis 7.0 have no SHARDS
        if not isinstance(slots, Exception):
            return parse_slots(slots, self._seed_host)
        if probing and ("cluster support disabled" in str(slots) or is_no_permission(slots)):
            return None
        raise translate(slots, link.url)

    async def refresh(self) -> None:
        """Read the slot map again, from the first master that answers (then the URL's server). Tasks that ask
        while a refresh is under way share it. Raises RedisUnavailable when no node answers."""
        if self._map is None:
            return
        if self._refreshing.locked():
            async with self._refreshing:
                return
        async with self._refreshing:
            failure: FastworkerError | None = None
            for node in [*self._map.masters, None]:
                try:
                    async with (Link(self._streams) if node is None else
                                Link(pool=self.pool(node), url=self.url_of(node))) as link:
                        rows = await self._read_map(link)
                except RedisUnavailable as exc:
                    failure = exc
                    continue
                if rows:
                    self._map = SlotMap(rows)
                    return
            raise failure or RedisUnavailable(f"no node of the cluster gave its slot map ({self.url})")

    # -- exchanges

    async def command(self, slot: int, command: Command) -> Any:
        """One command on the node serving `slot`, with the redirections handled; its reply (a server error
        raised, translated, with the server's error as its `__cause__`). Raises RedisUnavailable when its reply was
        lost (it may have been applied)."""
        links = self.links()
        try:
            result = await self.exchange([(slot, pack([command]))], links)
        finally:
            await links.aclose()
        if result.error is not None:
            raise result.error
        [reply] = result.replies
        if isinstance(reply, Exception):
            raise translate(reply, self.url) from reply  # the server's own error stays readable as the cause
        return reply

    async def exchange(self, routed: Sequence[Routed], links: Links, trailer: bytes | None = None) -> Exchange:
        """Send `routed` (slot, packed command) pairs, one pipeline per node, concurrently, with `trailer` (one
        packed command, e.g. WAIT) after each node's commands in every round; re-send what the cluster refused (see
        the module's rules). Never raises for a lost reply, a refusal, or a node refusing the connection (its
        RedisAuthError or RedisTLSError becomes `error`, its commands `unsent`): the Exchange says what became of each
        command."""
        result = Exchange([NO_REPLY] * len(routed), [None] * len(routed))
        todo, asking = list(range(len(routed))), dict[int, Node]()
        deadline = time.monotonic() + self.retry_window_s
        for attempt in range(1_000):  # the deadline ends it; the bound guards against a clock that stands still
            groups, uncovered = self._groups(routed, todo, asking)
            rounds = await asyncio.gather(*(self._round(links, node, indexes, routed, asking, trailer)
                                            for node, indexes in groups.items()))
            todo, asking, moved, wait = self._settle(result, rounds, uncovered)
            if not todo or result.error is not None:
                break
            if time.monotonic() > deadline:
                self._give_up(result, todo)
                break
            if wait or (moved and attempt > 0):
                await asyncio.sleep(_backoff_s(attempt))
            if moved or wait:
                await self._refresh_quietly()
        result.unsent += len(todo) if result.error is not None else 0
        return result

    def _groups(self, routed: Sequence[Routed], todo: list[int], asking: dict[int, Node]
                ) -> tuple[dict[Node, list[int]], list[int]]:
        """The commands to send, by node, each node's in their order; and those of slots no master serves."""
        by_slot: dict[int | Node, list[int]] = {}  # by slot first: a chunk has few slots, and ints hash fast
        for index in todo:
            slot_or_node = asking.get(index) or routed[index][0] if asking else routed[index][0]
            group = by_slot.get(slot_or_node)
            if group is None:
                group = by_slot[slot_or_node] = []
            group.append(index)
        groups: dict[Node, list[int]] = {}
        uncovered: list[int] = []
        for where, indexes in by_slot.items():
            node = where if isinstance(where, Node) else self.node_for(where)
            (uncovered if node is None else groups.setdefault(node, [])).extend(indexes)
        for indexes in groups.values():
            indexes.sort()  # merged from several slots: back in the commands' order (runs: timsort is quick)
        return groups, uncovered

    def _settle(self, result: Exchange, rounds: Sequence[_Round], uncovered: list[int]
                ) -> tuple[list[int], dict[int, Node], bool, bool]:
        """Record the rounds' replies in `result`; (commands to send again in order, those to ASK, whether the map
        moved, whether to wait first)."""
        again, asking, moved, wait = list(uncovered), dict[int, Node](), False, bool(uncovered)
        for done in rounds:
            if done.error is not None:
                wait = self._failed(result, done, again) or wait
                continue
            if done.trailer is not NO_REPLY:
                result.trailers[done.node] = done.trailer
            replies, nodes = result.replies, result.nodes
            for index, reply in zip(done.indexes, done.replies, strict=True):
                if type(reply) is bytes or not (isinstance(reply, Exception) and is_refused_by_cluster(reply)):
                    replies[index], nodes[index] = reply, done.node
                    continue
                again.append(index)
                result.replies[index] = reply  # kept should the re-sends run out
                target = redirect_target(reply)
                kind = "wait" if target is None else "ask" if target.ask else "moved"
                self.redirects[kind] += 1
                if target is None:
                    wait = True
                elif target.ask:
                    asking[index] = self._target_node(target, done.node)
                else:
                    moved = True
                    if self._map is not None:
                        self._map.move(target.slot, self._target_node(target, done.node))
        return sorted(again), asking, moved, wait

    def _failed(self, result: Exchange, done: _Round, again: list[int]) -> bool:
        """Record a round whose connection failed; whether to wait and send its commands again (True only when
        nothing was written and a retry may cure it: a node down or restarting, as in a failover)."""
        assert done.error is not None
        if done.sent:  # their fate is unknown: never sent again
            result.lost += len(done.indexes)
        again += [] if done.sent else done.indexes
        if done.sent or done.final:
            result.error = result.error or done.error
            return False
        self.redirects["wait"] += 1
        for index in done.indexes:  # the reason, should the re-sends run out
            result.replies[index] = done.error
        return True

    @staticmethod
    def _target_node(target: Redirect, asked: Node) -> Node:
        return Node(target.host or asked.host, target.port)

    def _give_up(self, result: Exchange, todo: list[int]) -> None:
        for index in todo:
            reply = result.replies[index]
            result.replies[index] = ClusterRedirectError(
                f"the cluster still refused the command after {self.retry_window_s:g} s of re-sends: "
                f"{reply if reply is not NO_REPLY else 'no master serves its slot'}")
        todo.clear()

    async def _refresh_quietly(self) -> None:
        """Read the map again; when no node answers now, keep the one we have (the next round will tell)."""
        with contextlib.suppress(RedisUnavailable, RedisCommandError):
            await self.refresh()

    async def _round(self, links: Links, node: Node, indexes: list[int], routed: Sequence[Routed],
                     asking: dict[int, Node], trailer: bytes | None) -> _Round:
        done = _Round(node, indexes)
        parts: list[bytes] = []
        for index in indexes:
            if index in asking:
                parts.append(_ASKING)
            parts.append(routed[index][1])
        if trailer is not None:
            parts.append(trailer)
        try:
            link = await links.get(node)
        except FastworkerError as exc:
            done.error, done.final = exc, not isinstance(exc, RedisUnavailable) or isinstance(exc, RedisTLSError)
            return done
        done.sent = True
        try:
            await link.send(b"".join(parts))
            replies = await link.replies(len(parts))
        except FastworkerError as exc:
            done.error = exc
            return done
        if trailer is not None:
            done.trailer = replies.pop()
        done.replies = _without_asking(replies, [index in asking for index in indexes]) if asking else replies
        return done


async def _mode(link: Link) -> str | None:
    """"cluster" or "standalone" as the server says (HELLO, else INFO cluster); None when it will not say."""
    [hello] = await link.exchange([("HELLO",)])
    if not isinstance(hello, Exception):
        return _text(_pairs(hello).get(b"mode", b""))
    [info] = await link.exchange([("INFO", "cluster")])
    if isinstance(info, bytes):
        return "cluster" if b"cluster_enabled:1" in info else "standalone"
    return None


def _without_asking(replies: list[Any], asked: list[bool]) -> list[Any]:
    """The commands' replies, the ASKING replies that preceded some of them taken out."""
    out, position = [], 0
    for was_asked in asked:
        position += was_asked
        out.append(replies[position])
        position += 1
    return out


def _backoff_s(attempt: int) -> float:
    """Full-jitter exponential backoff: up to BACKOFF_FIRST_S * 2**attempt, capped at BACKOFF_MAX_S, at least half
    of it, so that producers refused together do not come back together."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(attempt, 16))
    return random.uniform(ceiling / 2, ceiling)
