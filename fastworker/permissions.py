"""The start-up permission check: every command the fleet will send is tried against the server's ACL before the
first read, so that a user missing one fails at start, with one line naming it, instead of running with no results.

ACL DRYRUN would answer directly, but it needs admin rights. Instead, in one round trip:
- Commands the fleet sends itself are sent as probes with arguments that fail only after the server's ACL check
  (XAUTOCLAIM with COUNT 0, XREADGROUP at id `$`, XADD at id 0-0, XCLAIM of an invalid id, ...): a NOPERM reply
  means the permission is missing, any other reply that it is granted. Read-only commands are sent as they are.
- Commands that only run inside server scripts (TYPE, XACK, XADD, ZADD... of the settle and retry scripts), and
  MULTI and EXEC, are checked by one script call with `redis.acl_check_cmd`, which runs none of them.
Invariant: the check has no side effect. No group, consumer, entry or key is created, changed or deleted (each
probe was verified on Valkey 9.1, Redis 7.0 and Redis 8.2: tests/test_permissions.py keeps it so).

What is checked follows the app and the settings: the app's streams and their dead-letter streams, idempotency
records for handlers with `dedup`, and for the supervisor its housekeeping (dead consumer cleanup, metrics
sampling, trimming) when it is switched on. Output streams are only known when a handler emits to them: they are
not checked here (the settle script refuses to write to one it may not, and the settlement is retried).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fastworker.app import App
from fastworker.config import Settings
from fastworker.edge.admin import Admin
from fastworker.edge.errors import is_no_permission
from fastworker.edge.link import Link
from fastworker.edge.streams import Streams
from fastworker.errors import RedisPermissionError
from fastworker.settlement import retry_key

logger = logging.getLogger(__name__)

PROBE_NAME = "fastworker-permission-probe"  # consumer and key name of the probes: never created
BAD_ID = "fastworker-permission-probe"  # not a stream id: the command fails once the ACL has let it through
NO_SCRIPT = "0" * 40  # EVALSHA of a script nobody loaded: NOSCRIPT
BAD_SCRIPT = "fastworker permission probe ("  # SCRIPT LOAD of this fails to compile: nothing is cached

# ARGV: per command to check, its length and then its arguments. Returns the (1-based) positions of the commands
# the user may not run. A command the server does not know (or a server without acl_check_cmd) counts as allowed.
CHECK_SCRIPT = """
local denied, i, k = {}, 1, 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(ARGV, i + 1, i + n))
  if ok and not allowed then denied[#denied + 1] = k end
  i, k = i + n + 1, k + 1
end
return denied
"""

SETTLE = "the settle script needs it"
IN_SETTLE = "the settle script calls it"
LARGE = "settling outputs too large for the script needs it"
RETRIES = "the retry schedule needs it"
CLEANUP = "dead consumer cleanup needs it: --dead-consumer-idle-s"
METRICS = "metrics sampling needs it: --http-port"
TRIM = "trimming needs it: --trim-interval-s"


@dataclasses.dataclass(frozen=True)
class Need:
    """One command the fleet runs, on one key (None: no key), and how to find out whether it may."""

    command: str  # as the error line names it, e.g. "XGROUP CREATE"
    key: str | None
    why: str
    argv: tuple[str | int, ...]  # the probe that is sent, or (in_script) the command acl_check_cmd is asked about
    in_script: bool = False

    @property
    def rule(self) -> str:
        """The ACL rule that grants the command, e.g. `+xgroup|create`."""
        return "+" + self.command.lower().replace(" ", "|")


async def check_permissions(streams: Streams, app: App, settings: Settings, *, monitor: bool = True) -> None:
    """Raise RedisPermissionError (a RedisAuthError: exit 6) naming every command (and key) the server's ACL denies
    the user of `streams`' connections, of those the app's workers need, and with `monitor` those the supervisor's
    housekeeping needs with these settings.

    One round trip; no side effect. RedisUnavailable (and the like) when the server cannot be asked.
    """
    needs = _needs(app, settings, monitor)
    direct = [need for need in needs if not need.in_script]
    scripted = [need for need in needs if need.in_script]
    check: list[str | int] = ["EVAL", CHECK_SCRIPT, 0]
    for need in scripted:
        check += [len(need.argv), *need.argv]
    # Raw replies, errors as values: a probe's reply is never the shape its command usually has.
    async with Link(streams) as link:
        replies = await link.exchange([need.argv for need in direct] + [tuple(check)])
    denied = [need for need, reply in zip(direct, replies, strict=False) if _refused(reply)]
    unchecked = _refused(replies[-1])
    if unchecked:
        denied.append(Need("EVAL", None, SETTLE, ()))
    elif isinstance(replies[-1], list):
        denied += [scripted[int(position) - 1] for position in replies[-1]]
    else:
        logger.debug("permission check script failed, its commands are not checked: %s", replies[-1])
    if denied:
        raise RedisPermissionError(_line(Admin(streams).user, needs, denied, unchecked))
    logger.debug("permissions checked: %d commands allowed", len(needs))


def _needs(app: App, settings: Settings, monitor: bool) -> list[Need]:
    needs = [
        Need("PING", None, "start-up and health checks need it", ("PING",)),
        Need("CLIENT ID", None, "stopping a consumer's blocked read needs it", ("CLIENT", "ID")),
        Need("CLIENT UNBLOCK", None, "stopping a consumer's blocked read needs it", ("CLIENT", "UNBLOCK", 0)),
        Need("MULTI", None, LARGE, ("MULTI",), in_script=True),
        Need("EXEC", None, LARGE, ("EXEC",), in_script=True),
        Need("TIME", None, RETRIES, ("TIME",), in_script=True),
    ]
    for handler in app.handlers:
        needs += _stream_needs(handler.stream, handler.group, handler.stream + settings.dead_letter_suffix)
        if handler.dedup is not None:
            key = f"fw:done:{handler.group}:{PROBE_NAME}"
            shown = f"fw:done:{handler.group}:*"
            why = "idempotency records need it: dedup"
            needs += [Need("MGET", shown, why, ("MGET", key)), Need("SET", shown, why, ("SET", key, "1", "PX", 0))]
    if monitor:
        needs += _housekeeping_needs(app, settings)
    return needs


def _stream_needs(stream: str, group: str, dead: str) -> list[Need]:
    s, g, d, c, z = stream, group, dead, PROBE_NAME, retry_key(stream, group)
    return [
        Need("XGROUP CREATE", s, "creating missing groups at start needs it", ("XGROUP", "CREATE", s, g, BAD_ID)),
        Need("XREADGROUP", s, "consumers read with it", ("XREADGROUP", "GROUP", g, c, "COUNT", 1, "STREAMS", s, "$")),
        Need("XACK", s, "acknowledging handled entries needs it", ("XACK", s, g, "0-0")),
        Need("XAUTOCLAIM", s, "the reclaimer needs it", ("XAUTOCLAIM", s, g, c, 0, "0-0", "COUNT", 0)),
        Need("XCLAIM", s, "claiming idle and long-running entries needs it", ("XCLAIM", s, g, c, 0, BAD_ID)),
        Need("XPENDING", s, "delivery counts need it", ("XPENDING", s, g, "-", "+", 1, c)),
        Need("XRANGE", s, "finding entries deleted while pending needs it", ("XRANGE", s, "0-0", "0-0")),
        Need("XINFO CONSUMERS", s, "recovering a dead worker's entries needs it", ("XINFO", "CONSUMERS", s, g)),
        Need("XADD", d, "dead letters need it", ("XADD", d, "NOMKSTREAM", "0-0", "f", "v")),
        Need("ZMSCORE", z, RETRIES, ("ZMSCORE", z, "0-0")),
        Need("EVAL", s, SETTLE, ("EVAL", "return 0", 1, s), in_script=True),
        Need("EVAL", d, SETTLE, ("EVAL", "return 0", 1, d), in_script=True),
        Need("EVAL", z, RETRIES, ("EVAL", "return 0", 1, z), in_script=True),
        # scripts go by digest, and by text after the server's script cache was emptied: both are needed
        Need("EVALSHA", s, SETTLE, ("EVALSHA", NO_SCRIPT, 1, s)),
        Need("EVALSHA", d, SETTLE, ("EVALSHA", NO_SCRIPT, 1, d)),
        Need("EVALSHA", z, RETRIES, ("EVALSHA", NO_SCRIPT, 1, z)),
        Need("TYPE", s, IN_SETTLE, ("TYPE", s), in_script=True),
        Need("TYPE", d, IN_SETTLE, ("TYPE", d), in_script=True),
        Need("XACK", s, IN_SETTLE, ("XACK", s, g, "0-1"), in_script=True),
        Need("XADD", d, IN_SETTLE, ("XADD", d, "*", "f", "v"), in_script=True),
        Need("XREVRANGE", d, LARGE, ("XREVRANGE", d, "+", "-", "COUNT", 1), in_script=True),
        Need("XDEL", d, LARGE, ("XDEL", d, "0-1"), in_script=True),
        Need("TYPE", z, RETRIES, ("TYPE", z), in_script=True),
        Need("ZADD", z, RETRIES, ("ZADD", z, 0, "0-1"), in_script=True),
        Need("ZRANGEBYSCORE", z, RETRIES, ("ZRANGEBYSCORE", z, "-inf", 0), in_script=True),
        Need("ZRANGE", z, RETRIES, ("ZRANGE", z, 0, 0), in_script=True),
        Need("ZREM", z, RETRIES, ("ZREM", z, "0-1"), in_script=True),
    ]


def _housekeeping_needs(app: App, settings: Settings) -> list[Need]:
    """What the supervisor's timers need, as far as the settings switch them on."""
    needs = []
    if settings.dead_consumer_idle_s:
        needs += [Need("EVALSHA", None, CLEANUP, ("EVALSHA", NO_SCRIPT, 0)),
                  Need("SCRIPT LOAD", None, CLEANUP, ("SCRIPT", "LOAD", BAD_SCRIPT))]
    if settings.http_port:
        needs += [Need("INFO", None, METRICS, ("INFO", "server")), Need("TIME", None, METRICS, ("TIME",))]
    if settings.trim_interval_s:
        needs += [Need("COMMAND DOCS", None, TRIM, ("COMMAND", "DOCS", "XTRIM"))]
    for handler in app.handlers:
        s, g, c = handler.stream, handler.group, PROBE_NAME
        if settings.dead_consumer_idle_s:
            needs += [
                Need("XINFO CONSUMERS", s, CLEANUP, ("XINFO", "CONSUMERS", s, g)),
                Need("EVALSHA", s, CLEANUP, ("EVALSHA", NO_SCRIPT, 1, s)),
                Need("XPENDING", s, CLEANUP, ("XPENDING", s, g, "-", "+", 1, c), in_script=True),
                Need("XGROUP DELCONSUMER", s, CLEANUP, ("XGROUP", "DELCONSUMER", s, g, c), in_script=True),
            ]
        if settings.http_port:
            needs += [
                Need("TYPE", s, METRICS, ("TYPE", s)),
                Need("XINFO STREAM", s, METRICS, ("XINFO", "STREAM", s)),
                Need("XINFO GROUPS", s, METRICS, ("XINFO", "GROUPS", s)),
                Need("XINFO CONSUMERS", s, METRICS, ("XINFO", "CONSUMERS", s, g)),
                Need("XPENDING", s, METRICS, ("XPENDING", s, g, "-", "+", 1)),
                Need("MEMORY USAGE", s, METRICS, ("MEMORY", "USAGE", s, "SAMPLES", 1)),
                Need("XLEN", s + settings.dead_letter_suffix, METRICS, ("XLEN", s + settings.dead_letter_suffix)),
            ]
    if settings.trim_interval_s:
        for s in dict.fromkeys([*app.streams(), *settings.output_streams]):
            needs += [
                Need("XINFO GROUPS", s, TRIM, ("XINFO", "GROUPS", s)),
                Need("XPENDING", s, TRIM, ("XPENDING", s, PROBE_NAME)),
                Need("XRANGE", s, TRIM, ("XRANGE", s, "0-0", "0-0")),
                Need("XREVRANGE", s, TRIM, ("XREVRANGE", s, "0-0", "0-0")),
                Need("XTRIM", s, TRIM, ("XTRIM", s, "MINID", "=", BAD_ID)),
                Need("XLEN", s, TRIM, ("XLEN", s)),
                Need("MEMORY USAGE", s, TRIM, ("MEMORY", "USAGE", s, "SAMPLES", 1)),
            ]
    return needs


def _refused(reply: Any) -> bool:
    return isinstance(reply, Exception) and is_no_permission(reply)


def _line(user: str, needs: list[Need], denied: list[Need], unchecked: bool) -> str:
    """One line: a key on which every command was denied once (its key pattern is missing, most likely), then each
    other denied command once per key, commands denied for the same reason together."""
    checked = needs if not unchecked else [need for need in needs if not need.in_script]
    by_key: dict[str, list[Need]] = {}
    for need in checked:
        if need.key is not None:
            by_key.setdefault(need.key, []).append(need)
    closed = [key for key, on_key in by_key.items() if len(on_key) > 1 and all(need in denied for need in on_key)]
    parts = [f"every command on {_keys(closed)} (does one of its key patterns cover it?)"] if closed else []
    keys_by: dict[tuple[str, str], list[str]] = {}
    seen: set[tuple[str, str | None]] = set()
    for need in denied:
        if need.key in closed or (need.command, need.key) in seen:
            continue
        seen.add((need.command, need.key))
        keys_by.setdefault((need.command, need.why), []).extend([need.key] if need.key is not None else [])
    parts += [f"the command {command}{' on ' + _keys(keys) if keys else ''} ({why})"
              for (command, why), keys in keys_by.items()]
    tail = "; what the fleet runs inside scripts could not be checked without it" if unchecked else ""
    return f"the server's ACL denies user {user!r} " + ", ".join(parts) + tail + "; see README 'Permissions'"


def _keys(keys: list[str]) -> str:
    return f"key {keys[0]!r}" if len(keys) == 1 else "keys " + ", ".join(repr(key) for key in keys)
