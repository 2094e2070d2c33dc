"""The Publisher against a real server: conventions, odd payloads, ordering, bounded memory, and its errors."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from fastworker import EmbeddedServer, RedisUnavailable
from fastworker.edge.link import Link
from fastworker.publisher import Entry, PayloadError, Publisher, StreamTypeError, SyncPublisher
from fastworker.server import free_port
from tests.conftest import JOB, wait_for


@pytest.fixture
async def publisher(server: EmbeddedServer) -> AsyncIterator[Publisher]:
    async with Publisher(server.url) as pub:
        yield pub


async def _fields(rc: aioredis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await rc.xrange(stream)]


def _jobs(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {**JOB, "job_id": f"job_{i:08d}"}


async def test_publish_puts_the_document_in_the_data_field(publisher: Publisher, rc: aioredis.Redis,
                                                           uid: str) -> None:
    entry_id = await publisher.publish(uid, JOB)
    assert await rc.xrange(uid) == [(entry_id.encode(), {b"data": orjson.dumps(JOB)})]


async def test_publish_keeps_non_utf8_and_empty_fields_exactly(publisher: Publisher, rc: aioredis.Redis,
                                                               uid: str) -> None:
    await publisher.publish(uid, fields={"blob": b"\xff\xfe\x00", "empty": "", b"\xc3": 7, "ratio": 0.5})
    assert await _fields(rc, uid) == [{b"blob": b"\xff\xfe\x00", b"empty": b"", b"\xc3": b"7", b"ratio": b"0.5"}]


async def test_publish_combines_document_and_fields(publisher: Publisher, rc: aioredis.Redis, uid: str) -> None:
    await publisher.publish(uid, {"a": 1}, fields={"type": "analysis"})
    assert await _fields(rc, uid) == [{b"type": b"analysis", b"data": b'{"a":1}'}]


async def test_publish_round_trips_unicode(publisher: Publisher, rc: aioredis.Redis, uid: str) -> None:
    document = {"name": "café ☕ 日本語 😀", "emoji_key_😀": ["\u0000", "\u2028"]}
    await publisher.publish(uid, document, fields={"note": "naïve"})
    [fields] = await _fields(rc, uid)
    assert orjson.loads(fields[b"data"]) == document
    assert fields[b"note"].decode() == "naïve"


async def test_publish_many_round_trips_8mb_payloads(publisher: Publisher, rc: aioredis.Redis, uid: str) -> None:
    big = [{"i": i, "blob": chr(ord("a") + i) * (8 * 1024 * 1024)} for i in range(3)]
    ids = await publisher.publish_many(uid, big)
    stored = await rc.xrange(uid)
    assert [i.encode() for i in ids] == [entry_id for entry_id, _ in stored]
    assert [orjson.loads(fields[b"data"]) for _, fields in stored] == big


async def test_publish_many_keeps_payload_order_across_chunks(publisher: Publisher, rc: aioredis.Redis,
                                                              uid: str) -> None:
    ids = await publisher.publish_many(uid, ({"i": i} for i in range(5_500)))
    stored = await rc.xrange(uid)
    assert [orjson.loads(fields[b"data"])["i"] for _, fields in stored] == list(range(5_500))
    assert ids == [entry_id.decode() for entry_id, _ in stored]


async def test_publish_many_accepts_an_async_iterable(publisher: Publisher, rc: aioredis.Redis, uid: str) -> None:
    async def payloads() -> AsyncIterator[dict[str, int]]:
        for i in range(2_500):
            yield {"i": i}

    assert len(await publisher.publish_many(uid, payloads())) == 2_500
    assert await rc.xlen(uid) == 2_500


async def test_publish_many_adds_common_fields_and_entry_fields(publisher: Publisher, rc: aioredis.Redis,
                                                                uid: str) -> None:
    await publisher.publish_many(uid, [{"a": 1}, Entry(fields={"jobId": "j1"}), Entry({"b": 2}, {"x": b"\xff"})],
                                 fields={"type": "analysis"})
    assert await _fields(rc, uid) == [
        {b"type": b"analysis", b"data": b'{"a":1}'},
        {b"type": b"analysis", b"jobId": b"j1"},
        {b"type": b"analysis", b"x": b"\xff", b"data": b'{"b":2}'},
    ]


async def test_publish_many_publishes_fragments_as_written(publisher: Publisher, rc: aioredis.Redis,
                                                           uid: str) -> None:
    await publisher.publish_many(uid, [orjson.Fragment(b'{"b": 2,  "a": 1}')])
    assert await _fields(rc, uid) == [{b"data": b'{"b": 2,  "a": 1}'}]


async def test_publish_stream_reports_ids_and_progress_per_chunk(publisher: Publisher, uid: str) -> None:
    chunks: list[list[str]] = []
    progress: list[int] = []
    publisher.chunk_size = 1000
    count = await publisher.publish_stream(uid, _jobs(2_500), on_ids=chunks.append, on_progress=progress.append)
    assert count == 2_500
    assert [len(chunk) for chunk in chunks] == [1000, 1000, 500]
    assert progress == [1000, 2000, 2500]


async def _peak_bytes(publisher: Publisher, stream: str, n: int) -> int:
    tracemalloc.start()
    try:
        count = await publisher.publish_stream(stream, ({"i": i, "job": "job_01J9"} for i in range(n)))
        assert count == n
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_publish_stream_memory_stays_flat_for_200k_payloads(publisher: Publisher, rc: aioredis.Redis,
                                                                  uid: str) -> None:
    peak = await _peak_bytes(publisher, uid, 200_000)
    await rc.delete(uid)
    # Holding the 200,000 ids alone would take ~15 MB; the chunks in flight take well under 1 MB.
    assert peak < 10 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


async def test_publish_stream_memory_stays_flat_for_a_million_payloads(publisher: Publisher, rc: aioredis.Redis,
                                                                       uid: str) -> None:
    peak = await _peak_bytes(publisher, uid, 1_000_000)
    assert await rc.xlen(uid) == 1_000_000
    await rc.delete(uid)
    assert peak < 50 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


async def test_publish_many_stops_at_an_unserialisable_payload(publisher: Publisher, rc: aioredis.Redis,
                                                               uid: str) -> None:
    payloads: list[Any] = [{"i": i} for i in range(2_500)] + [{"bad": object()}] + [{"after": 1}] * 10
    with pytest.raises(PayloadError) as caught:
        await publisher.publish_many(uid, payloads)
    assert (caught.value.index, caught.value.published) == (2_500, 2_500)
    assert "payload 2500" in str(caught.value) and "2500 entries were published before it" in str(caught.value)
    assert await rc.xlen(uid) == 2_500


async def test_publish_many_publishes_the_prefix_when_the_iterator_fails(publisher: Publisher, rc: aioredis.Redis,
                                                                         uid: str) -> None:
    def payloads() -> Iterator[dict[str, int]]:
        yield from ({"i": i} for i in range(1_500))
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        await publisher.publish_many(uid, payloads())
    assert await rc.xlen(uid) == 1_500


async def test_publisher_stays_usable_after_a_payload_error(publisher: Publisher, rc: aioredis.Redis,
                                                            uid: str) -> None:
    with pytest.raises(PayloadError):
        await publisher.publish_many(uid, [{"i": 1}, {1j}])
    assert len(await publisher.publish_many(uid, [{"i": 2}] * 1_500)) == 1_500
    assert await rc.xlen(uid) == 1_501


async def test_publish_rejects_an_unserialisable_payload(publisher: Publisher, rc: aioredis.Redis, uid: str) -> None:
    with pytest.raises(PayloadError, match="payload 0"):
        await publisher.publish(uid, {"when": object()})
    with pytest.raises(PayloadError):
        await publisher.publish(uid, fields={"flag": True})  # type: ignore[dict-item]
    assert await rc.exists(uid) == 0


async def test_publish_to_a_key_of_another_type_names_it(publisher: Publisher, rc: aioredis.Redis,
                                                         uid: str) -> None:
    await rc.set(uid, "x")
    with pytest.raises(StreamTypeError, match=f"key '{uid}' holds a string, not a stream"):
        await publisher.publish(uid, {"a": 1})


async def test_publish_many_to_a_key_of_another_type_names_it(publisher: Publisher, rc: aioredis.Redis,
                                                              uid: str) -> None:
    await rc.rpush(uid, "x")
    with pytest.raises(StreamTypeError, match=r"holds a list.*0 entries were published"):
        await publisher.publish_many(uid, ({"i": i} for i in range(3_000)))
    assert await publisher.publish_many(f"{uid}:ok", [{"i": 1}])  # the publisher is still usable


@pytest.mark.parametrize("bulk", [False, True])
async def test_publish_to_an_unreachable_server_raises_redis_unavailable(bulk: bool) -> None:
    async with Publisher(f"redis://127.0.0.1:{free_port()}/0") as pub:
        with pytest.raises(RedisUnavailable, match="cannot reach the server"):
            if bulk:
                await pub.publish_many("jobs", [{"i": 1}])
            else:
                await pub.publish("jobs", {"i": 1})


async def test_publish_trims_only_when_asked(publisher: Publisher, rc: aioredis.Redis, uid: str) -> None:
    await publisher.publish_many(uid, [{"i": i} for i in range(50)])
    assert await rc.xlen(uid) == 50
    await publisher.publish_many(uid, [{"i": i} for i in range(5)], maxlen=10, approximate=False)
    assert await rc.xlen(uid) == 10
    await publisher.publish(uid, {"i": 0}, maxlen=3, approximate=False)
    assert await rc.xlen(uid) == 3


async def test_publish_rejects_both_maxlen_and_minid(publisher: Publisher, uid: str) -> None:
    with pytest.raises(ValueError, match="not both"):
        await publisher.publish(uid, {"i": 0}, maxlen=3, minid="0-1")


async def test_publisher_reads_replies_through_hiredis(publisher: Publisher) -> None:
    async with Link(publisher.streams) as link:
        assert link.fast, "the bulk reply path fell back to one read_response per reply"


async def test_publish_many_without_the_fast_reply_path_publishes_everything(
        publisher: Publisher, rc: aioredis.Redis, uid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fastworker.edge.link._byte_stream", lambda conn: None)
    ids = await publisher.publish_many(uid, ({"i": i} for i in range(2_100)))
    assert len(ids) == 2_100 and await rc.xlen(uid) == 2_100


def test_sync_publisher_publishes_without_an_event_loop(server: EmbeddedServer, uid: str) -> None:
    with SyncPublisher(server.url) as pub:
        first = pub.publish(uid, {"i": 0})
        ids = pub.publish_many(uid, ({"i": i} for i in range(1, 1_501)))
        count = pub.publish_stream(uid, [{"i": -1}] * 10)
    assert len(ids) == 1_500 and first < ids[0] and count == 10


async def test_publish_stream_sends_what_a_slow_source_gave_without_waiting_for_a_full_chunk(
        server: EmbeddedServer, rc: aioredis.Redis, uid: str) -> None:
    # A source that gives 10 jobs and then goes quiet (a queue, a change feed): they must reach the server, not
    # wait in the producer for 990 more.
    stream = f"{uid}:jobs"
    quiet = asyncio.Event()

    async def source() -> AsyncIterator[dict[str, int]]:
        for n in range(10):
            yield {"n": n}
        await quiet.wait()

    async with Publisher(server.url) as publisher:
        publishing = asyncio.ensure_future(publisher.publish_stream(stream, source()))
        await wait_for(lambda: _length(rc, stream, 10), timeout_s=5, what="the 10 jobs on the server")
        quiet.set()
        assert await publishing == 10
    assert [orjson.loads(f[b"data"])["n"] for _, f in await rc.xrange(stream)] == list(range(10))


async def _length(rc: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await rc.xlen(stream)) == n
