"""The I/O edge: only fastworker/edge imports redis-py; its reply reader, error mapping and admin client."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.exceptions as rex
from redis._parsers.base import BaseParser  # the tests may compare with redis-py's own parser; the package may not

from fastworker import EmbeddedServer
from fastworker.config import Settings
from fastworker.edge.admin import Admin
from fastworker.edge.errors import is_missing_key, is_no_group, is_no_permission, is_wrong_type, reply_error
from fastworker.edge.streams import Streams
from fastworker.edge.wire import ReplyReader, argument, head, pack

PACKAGE = Path(__file__).resolve().parent.parent / "fastworker"
# Outside the edge: the loopback cluster launcher (tests and benchmarks), which starts servers and keeps a client of
# its own for that.
NOT_YET_IN_THE_EDGE = {"localcluster.py"}


def _redis_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of redis-py in `source`, at any depth (in functions, under TYPE_CHECKING)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "redis" or name.startswith("redis.")]
    return found


def test_edge_is_the_only_package_that_imports_redis() -> None:
    outside = [path for path in PACKAGE.rglob("*.py")
               if path.relative_to(PACKAGE).parts[0] != "edge"
               and str(path.relative_to(PACKAGE)) not in NOT_YET_IN_THE_EDGE]
    assert len(outside) > 10, "too few modules found: the walk looks in the wrong place"
    imports = [f"fastworker/{path.relative_to(PACKAGE)}:{line} imports {name}"
               for path in outside for line, name in _redis_imports(path.read_text())]
    assert imports == [], "only fastworker/edge may import redis-py: use fastworker.edge (Admin, Link, errors)"


def test_edge_import_check_sees_every_form_of_import() -> None:
    source = ("import redis\nimport redis.asyncio as aioredis\nfrom redis.exceptions import ResponseError\n"
              "def f():\n    from redis import Redis\n    return Redis\nimport redistools\nfrom . import redis\n")
    assert _redis_imports(source) == [(1, "redis"), (2, "redis.asyncio"), (3, "redis.exceptions"), (5, "redis")]


@pytest.mark.parametrize("message", [
    "NOPERM this user has no permissions to run the 'xadd' command",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "NOGROUP No such key 'jobs' or consumer group 'g' in XREADGROUP with GROUP option",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
    "NOSCRIPT No matching script. Please use EVAL.",
    "LOADING Redis is loading the dataset in memory",
    "MOVED 3999 127.0.0.1:6381",
    "ERR max number of clients reached",
    "ERR unknown command 'FOO'",
    "BUSYGROUP Consumer Group name already exists",
])
def test_reply_error_builds_what_redis_pys_parser_builds(message: str) -> None:
    ours, theirs = reply_error(message), BaseParser.parse_error(message)
    assert (type(ours), str(ours)) == (type(theirs), str(theirs))


def test_error_predicates_read_the_server_codes() -> None:
    assert is_no_permission(reply_error("NOPERM no"))
    assert is_no_permission(rex.ResponseError("NOPERM this user may not XACK jobs"))  # a script's error_reply
    assert is_no_group(reply_error("NOGROUP No such key"))
    assert is_missing_key(reply_error("ERR no such key"))
    assert is_wrong_type(reply_error("WRONGTYPE Operation against a key"))
    assert not any(check(reply_error("ERR syntax error"))
                   for check in (is_no_permission, is_no_group, is_missing_key, is_wrong_type))


def test_reply_reader_takes_replies_across_reads_with_errors_as_values() -> None:
    reader = ReplyReader()
    data = b"$5\r\n1-0-0\r\n-WRONGTYPE Operation\r\n:7\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n"
    replies: list[object] = []
    reader.feed(data[:9])
    assert not reader.take(replies, 4)
    reader.feed(data[9:])
    assert reader.take(replies, 4)
    assert replies[0] == b"1-0-0" and replies[2:] == [7, [b"a", b"b"]]
    assert isinstance(replies[1], rex.ResponseError) and str(replies[1]) == "WRONGTYPE Operation"
    assert not reader.buffered()


def test_reply_reader_says_when_bytes_of_a_later_reply_are_buffered() -> None:
    reader = ReplyReader()
    reader.feed(b":1\r\n:2\r\n")
    replies: list[object] = []
    assert reader.take(replies, 1) and replies == [1]
    assert reader.buffered()


def test_reply_reader_raises_on_a_malformed_stream() -> None:
    reader = ReplyReader()
    reader.feed(b"?what\r\n")
    with pytest.raises(rex.InvalidResponse):
        reader.take([], 1)


def test_wire_head_and_arguments_pack_the_same_command() -> None:
    args = ("XADD", "jobs", "MAXLEN", "~", 1000, "*", "data")
    assert head(args, 1) + argument(b'{"n":1}') == pack([(*args, b'{"n":1}')])


@pytest.fixture
async def admin(server: EmbeddedServer) -> AsyncIterator[Admin]:
    streams = Streams(Settings(redis_url=server.url))
    try:
        yield Admin(streams)
    finally:
        await streams.aclose()


async def test_admin_missing_stream_and_group_are_answers_not_errors(admin: Admin, r: redis.Redis, uid: str) -> None:
    stream = f"{uid}:jobs"
    assert await admin.groups(stream) is None
    assert await admin.consumers(stream, "g") is None
    assert await admin.pending_summary(stream, "g") is None
    r.xgroup_create(stream, "g", id="0", mkstream=True)
    assert [group.name for group in await admin.groups(stream) or []] == ["g"]
    assert await admin.consumers(stream, "other") is None
    assert await admin.pending_summary(stream, "other") is None


async def test_admin_overview_of_a_key_of_another_type_is_not_a_stream(admin: Admin, r: redis.Redis,
                                                                       uid: str) -> None:
    r.set(f"{uid}:plain", "1")
    overview = await admin.overview(f"{uid}:plain", f"{uid}:plain:dead")
    assert not overview.exists and overview.dead_letters == 0 and overview.now_ms > 0


async def test_admin_move_entry_moves_once_and_reports_the_callers_reason(admin: Admin, r: redis.Redis,
                                                                          uid: str) -> None:
    source, target = f"{uid}:dead", f"{uid}:jobs"
    entry_id = r.xadd(source, {"data": "{}"}).decode()
    moved = await admin.move_entry(source, entry_id, lambda fields: (target, fields or {}), attempts=3)
    assert isinstance(moved, tuple) and moved[0] == target
    assert r.xlen(source) == 0 and r.xlen(target) == 1
    again = await admin.move_entry(source, entry_id, lambda fields: "gone" if fields is None else (target, fields),
                                   attempts=3)
    assert again == "gone" and r.xlen(target) == 1
