"""The dashboard without a browser: its API and pages on a real server (httpx against the ASGI app), the guard,
the fleet's mount, the command, and the pure parts (rates, charts, roles)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

pytest.importorskip("starlette", reason="the dashboard extra is not installed: pip install -e '.[dashboard]'")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e '.[dev]'")

from fastworker import App, EmbeddedServer, Settings  # noqa: E402
from fastworker.dashboard import Dashboard, create_app  # noqa: E402
from fastworker.dashboard.bridge import serve_asgi  # noqa: E402
from fastworker.dashboard.sampler import Counters, History  # noqa: E402
from fastworker.dashboard.security import Guard, host_name, is_loopback  # noqa: E402
from fastworker.dashboard.views import clip, consumer_role, nice_ceiling  # noqa: E402
from fastworker.monitor import Monitor  # noqa: E402
from fastworker.ops.inspect import ConsumerInfo, GroupInfo, Snapshot, StreamInfo  # noqa: E402
from tests.conftest import IdleFleet, cli  # noqa: E402

TOKEN = "t0ken-for-the-dashboard-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
XSS_SCRIPT = "<script>alert('xss')</script>"
XSS_IMG = '"><img src=x onerror=alert(2)>'
REPO = Path(__file__).resolve().parent.parent


class Board:
    """A dashboard over the session server, a client of its app, and the test's stream."""

    def __init__(self, dashboard: Dashboard, client: httpx.AsyncClient, stream: str) -> None:
        self.dashboard = dashboard
        self.client = client
        self.stream = stream
        self.dead = stream + ":dead"

    async def refresh(self) -> None:
        await self.dashboard.sampler.sample()


