"""Settlement: what handling one batch decided, as the commands that write it, and what the server confirmed.

Pure bookkeeping, no I/O: `commands()` gives the commands of the steps not yet written, `confirm()` takes their
replies. A step is all-or-nothing, so a step the server refused can be sent again as it is, without handling its
entries again: plain XACKs are idempotent, and every step that writes outputs either writes all of them with the
ack or nothing.

Invariants:
- An entry that publishes anything (results or a dead letter) is settled by a step that writes its outputs only if
  its XACK removed it from the PEL: never an ack without its outputs, never outputs without the ack, never the
  outputs twice (exactly-once results, even when a slow batch was claimed and handled elsewhere meanwhile).
- Outputs of any size the server accepts: those small enough for the script's argument unpacking go through
  SETTLE_SCRIPT, larger ones through a transaction that adds them and then keeps them only if its XACK settled the
  entry (LARGE_OUTPUT_SCRIPT removes them otherwise, inside the same EXEC).
- Counts are counted from the replies: an entry counts as acked or dead only once the server confirmed it.
- Delete-on-ack changes the ack command, never the rule: a stream in `deleting` is acked with XACKDEL ... ACKED,
  whose codes 1 and 2 both mean "removed from this group's PEL by this call" (see ACKDEL_CODES), and only that
  writes outputs. Retries (parked) and entries deleted while pending are acked as before.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Container, Sequence
from typing import Any

from fastworker.edge.wire import Command
from fastworker.message import FieldValue, Message

Output = tuple[str, list[FieldValue]]

# A failed entry is parked on this consumer of its group (XCLAIM ... JUSTID: no delivery counted), and its due time
# goes into a sorted set next to its stream (`retry_key`), both by PARK_SCRIPT in the settle step. The retry schedule
# thus lives on the server: a crash or a restart neither loses a due retry nor resets its backoff (the PEL's delivery
# counter is the attempt number). Any entry pending elsewhere and idle past claim idle had no verdict at all: its
# worker died (or hung) while handling it, and it is recovered in isolation.
RETRY_CONSUMER = "fastworker.retry"
TRACEBACK_MAX_CHARS = 8192  # a dead letter keeps the end of the last failure's traceback: the innermost frames


def retry_key(stream: str, group: str) -> str:
    """The sorted set of `group`'s retries of `stream`: entry id -> due time (server clock, ms since the epoch).
    It starts with the stream's name, so it shares its hash tag and its ACL key pattern."""
    return f"{stream}:fw-retry:{group}"

# Delete-on-ack (a handler's `delete_acked=True`, on a server with XACKDEL: Redis 8.2+) acks with
# `XACKDEL stream group ACKED IDS n id...`: the entry leaves this group's PEL and is deleted from the stream once no
# group references it any more (nothing pending in any group, every group delivered past it). Its reply has one code
# per id. Measured on Redis 8.2.3, ACKED, groups g1 (acking) and g2:
#    1  pending in g1 only (g2 acked it already, or g2 was created past it): acked and deleted
#    2  pending in g1 and also in g2, or pending in g1 and not yet delivered to g2: acked, the entry is kept
#   -1  already acked in g1; not in the stream at all; no such group; no such key: nothing done (and an entry
#       already acked by a plain XACK is not deleted either)
#    1  pending in g1 but deleted from the stream meanwhile (XDEL): acked (like XACK's 1)
# (KEEPREF and DELREF give 1 for a pending id even while g2 has it pending, and delete it under g2's feet: not
# used.) So "removed from this group's PEL by this call" is exactly code 1 or 2, which is what decides whether an
# entry's outputs are written (the exactly-once rule), as XACK's 1 does. An entry g2 has not read yet stays in the
# stream until g2 acks it with XACKDEL too: a group that acks with plain XACK leaves the entries it acks last behind
# (for the trim to remove).
ACKDEL_CODES = {1: "acked and deleted", 2: "acked, kept for another group", -1: "not pending in this group"}

# Lua's unpack() stops at about 8,000 values (measured: 7,999 on Valkey 9.1 and Redis 7.0). An output with more
# field values than this goes through the transaction instead of the script.
SCRIPT_MAX_VALUES = 7_000

