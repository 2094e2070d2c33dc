"""The benchmark peers (bench/peers): each drains a small stream through its own consumers, times it and leaves
nothing pending; failures end the run with the reason instead of hanging."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import redis

from bench.common import group_state, reset
from bench.peers import PEERS, PeerFailed, PeerUnavailable, harness, run_handwritten, run_server_limit
from fastworker import EmbeddedServer

N = 2000


@pytest.fixture
def client(server: EmbeddedServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(server.url) as sync_client:
        yield sync_client


def names(uid: str) -> tuple[str, str]:
    return f"{uid}:jobs", f"{uid}-g"


@pytest.mark.parametrize("peer", list(PEERS))
def test_peer_drains_every_entry_and_leaves_none_pending(server: EmbeddedServer, client: redis.Redis, uid: str,
                                                         peer: str) -> None:
    stream, group = names(uid)
    reset(client, stream, group, N, create_group=not peer.startswith("taskiq"))
    try:
        seconds = PEERS[peer](server.url, stream, group, N)
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    assert seconds > 0
    assert group_state(client, stream, group) == (N, 0)


def test_peer_with_two_processes_drains_every_entry(server: EmbeddedServer, client: redis.Redis, uid: str) -> None:
    stream, group = names(uid)
    reset(client, stream, group, N)
    assert run_handwritten(server.url, stream, group, N, processes=2) > 0
    assert group_state(client, stream, group) == (N, 0)
    assert {info["name"] for info in client.xinfo_consumers(stream, group)} == {b"handwritten-0", b"handwritten-1"}


def test_peer_refuses_a_stream_with_fewer_entries_than_n(server: EmbeddedServer, client: redis.Redis,
                                                         uid: str) -> None:
    stream, group = names(uid)
    reset(client, stream, group, 10)
    with pytest.raises(ValueError, match="fewer than n=11"):
        run_handwritten(server.url, stream, group, 11)


def test_peer_whose_package_is_missing_is_unavailable(monkeypatch: pytest.MonkeyPatch, server: EmbeddedServer,
                                                      client: redis.Redis, uid: str) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    stream, group = names(uid)
    reset(client, stream, group, 10)
    with pytest.raises(PeerUnavailable, match=r"pip install 'faststream\[redis\]'"):
        PEERS["faststream_batch"](server.url, stream, group, 10)


def test_drain_with_a_consumer_that_dies_fails_with_its_stderr(server: EmbeddedServer, client: redis.Redis,
                                                               uid: str) -> None:
    stream, group = names(uid)
    reset(client, stream, group, 10)
    dies = [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.readline(); sys.exit('boom')"]
    with pytest.raises(PeerFailed, match="boom"):
        harness.drain(server.url, stream, group, 10, [dies])


def test_server_limit_without_redis_cli_replays_over_a_raw_socket(monkeypatch: pytest.MonkeyPatch,
                                                                  server: EmbeddedServer, client: redis.Redis,
                                                                  uid: str) -> None:
    monkeypatch.setattr("bench.peers.server_limit.shutil.which", lambda name: None)
    stream, group = names(uid)
    reset(client, stream, group, 2500)
    assert run_server_limit(server.url, stream, group, 2500) > 0
    assert group_state(client, stream, group) == (2500, 0)
