"""The wire format: commands packed into RESP by hand, and replies parsed by hiredis.

No I/O here: `pack` makes the bytes to send, `ReplyReader` turns the bytes received into replies. A server error
reply is a value (the redis-py exception `errors.reply_error` builds for it), never raised: a pipelined exchange
reads every reply even when one command failed, so the connection stays in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis.exceptions as rex

from fastworker.edge.errors import reply_error
from fastworker.message import FieldValue

Command = tuple[FieldValue, ...]

_HEADS: dict[int, bytes] = {}  # "\r\n$<length>\r\n" by length: formatting it is most of a packer's work


def pack(commands: Sequence[Command]) -> bytes:
    """Commands in RESP, ready to send: a leaner packer than redis-py's for the hot path (no per-argument encoder
    lookups, entry ids passed through as the bytes the server sent, argument headers cached by length)."""
    out: list[bytes] = []
    append = out.append
    for command in commands:
        append(b"\r\n*%d" % len(command))
        for arg in command:
            # int and float go as their decimal form, as redis-py sends them
            data = arg if type(arg) is bytes else (arg if type(arg) is str else str(arg)).encode()
            size = len(data)
            head = _HEADS.get(size)
            if head is None:
                head = b"\r\n$%d\r\n" % size
                if size < 4096:  # ids, names and small payloads; big ones are rare and varied
                    _HEADS[size] = head
            append(head)
            append(data)
    append(b"\r\n")
    return b"".join(out)[2:]  # each piece leads with the previous one's CRLF


def head(args: Sequence[FieldValue], more: int) -> bytes:
    """The start of one command of `len(args) + more` arguments: its header and `args`, packed. `more` calls of
    `argument` complete it: for many commands that differ only in their last arguments (a bulk XADD)."""
    packed = pack([tuple(args)])
    return b"*%d" % (len(args) + more) + packed[packed.index(b"\r\n"):]


def argument(data: bytes) -> bytes:
    """One argument of a command begun by `head`."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


_MORE = object()  # hiredis' answer when the bytes fed so far end inside a reply
# RESP3 pushes (e.g. client-side caching invalidations) answer no command; hiredis before 3.2 has no such type
_PUSH: tuple[type, ...] = tuple(kind for kind in (getattr(hiredis, "PushNotification", None),) if kind)


class ReplyReader:
    """Replies, in order, from the bytes a connection received: `feed` what was read, then `take` replies.

    Bytes come back exactly as the server sent them (no decoding). A malformed stream raises redis-py's
    InvalidResponse, as its own reader does, so `errors.translate` words it the same.
    """

    def __init__(self) -> None:
        self._reader = hiredis.Reader(protocolError=rex.InvalidResponse, replyError=reply_error,
                                      notEnoughData=_MORE)

    def feed(self, data: bytes) -> None:
        self._reader.feed(data)

    def take(self, replies: list[Any], count: int) -> bool:
        """Append replies to `replies` until it holds `count` of them (True), or the bytes fed so far run out
        first (False: feed more and call again). Pushes are skipped: they are not replies to a command."""
        gets = self._reader.gets
        while len(replies) < count:
            reply = gets()
            if reply is _MORE:
                return False
            if not isinstance(reply, _PUSH):
                replies.append(reply)
        return True

    def buffered(self) -> bool:
        """Whether bytes were fed that no reply has taken yet (a connection with them is out of step)."""
        return bool(self._reader.has_data())