# Settles the entries with small outputs, atomically: an entry's outputs are written only if its XACK removed it
# from the PEL, i.e. only by the consumer that settles it first. A Lua script that fails part-way keeps what it did,
# so everything that could make a write fail is checked before the first one, and the script either runs whole or
# writes nothing: every key's type, the user's permission for each write (the ACL), and, where the user may read
# it, that no output stream has used up its ID space (its newest entry at the last possible id, where XADD *
# fails). Past the first write, the server does not refuse later writes for memory.
# One XACK and one XADD per entry, and nothing else per entry: entries are sent in runs of the same source stream
# and output shape (the streams they emit to and their value counts), so an entry costs its id and its values. Measured
# here per entry with one small result: 2.2 us of server CPU, against 2.6-2.9 us when every entry carried its own
# stream, counts and names. One multi-id XACK cannot tell which entries this call settled; checking them first with
# one XPENDING over the batch's range (2.1 us) or one XCLAIM ... JUSTID (2.6 us) saved nothing worth its complexity.
# KEYS: every stream touched, sources first. ARGV: group, source count, then runs: source stream, entries, outputs
# per entry (m), m x (output stream, value count), then per entry: its id and the values of its m outputs. Returns
# one flag per entry, in the order sent: 1 settled here, 0 settled before.
SETTLE_SCRIPT = """
local group, sources = ARGV[1], tonumber(ARGV[2])
for k, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. kind .. ', not a stream')
  end
  if k <= sources then
    if not redis.acl_check_cmd('XACK', key, group, '0-1') then
      return redis.error_reply('NOPERM this user may not XACK ' .. key)
    end
  else
    if not redis.acl_check_cmd('XADD', key, '*', 'f', 'v') then
      return redis.error_reply('NOPERM this user may not XADD to ' .. key)
    end
    if kind == 'stream' and redis.acl_check_cmd('XREVRANGE', key, '+', '-', 'COUNT', '1') then
      local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
      if newest and newest[1] == '18446744073709551615-18446744073709551615' then
        return redis.error_reply('ERR ' .. key .. ' has used up its ID space: XADD * cannot add to it')
      end
    end
  end
end
local i, flags = 3, {}
while i <= #ARGV do
  local source, entries, m = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local outs, counts = {}, {}
  i = i + 3
  for k = 1, m do
    outs[k], counts[k] = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
  end
  for _ = 1, entries do
    local acked = redis.call('XACK', source, group, ARGV[i])
    i = i + 1
    for k = 1, m do
      if acked == 1 then
        redis.call('XADD', outs[k], '*', unpack(ARGV, i, i + counts[k] - 1))
      end
      i = i + counts[k]
    end
    flags[#flags + 1] = acked
  end
end
return flags
"""

# The same for streams whose acks delete (a handler's `delete_acked`): the same checks first, with the permission for
# XACKDEL ... ACKED in place of XACK's. That check also makes sure the server has XACKDEL: acl_check_cmd raises on a
# command the server does not know (Valkey 9.1, Redis 7.0), so such a server refuses the whole call before its first
# write. Unlike XACK's count, XACKDEL's reply has a code per id (ACKDEL_CODES), so a run's entries are acked by one
# call (in slices of ACKDEL_SLICE ids, within unpack()'s limit) and each code decides its entry's outputs. Server CPU
# per entry with one small result, measured on Redis 8.2.3: 2.1 us, against 3.3 us with one XACKDEL per entry and
# 1.8 us for SETTLE_SCRIPT (which deletes nothing). Same arguments and reply as SETTLE_SCRIPT.
ACKDEL_SLICE = 1000
SETTLE_DELETE_BODY = """
local i, flags = 3, {}
while i <= #ARGV do
  local source, entries, m = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local outs, counts, width = {}, {}, 1
  i = i + 3
  for k = 1, m do
    outs[k], counts[k] = ARGV[i], tonumber(ARGV[i + 1])
    width = width + counts[k]
    i = i + 2
  end
  local ids, codes = {}, {}
  for j = 1, entries do ids[j] = ARGV[i + (j - 1) * width] end
  for first = 1, entries, SLICE do
    local last = math.min(first + SLICE - 1, entries)
    local part = redis.call('XACKDEL', source, group, 'ACKED', 'IDS', last - first + 1, unpack(ids, first, last))
    for j = 1, #part do codes[first + j - 1] = part[j] end
  end
  for j = 1, entries do
    local acked = codes[j] == -1 and 0 or 1
    i = i + 1
    for k = 1, m do
      if acked == 1 then
        redis.call('XADD', outs[k], '*', unpack(ARGV, i, i + counts[k] - 1))
      end
      i = i + counts[k]
    end
    flags[#flags + 1] = acked
  end
end
return flags
""".replace("SLICE", str(ACKDEL_SLICE))