def client_of(dashboard: Dashboard, client_host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(dashboard), client=(client_host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8484")


async def _board(server: EmbeddedServer, uid: str, token: str | None, **options: Any) -> AsyncIterator[Board]:
    stream = f"{uid}:jobs"
    dashboard = Dashboard(Settings(redis_url=server.url), stream_names=[stream], token=token, **options)
    async with client_of(dashboard) as client:
        yield Board(dashboard, client, stream)
    await dashboard.aclose()


@pytest.fixture
async def board(server: EmbeddedServer, uid: str) -> AsyncIterator[Board]:
    """A dashboard started with a token."""
    async for item in _board(server, uid, TOKEN):
        yield item


@pytest.fixture
async def read_only(server: EmbeddedServer, uid: str) -> AsyncIterator[Board]:
    """A dashboard started without a token."""
    async for item in _board(server, uid, None):
        yield item


async def dead_letter(rc: aioredis.Redis, board: Board, **fields: str) -> str:
    """XADD a dead letter of the board's stream as the fleet writes them; its id."""
    meta = {"fw:stream": board.stream, "fw:id": "1-0", "fw:group": "g", "fw:error_class": "ValueError",
            "fw:error": "boom", "fw:deliveries": "5", "fw:dead_at_ms": "1700000000000"}
    entry_id = await rc.xadd(board.dead, {**(fields or {"data": '{"job_id": "job-1"}'}), **meta})
    return str(entry_id.decode())


def letters(board: Board, *ids: str) -> dict[str, Any]:
    return {"letters": [{"stream": board.dead, "id": entry_id} for entry_id in ids]}


# --- read-only and the token --------------------------------------------------------------------------------------

async def test_dashboard_without_token_refuses_every_write(read_only: Board, rc: aioredis.Redis) -> None:
    entry_id = await dead_letter(rc, read_only)
    for path, body in (("/api/dead-letters/requeue", letters(read_only, entry_id)),
                       ("/api/dead-letters/purge", letters(read_only, entry_id)),
                       ("/api/replay", {"stream": read_only.dead, "from": "-", "to": "+"}),
                       ("/api/check-token", {})):
        response = await read_only.client.post(path, json=body, headers=AUTH)
        assert response.status_code == 403, path
        assert "read-only" in response.json()["error"]
    assert await rc.xlen(read_only.dead) == 1
    page = await read_only.client.get("/")
    assert page.status_code == 200 and 'id="read-only"' in page.text and 'id="unlock"' not in page.text


async def test_dashboard_write_without_the_right_token_is_refused(board: Board, rc: aioredis.Redis) -> None:
    entry_id = await dead_letter(rc, board)
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": TOKEN}):
        response = await board.client.post("/api/dead-letters/purge", json=letters(board, entry_id), headers=headers)
        assert response.status_code == 403
        assert response.json()["error"] == "the token is missing or wrong"
    assert await rc.xlen(board.dead) == 1


async def test_dashboard_cross_site_write_is_refused(board: Board, rc: aioredis.Redis) -> None:
    entry_id = await dead_letter(rc, board)
    body = letters(board, entry_id)
    attempts = [({"Origin": "http://evil.example"}, "Origin"),
                ({"Origin": "null"}, "Origin"),
                ({"Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site"),
                ({"Content-Type": "text/plain"}, "JSON")]
    for headers, reason in attempts:
        response = await board.client.post("/api/dead-letters/purge", json=body, headers={**AUTH, **headers})
        assert response.status_code == 403, headers
        assert reason in response.json()["error"]
    assert await rc.xlen(board.dead) == 1
    same_site = {**AUTH, "Origin": "http://127.0.0.1:8484", "Sec-Fetch-Site": "same-origin"}
    response = await board.client.post("/api/dead-letters/purge", json=body, headers=same_site)
    assert response.json() == {"purged": 1}


async def test_dashboard_refuses_a_large_write_body(board: Board, rc: aioredis.Redis) -> None:
    entry_id = await dead_letter(rc, board)
    body = {**letters(board, entry_id), "padding": "x" * 300_000}
    response = await board.client.post("/api/dead-letters/purge", json=body, headers=AUTH)
    assert response.status_code == 413
    assert await rc.xlen(board.dead) == 1


async def test_dashboard_foreign_host_header_is_refused(board: Board) -> None:
    """A page on another site that rebinds its name to 127.0.0.1 sends its own Host header: refused."""
    response = await board.client.get("/", headers={"Host": "evil.example:8484"})
    assert response.status_code == 403
    assert (await board.client.get("/", headers={"Host": "localhost:8484"})).status_code == 200


async def test_dashboard_of_a_fleet_refuses_remote_clients(server: EmbeddedServer, uid: str) -> None:
    dashboard = Dashboard(Settings(redis_url=server.url), stream_names=[uid], loopback_clients_only=True)
    async with client_of(dashboard, "10.1.2.3") as remote, client_of(dashboard, "127.0.0.1") as local:
        refused = await remote.get("/")
        assert refused.status_code == 403 and "port-forward" in refused.text
        assert (await local.get("/")).status_code == 200
    await dashboard.aclose()


async def test_dashboard_responses_carry_the_security_headers(board: Board) -> None:
    response = await board.client.get("/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"


# --- what it shows ------------------------------------------------------------------------------------------------

async def test_dashboard_shows_the_servers_numbers(board: Board, rc: aioredis.Redis) -> None:
    for index in range(7):
        await rc.xadd(board.stream, {"data": f'{{"job_id": "job-{index}"}}'})
    await rc.xgroup_create(board.stream, "g", id="0")
    await rc.xreadgroup("g", "c1", {board.stream: ">"}, count=3)
    await dead_letter(rc, board)
    await board.refresh()
    snap = (await board.client.get("/api/snapshot")).json()
    stream = snap["streams"][0]
    assert (stream["length"], stream["dead_letters"]) == (7, 1)
    assert (stream["groups"][0]["pending"], stream["groups"][0]["lag"]) == (3, 4)
    page = (await board.client.get("/fragments/live")).text
    assert f'data-stream="{board.stream}" data-metric="length">7<' in page
    assert f'data-stream="{board.stream}" data-group="g" data-metric="pending">3<' in page
    assert f'data-stream="{board.stream}" data-metric="dead-letters" class="warn">1<' in page


async def test_dashboard_labels_reclaimer_and_retry_consumers(board: Board, rc: aioredis.Redis) -> None:
    await rc.xadd(board.stream, {"data": "{}"})
    await rc.xgroup_create(board.stream, "g", id="0")
    await rc.xreadgroup("g", "fastworker.retry", {board.stream: ">"})
    await rc.xgroup_createconsumer(board.stream, "g", "host-0.claim")
    await board.refresh()
    page = (await board.client.get("/fragments/live")).text
    assert "retries: entries waiting for their next attempt" in page
    assert "reclaimer: entries taken from crashed consumers" in page


async def test_dashboard_escapes_entry_fields(board: Board, rc: aioredis.Redis) -> None:
    entry_id = await dead_letter(rc, board, data=f'{{"note": "{XSS_SCRIPT}"}}', html=XSS_IMG)
    pages = [(await board.client.get("/fragments/dead-letters")).text,
             (await board.client.get("/fragments/dead-letter", params={"stream": board.dead, "id": entry_id})).text,
             (await board.client.get("/")).text]
    for page in pages:
        assert "<script>alert" not in page and "<img" not in page
        assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;" in pages[1]


async def test_dashboard_shows_the_server_url_redacted(server: EmbeddedServer, uid: str) -> None:
    url = server.url.replace("redis://", "redis://admin:s3cret-password@")
    dashboard = Dashboard(Settings(redis_url=url), stream_names=[uid])
    async with client_of(dashboard) as client:
        page = (await client.get("/")).text
        snap = (await client.get("/api/snapshot")).text
    await dashboard.aclose()
    assert "s3cret-password" not in page and "s3cret-password" not in snap
    assert "admin:***@" in page


async def test_dashboard_truncates_large_entries_in_lists(board: Board, rc: aioredis.Redis) -> None:
    entry_id = await dead_letter(rc, board, data="x" * 100_000)
    listing = (await board.client.get("/fragments/dead-letters")).text
    assert len(listing) < 10_000 and "more characters" in listing
    detail = (await board.client.get("/fragments/dead-letter", params={"stream": board.dead, "id": entry_id})).text
    assert "x" * 100_000 in detail


async def test_dashboard_shows_one_letter_with_pretty_payload_and_traceback(board: Board,
                                                                            rc: aioredis.Redis) -> None:
    entry_id = await rc.xadd(board.dead, {"data": '{"job_id": "job-9", "n": [1, 2]}', "fw:error_class": "KeyError",
                                          "fw:traceback": "Traceback (most recent call last):\n  File app.py"})
    detail = (await board.client.get("/fragments/dead-letter",
                                     params={"stream": board.dead, "id": entry_id.decode()})).text
    assert '{\n  &#34;job_id&#34;: &#34;job-9&#34;,\n  &#34;n&#34;: [\n    1,' in detail
    assert "Traceback (most recent call last):\n  File app.py" in detail


async def test_dashboard_filters_dead_letters(board: Board, rc: aioredis.Redis) -> None:
    old = await dead_letter(rc, board)
    await rc.xadd(board.dead, {"data": "{}", "fw:error_class": "KeyError"})
    by_class = (await board.client.get("/fragments/dead-letters", params={"error_class": "KeyError"})).text
    assert by_class.count('class="pick"') == 1
    since = int(old.split("-")[0]) + 1
    by_time = (await board.client.get("/fragments/dead-letters",
                                      params={"stream": board.dead, "since_ms": str(since)})).text
    assert old not in by_time


# --- writes -------------------------------------------------------------------------------------------------------

async def test_dashboard_requeue_moves_a_selection_back(board: Board, rc: aioredis.Redis) -> None:
    ids = [await dead_letter(rc, board, data=f'{{"job_id": "job-{index}"}}') for index in range(3)]
    response = await board.client.post("/api/dead-letters/requeue", json=letters(board, *ids[:2]), headers=AUTH)
    assert [item["id"] for item in response.json()["requeued"]] == ids[:2]
    assert [entry_id.decode() for entry_id, _ in await rc.xrange(board.dead)] == ids[2:]
    moved = await rc.xrange(board.stream)
    assert [fields[b"data"] for _, fields in moved] == [b'{"job_id": "job-0"}', b'{"job_id": "job-1"}']


async def test_dashboard_purge_acts_on_dead_letter_streams_only(board: Board, rc: aioredis.Redis) -> None:
    job = (await rc.xadd(board.stream, {"data": "{}"})).decode()
    response = await board.client.post("/api/dead-letters/purge", json={"letters": [{"stream": board.stream,
                                                                                     "id": job}]}, headers=AUTH)
    assert response.status_code == 400 and "not a dead-letter stream" in response.json()["error"]
    assert await rc.xlen(board.stream) == 1


async def test_dashboard_replay_copies_a_range(board: Board, rc: aioredis.Redis) -> None:
    ids = [(await rc.xadd(board.stream, {"data": str(index)})).decode() for index in range(5)]
    plan = (await board.client.get("/api/replay-plan", params={"stream": board.stream, "from": ids[1],
                                                               "to": ids[3]})).json()
    assert (plan["count"], plan["first_id"], plan["last_id"]) == (3, ids[1], ids[3])
    response = await board.client.post("/api/replay", json={"stream": board.stream, "from": ids[1], "to": ids[3],
                                                            "to_stream": board.stream + ":copy"}, headers=AUTH)
    assert response.json()["replayed"] == 3
    assert [f[b"data"] for _, f in await rc.xrange(board.stream + ":copy")] == [b"1", b"2", b"3"]


async def test_dashboard_malformed_id_is_a_bad_request(board: Board) -> None:
    response = await board.client.get("/api/replay-plan", params={"stream": board.stream, "from": "yesterday"})
    assert response.status_code == 400 and "not a stream entry id" in response.json()["error"]


# --- served by a fleet ------------------------------------------------------------------------------------------

async def test_monitor_serves_a_mounted_dashboard_beside_its_endpoints(server: EmbeddedServer, uid: str,
                                                                       unused_tcp_port: int) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    settings = Settings(redis_url=server.url, http_port=unused_tcp_port, http_host="127.0.0.1")
    monitor = Monitor(IdleFleet(), App(), settings)
    await monitor.start()
    dashboard = Dashboard(settings, stream_names=[uid], token=TOKEN, loopback_clients_only=True)
    app = Starlette(routes=[Mount("/dashboard", app=create_app(dashboard))])
    monitor.mounts["/dashboard"] = lambda head, reader, writer: serve_asgi(app, head, reader, writer)
    base = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            page = await client.get("/dashboard/")
            assert page.status_code == 200 and "static/dashboard.js" in page.text
            assert (await client.get("/dashboard/static/dashboard.js")).status_code == 200
            refused = await client.post("/dashboard/api/check-token", json={})
            assert refused.status_code == 403
            assert (await client.post("/dashboard/api/check-token", json={}, headers=AUTH)).status_code == 204
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/dashboardx")).status_code == 404
    finally:
        await dashboard.aclose()
        await monitor.aclose()


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- pure parts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("LOCALHOST", True), ("10.0.0.1", False), ("0.0.0.0", False), ("evil.example", False),
    ("", False), (None, False),
])
def test_is_loopback_table(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("header", "name"), [
    ("localhost:8484", "localhost"), ("[::1]:8484", "::1"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1"),
])
def test_host_name_table(header: str, name: str) -> None:
    assert host_name(header) == name


def test_guard_write_checks_in_order() -> None:
    guard = Guard(TOKEN, loopback_hosts_only=True, loopback_clients_only=False)
    good = {"host": "localhost:8484", "content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    assert guard.refuse_write(good) is None
    assert guard.refuse_write({**good, "origin": "http://localhost:8484"}) is None
    assert guard.refuse_write({**good, "origin": "https://localhost:8484"}) is None  # TLS ended by a proxy
    assert "Origin" in (guard.refuse_write({**good, "origin": "http://localhost:9999"}) or "")
    assert "read-only" in (Guard(None, True, False).refuse_write(good) or "")


def _snapshot(at_ms: int, added: int | None, read: int | None, pending: int) -> Snapshot:
    group = GroupInfo("g", [], pending, 0, "0-0", read, None, None, None, None, None)
    stream = StreamInfo("s", True, False, 0, None, None, None, None, None, [group], "s:dead", 0, added)
    return Snapshot(at_ms, "valkey", "9", 0, [stream])


@pytest.mark.parametrize(("samples", "added", "acked"), [
    ([(0, 0, 0, 0), (2000, 100, 60, 10)], 50.0, 25.0),
    ([(0, 0, 0, 0)], None, None),
    ([(0, 100, 10, 0), (1000, 50, 5, 0)], None, None),  # counters went down: deleted and written again
    ([(0, None, None, 0), (1000, None, None, 0)], None, None),  # unknown (old server, XDEL)
    ([(0, 0, 0, 0), (1000, 10, 10, 0), (30000, 40, 10, 0)], 30 / 29, 0.0),  # the last ~10 s only
])
def test_history_rates_table(samples: list[tuple[int, int | None, int | None, int]], added: float | None,
                             acked: float | None) -> None:
    history = History(interval_s=1.0)
    for sample in samples:
        history.add(Counters.of(_snapshot(*sample)))
    assert history.added_rate("s") == (pytest.approx(added) if added is not None else None)
    assert history.acked_rate("s", "g") == (pytest.approx(acked) if acked is not None else None)


def test_history_keeps_the_chart_window_only() -> None:
    history = History(window_ms=10_000, interval_s=1.0)
    for at_ms in range(0, 30_000, 1000):
        history.add(Counters.of(_snapshot(at_ms, at_ms, 0, 0)))
    assert history.samples[0].at_ms >= 19_000


@pytest.mark.parametrize(("value", "ceiling"), [(0, 1), (0.3, 1), (1, 1), (1.5, 2), (3, 5), (7, 10), (120, 200),
                                                (5000, 5000), (5001, 10000)])
def test_nice_ceiling_table(value: float, ceiling: float) -> None:
    assert nice_ceiling(value) == ceiling


@pytest.mark.parametrize(("name", "pending", "idle_ms", "dead", "role"), [
    ("fastworker.retry", 3, 10, False, "retries"), ("host-0.claim", 0, 10, False, "reclaimer"),
    ("host-0", 0, 10**8, True, "dead"), ("host-1", 2, 10, False, ""),
])
def test_consumer_role_table(name: str, pending: int, idle_ms: int, dead: bool, role: str) -> None:
    assert consumer_role(ConsumerInfo(name, pending, idle_ms, dead)).startswith(role)


def test_clip_says_how_much_it_left_out() -> None:
    assert clip("abc", 5) == "abc"
    assert clip("a" * 10, 4) == "aaaa… (6 more characters)"


async def test_sampler_keeps_the_last_good_sample_through_an_outage(board: Board, rc: aioredis.Redis) -> None:
    await rc.xadd(board.stream, {"data": "{}"})
    good = await board.dashboard.sampler.sample()

    async def down() -> Snapshot:
        from fastworker.errors import RedisUnavailable

        raise RedisUnavailable("connection refused")

    board.dashboard.sampler.take = down
    board.dashboard.sampler.latest_at = 0.0  # stale: the next page asks for a new sample
    page = await board.client.get("/fragments/live")
    assert "cannot read the server: connection refused" in page.text and "last good sample" in page.text
    assert await board.dashboard.sampler.current() is good


# --- the command ------------------------------------------------------------------------------------------------

def test_dashboard_command_refuses_a_short_token(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "dashboard", "--token", "short")
    assert code == 3 and "at least 16 characters" in err


@pytest.mark.parametrize("argv", [("run", "tests.fleet_app:app"), ("demo", "--jobs", "10")])
def test_fleet_dashboard_needs_the_http_port(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    code, _, err = cli(capsys, *argv, "--dashboard")
    assert code == 2 and "--dashboard needs --http-port" in err


@pytest.mark.slow
def test_dashboard_command_serves_until_sigterm(server: EmbeddedServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FASTWORKER_DASHBOARD_TOKEN": TOKEN}
    argv = [sys.executable, "-m", "fastworker", "dashboard", "--port", "0", "--redis-url", server.url]
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert "writes need the token" in line, line
            url = line.split(" on ", 1)[1].split(" ", 1)[0]
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200 and 'id="unlock"' in response.read().decode()
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
        finally:
            if process.poll() is None:
                process.kill()