def _settle_delete_script(script: str) -> str:
    """SETTLE_SCRIPT's checks, for XACKDEL, followed by SETTLE_DELETE_BODY."""
    checks, found, _ = script.partition("local i, flags = 3, {}")
    for xack, xackdel in (("redis.acl_check_cmd('XACK', key, group, '0-1')",
                           "redis.acl_check_cmd('XACKDEL', key, group, 'ACKED', 'IDS', '1', '0-1')"),
                          ("may not XACK ", "may not XACKDEL ")):
        if not found or checks.count(xack) != 1:
            raise RuntimeError(f"SETTLE_SCRIPT changed: update _settle_delete_script for {xack!r}")
        checks = checks.replace(xack, xackdel)
    return checks + SETTLE_DELETE_BODY.lstrip("\n")


SETTLE_DELETE_SCRIPT = _settle_delete_script(SETTLE_SCRIPT)

# The end of one large entry's transaction: MULTI, XADD of each output (sent by the client, so no unpack limit),
# then this script, then EXEC. EXEC runs it all with nothing in between, so an output stream's newest entries are
# the ones just added, if their XADDs worked. That is checked before the ack, in every way an XADD can fail inside
# EXEC: the key is a stream (else WRONGTYPE), the user may still XADD to it (the ACL is checked again at EXEC, and
# cannot change during it), its newest entry is not at the last possible id (where XADD * fails), and each of the
# newest entries has the output's fingerprint (value count, first field and value). The entry is acked only if every
# output is there; otherwise, or if the entry was settled elsewhere first, the outputs just added are deleted again:
# nobody can have read them. (Entry times are not compared: a large XADD takes milliseconds of its own.) The ack
# goes by redis.pcall, so that an ack the server refuses (no XACKDEL on this server, a permission withdrawn) also
# takes the outputs back before the error is returned.
# KEYS[1]: source stream, then the output streams (distinct). ARGV: group, entry id, '1' to ack with XACKDEL ...
# ACKED (else '0'), then per output stream: how many outputs it got, then per output: value count, first field,
# first value. Returns 1 settled here, 0 before.
LARGE_OUTPUT_SCRIPT = """
local ours, complete, a = {}, true, 4
for k = 2, #KEYS do
  local n = tonumber(ARGV[a])
  local newest = {}
  if redis.call('TYPE', KEYS[k])['ok'] == 'stream' and redis.acl_check_cmd('XADD', KEYS[k], '*', 'f', 'v') then
    newest = redis.call('XREVRANGE', KEYS[k], '+', '-', 'COUNT', n)
  end
  for j = 1, n do
    local fp = a + 1 + (n - j) * 3
    local entry = newest[j]
    local possible = entry and entry[1] ~= '18446744073709551615-18446744073709551615'
    if possible and #entry[2] == tonumber(ARGV[fp]) and entry[2][1] == ARGV[fp + 1]
        and entry[2][2] == ARGV[fp + 2] then
      ours[#ours + 1] = {KEYS[k], entry[1]}
    else
      complete = false
    end
  end
  a = a + 1 + 3 * n
end
local acked = 0
if complete and ARGV[3] == '1' then
  acked = redis.pcall('XACKDEL', KEYS[1], ARGV[1], 'ACKED', 'IDS', 1, ARGV[2])
  if not acked.err then acked = acked[1] == -1 and 0 or 1 end
elseif complete then
  acked = redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[2])
end
if acked == 1 then return 1 end
for _, entry in ipairs(ours) do redis.call('XDEL', entry[1], entry[2]) end
if type(acked) == 'table' then return acked end
if not complete then
  return redis.error_reply('an output of entry ' .. ARGV[2] .. ' was not written; nothing was settled')
end
return 0
"""


# Parks failed entries for their retry, all or nothing: each is moved to RETRY_CONSUMER and its due time (the
# server's clock plus its delay) added to the retry set. An entry no longer pending (settled elsewhere meanwhile)
# is skipped. KEYS: the stream, its retry set. ARGV: group, RETRY_CONSUMER, then per entry: id, delay in ms.
# Returns the number parked.
PARK_SCRIPT = """
if not redis.acl_check_cmd('XCLAIM', KEYS[1], ARGV[1], ARGV[2], '0', '0-1', 'JUSTID') then
  return redis.error_reply('NOPERM this user may not XCLAIM on ' .. KEYS[1])
end
if not redis.acl_check_cmd('ZADD', KEYS[2], '0', 'm') then
  return redis.error_reply('NOPERM this user may not ZADD to ' .. KEYS[2])
end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' holds a ' .. kind .. ', not the retry schedule (a zset)')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local parked = 0
for i = 3, #ARGV, 2 do
  if #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID') == 1 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[i + 1]), ARGV[i])
    parked = parked + 1
  end
end
return parked
"""


# Hands out the due retries of one stream, atomically (so that two reclaimers never take the same one): takes up
# to `count` ids due by the server's clock off the retry set and claims each into the reclaimer's consumer if it is
# still parked on RETRY_CONSUMER (a delivery is counted). KEYS: the stream, its retry set. ARGV: group,
# RETRY_CONSUMER, claimer, count. Returns {claimed entries, their delivery counts, ids deleted from the stream
# while parked, ms until the next retry is due or -1 when none is left}.
TAKE_DUE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local entries, counts, gone = {}, {}, {}
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[2], id)
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #row == 1 and row[1][2] == ARGV[2] then
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, id)
    if #claimed == 1 then
      entries[#entries + 1] = claimed[1]
      counts[#counts + 1] = row[1][4] + 1
    else
      gone[#gone + 1] = id
    end
  end
end
local next_due = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local wait = -1
if #next_due == 2 then wait = math.max(0, tonumber(next_due[2]) - now) end
return {entries, counts, gone, wait}
"""


class Record:
    """An entry whose ack carries outputs: results, or its dead letter."""

    __slots__ = ("dead", "entry_id", "large", "outputs", "stream")

    def __init__(self, stream: str, entry_id: str | bytes, outputs: list[Output], dead: bool) -> None:
        self.stream = stream
        self.entry_id = entry_id
        self.outputs = outputs
        self.dead = dead
        # too many values for the script's unpack(): settled by a transaction of its own
        self.large = len(outputs[0][1]) > SCRIPT_MAX_VALUES if len(outputs) == 1 else any(
            len(values) > SCRIPT_MAX_VALUES for _, values in outputs)


class Step:
    """Commands that are written together or not at all, and what their reply confirms."""

    __slots__ = ("commands", "done", "ids", "kind", "records", "stream")

    def __init__(self, kind: str, commands: list[Command], stream: str = "", ids: Sequence[str | bytes] = (),
                 records: Sequence[Record] = ()) -> None:
        self.kind = kind  # ack | deleted | retry | script | large
        self.commands = commands
        self.stream = stream
        self.ids = ids  # the entries an ack, deleted or retry step covers
        self.records = records
        self.done = False


class Settlement:
    """What one batch's handling decided, written in as few steps as possible (one per kind, one script call for
    the entries with small outputs), and the counts the server confirmed."""

    __slots__ = ("_retries", "_steps", "acked_by_stream", "acks", "claimed", "counted", "dead_by_stream",
                 "deduplicated_by_stream", "deleted_by_stream", "deleting", "earliest_retry_s", "forgotten", "group",
                 "received", "records", "retried_by_stream", "retry_wait_ms_by_stream", "skipped", "timings")

    def __init__(self, group: str, deleting: Container[str] = ()) -> None:
        self.group = group
        self.deleting = deleting  # source streams whose acks delete the entry (XACKDEL ... ACKED)
        self.acks: dict[str, list[str | bytes]] = {}  # handled, nothing to publish
        self.records: list[Record] = []  # handled with results, or dead-lettered
        self._retries: dict[str, list[tuple[str | bytes, int]]] = {}  # failed: (id, delay ms), parked for a retry
        self.earliest_retry_s: float | None = None  # the shortest retry delay in this settlement
        self.forgotten: dict[str, list[str | bytes]] = {}  # deleted while pending: acked, counted as deleted
        self.received: dict[str, int] = {}  # entries read, per stream
        self.claimed = False  # read by the reclaimer
        self.timings: dict[str, tuple[float, int]] = {}  # stream -> (seconds in handlers, handler calls)
        self.deduplicated_by_stream: dict[str, int] = {}  # acked without running the handler: done before
        # Confirmed by the server, filled in by confirm():
        self.acked_by_stream: dict[str, int] = {}
        self.dead_by_stream: dict[str, int] = {}
        self.retried_by_stream: dict[str, int] = {}
        self.retry_wait_ms_by_stream: dict[str, int] = {}  # the delays the confirmed retries were scheduled with
        self.deleted_by_stream: dict[str, int] = {}
        self.skipped = 0  # entries with outputs that another consumer had settled first
        self.counted = False  # its confirmed counts were added to the worker's stats (once)
        self._steps: list[Step] | None = None

    # -- deciding ---------------------------------------------------------------------------------------------

    def ack(self, message: Message) -> None:
        if message.outputs:
            self.records.append(Record(message.stream, message.raw_id, message.outputs, False))
        else:
            self.acks.setdefault(message.stream, []).append(message.raw_id)

    def ack_all(self, stream: str, messages: list[Message]) -> None:
        if any(message.outputs for message in messages):
            for message in messages:
                self.ack(message)
        else:
            self.acks.setdefault(stream, []).extend([message.raw_id for message in messages])

    def dead_letter(self, message: Message, dead_stream: str, error_class: str, error: str,
                    traceback: str | None = None, trace: Sequence[FieldValue] = ()) -> None:
        """Move `message` to `dead_stream`: its original fields plus where it came from and why it died (and the
        end of the last failure's traceback, when there was one)."""
        fields: list[FieldValue] = list(message.raw_fields)
        fields += [
            "fw:stream", message.stream, "fw:group", self.group, "fw:id", message.id,
            "fw:deliveries", message.deliveries, "fw:error_class", error_class, "fw:error", error[:4096],
            "fw:dead_at_ms", int(time.time() * 1000),
        ]
        if traceback:
            fields += ["fw:traceback", traceback[-TRACEBACK_MAX_CHARS:]]
        if trace:  # the failed call's span (tracing on), replacing the producer's: the app continues from here
            fields = [*_without_trace(fields), *trace]
        self.records.append(Record(message.stream, message.raw_id, [(dead_stream, fields)], True))

    def retry(self, message: Message, delay_s: float) -> None:
        """Leave `message` pending for a retry in `delay_s` seconds: it is parked on the group's RETRY_CONSUMER
        with its due time in the retry set, and the reclaimer hands it out again when it is due."""
        self._retries.setdefault(message.stream, []).append((message.raw_id, int(delay_s * 1000)))
        if self.earliest_retry_s is None or delay_s < self.earliest_retry_s:
            self.earliest_retry_s = delay_s

    def deleted(self, stream: str, ids: Sequence[str | bytes]) -> None:
        """Entries deleted while pending: acknowledge and count them."""
        self.forgotten.setdefault(stream, []).extend(ids)

    def __bool__(self) -> bool:
        return bool(self.acks or self.records or self._retries or self.forgotten)

    # -- writing ----------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Every step written and confirmed."""
        return self._steps is not None and all(step.done for step in self._steps)

    def unwritten(self) -> dict[str, list[str | bytes]]:
        """The entries of the steps not yet confirmed, by stream (to keep them claimed while a refused step waits)."""
        ids: dict[str, list[str | bytes]] = {}
        for step in self._steps if self._steps is not None else self._plan():
            if step.done:
                continue
            for record in step.records:
                ids.setdefault(record.stream, []).append(record.entry_id)
            if step.ids:
                ids.setdefault(step.stream, []).extend(step.ids)
        return ids

    def commands(self) -> list[Command]:
        """The commands of every step not yet confirmed, in order."""
        if self._steps is None:
            self._steps = self._plan()
        return [command for step in self._steps if not step.done for command in step.commands]

    def with_script_text(self) -> None:
        """Send the scripts of the steps not yet confirmed as their text from now on (after a NOSCRIPT reply: the
        server's script cache was emptied, and the refused call did nothing)."""
        for step in self._steps or ():
            if not step.done:
                step.commands = [with_text(command) for command in step.commands]

    def confirm(self, replies: Sequence[Any]) -> list[Exception]:
        """Take the replies to `commands()`, in order: count what each written step confirmed and return the
        server's errors of the steps it refused (those stay to be sent again)."""
        assert self._steps is not None, "confirm() before commands()"
        errors: list[Exception] = []
        position = 0
        for step in self._steps:
            if step.done:
                continue
            mine = replies[position:position + len(step.commands)]
            position += len(step.commands)
            error = next((reply for reply in mine if isinstance(reply, Exception)), None)
            last = mine[-1]
            if error is None and step.kind == "large" and isinstance(last, list):
                error = next((reply for reply in last if isinstance(reply, Exception)), None)
            if error is not None:
                errors.append(error)
                continue
            step.done = True
            self._count(step, last)
        return errors

    def _count(self, step: Step, reply: Any) -> None:
        if step.kind == "ack":
            acked = int(reply) if isinstance(reply, int) else sum(code != -1 for code in reply)  # XACKDEL: codes
            _add(self.acked_by_stream, step.stream, acked)
        elif step.kind == "deleted":
            _add(self.deleted_by_stream, step.stream, len(step.ids))
        elif step.kind == "retry":
            _add(self.retried_by_stream, step.stream, len(step.ids))
            _add(self.retry_wait_ms_by_stream, step.stream, sum(delay for _, delay in self._retries[step.stream]))
        else:
            flags = reply if step.kind == "script" else [reply[-1]]
            for record, flag in zip(step.records, flags, strict=True):
                if int(flag) != 1:
                    self.skipped += 1
                else:
                    _add(self.dead_by_stream if record.dead else self.acked_by_stream, record.stream, 1)

    def _plan(self) -> list[Step]:
        group, deleting = self.group, self.deleting
        steps = [Step("ack", [ack_command(group, stream, ids, stream in deleting)], stream, ids)
                 for stream, ids in self.acks.items() if ids]
        steps += [Step("deleted", [("XACK", stream, group, *ids)], stream, ids)
                  for stream, ids in self.forgotten.items() if ids]
        steps += [Step("retry", [park_script_call(group, stream, retries)], stream, [i for i, _ in retries])
                  for stream, retries in self._retries.items() if retries]
        small = [record for record in self.records if not record.large]
        kept, deleted = _split(small, deleting) if deleting else (small, [])
        for script, records in ((SETTLE_SCRIPT, kept), (SETTLE_DELETE_SCRIPT, deleted)):
            if records:
                call, ordered = settle_script_call(group, records, script)
                steps.append(Step("script", [call], records=ordered))
        steps += [Step("large", large_output_transaction(group, record, record.stream in deleting),
                       records=[record])
                  for record in self.records if record.large]
        return steps


def ack_command(group: str, stream: str, ids: Sequence[str | bytes], delete: bool) -> Command:
    """The plain ack of `ids`: XACK, or XACKDEL ... ACKED when the stream's acks delete (ACKDEL_CODES)."""
    if delete:
        return ("XACKDEL", stream, group, "ACKED", "IDS", len(ids), *ids)
    return ("XACK", stream, group, *ids)


def park_script_call(group: str, stream: str, retries: Sequence[tuple[str | bytes, int]]) -> Command:
    args: list[FieldValue] = [group, RETRY_CONSUMER]
    for entry_id, delay_ms in retries:
        args += [entry_id, delay_ms]
    return script_call(PARK_SCRIPT, [stream, retry_key(stream, group)], args)


# Scripts go by digest (EVALSHA): a settle then costs its arguments on the wire, not the script's text too. The
# server's script cache is empty after a restart (or SCRIPT FLUSH): a NOSCRIPT reply means the call did nothing,
# and the step is sent again once with the text (`Settlement.with_script_text`), which caches it again.
SCRIPT_SHAS: dict[str, str] = {}


def script_call(script: str, keys: Sequence[str], args: Sequence[FieldValue]) -> Command:
    sha = SCRIPT_SHAS.get(script)
    if sha is None:
        sha = SCRIPT_SHAS[script] = hashlib.sha1(script.encode()).hexdigest()
    return ("EVALSHA", sha, len(keys), *keys, *args)


def with_text(command: Command) -> Command:
    """`command` as an EVAL with the script's text, if it is an EVALSHA of one of these scripts."""
    if command[0] != "EVALSHA":
        return command
    script = next(text for text, sha in SCRIPT_SHAS.items() if sha == command[1])
    return ("EVAL", script, *command[2:])


def settle_script_call(group: str, records: Sequence[Record],
                       script: str = SETTLE_SCRIPT) -> tuple[Command, list[Record]]:
    """The SETTLE_SCRIPT (or SETTLE_DELETE_SCRIPT) call for `records`, and the records in the order of its reply's
    flags (grouped in runs of one source stream and one output shape)."""
    runs: dict[tuple[str, tuple[tuple[str, int], ...]], list[Record]] = {}
    for record in records:
        shape = tuple((out_stream, len(values)) for out_stream, values in record.outputs)
        run = runs.get((record.stream, shape))
        if run is None:
            runs[(record.stream, shape)] = [record]
        else:
            run.append(record)
    sources: dict[str, None] = {}
    outputs: dict[str, None] = {}
    args: list[FieldValue] = [group, 0]
    ordered: list[Record] = []
    for (stream, shape), run in runs.items():
        sources[stream] = None
        args += [stream, len(run), len(shape)]
        for out_stream, count in shape:
            outputs[out_stream] = None
            args += [out_stream, count]
        for record in run:
            args.append(record.entry_id)
            for _, values in record.outputs:
                args += values
        ordered += run
    args[1] = len(sources)
    keys = [*sources, *outputs]  # a key both read and written is checked for both
    return script_call(script, keys, args), ordered


def large_output_transaction(group: str, record: Record, delete: bool = False) -> list[Command]:
    fingerprints: dict[str, list[FieldValue]] = {}
    commands: list[Command] = [("MULTI",)]
    for out_stream, values in record.outputs:
        commands.append(("XADD", out_stream, "*", *values))
        fingerprints.setdefault(out_stream, []).extend([len(values), values[0], values[1]])
    args: list[FieldValue] = [group, record.entry_id, "1" if delete else "0"]
    for prints in fingerprints.values():
        args += [len(prints) // 3, *prints]
    # By its text, not its digest: inside EXEC, a NOSCRIPT would come after the XADDs had run, leaving outputs
    # that no ack keeps or deletes.
    commands.append(("EVAL", LARGE_OUTPUT_SCRIPT, 1 + len(fingerprints), record.stream, *fingerprints, *args))
    commands.append(("EXEC",))
    return commands


def _split(records: Sequence[Record], deleting: Container[str]) -> tuple[list[Record], list[Record]]:
    """(records of streams whose acks keep the entry, records of those whose acks delete it)"""
    kept: list[Record] = []
    deleted: list[Record] = []
    for record in records:
        (deleted if record.stream in deleting else kept).append(record)
    return kept, deleted


def _without_trace(fields: list[FieldValue]) -> list[FieldValue]:
    pairs = zip(fields[::2], fields[1::2], strict=True)
    return [item for name, value in pairs if name not in (b"traceparent", b"tracestate") for item in (name, value)]


def _add(counts: dict[str, int], key: str, value: int) -> None:
    if value:
        counts[key] = counts.get(key, 0) + value
