"""Error translation: redis-py's and the socket's errors become fastworker's, here and nowhere else.

Also the one place that reads the server's error text: `reply_error` turns an error reply into the redis-py
exception redis-py's own parser would give (so `translate` and every message read the same, whichever reader took
the reply), and the predicates below say what an error reply means, for callers that treat some as an answer
(a key or group that does not exist, a permission the user lacks, a key of another type).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions as rex

from fastworker.config import redact_url
from fastworker.errors import (
    FastworkerError,
    NoGroupError,
    RedisAuthError,
    RedisCommandError,
    RedisTLSError,
    RedisUnavailable,
)

# OpenSSL's verify codes for a certificate issued for another name: host name, e-mail, IP address
NAME_MISMATCH_CODES = (62, 63, 64)


def _cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The failed certificate check `exc` is, or was raised from (redis-py wraps it in its ConnectionError)."""
    seen: BaseException | None = exc
    for _ in range(8):  # chains are short; a bound guards against cycles
        if seen is None or isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def translate(exc: BaseException, url: str = "") -> FastworkerError:
    """The fastworker error for a redis-py (or socket) error."""
    where = f" ({redact_url(url)})" if url else ""
    if isinstance(exc, FastworkerError):
        return exc
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError | rex.NoPermissionError) or (
            isinstance(exc, rex.ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM"))):
        return RedisAuthError(f"the server refused our credentials{where}: {exc}")
    cert_error = _cert_error(exc)
    if cert_error is not None:
        return RedisTLSError.from_verification(cert_error.verify_message or str(cert_error),
                                               cert_error.verify_code in NAME_MISMATCH_CODES, where)
    if isinstance(exc, rex.BusyLoadingError | rex.ConnectionError | rex.TimeoutError | OSError):
        return RedisUnavailable(f"cannot reach the server{where}: {exc}")
    if is_no_group(exc):
        return NoGroupError(str(exc))
    return RedisCommandError(f"{type(exc).__name__}: {exc}")


@contextmanager
def translated(url: str = "") -> Iterator[None]:
    """Raise what `translate` makes of a redis-py or socket error raised inside the block (`url`: shown redacted)."""
    try:
        yield
    except (rex.RedisError, OSError) as exc:
        raise translate(exc, url) from exc


# The error codes redis-py's parser gives a class of their own, with the code cut off the message as it does.
_CODES: dict[str, type[rex.RedisError]] = {
    "OOM": rex.OutOfMemoryError, "WRONGPASS": rex.AuthenticationError, "EXECABORT": rex.ExecAbortError,
    "LOADING": rex.BusyLoadingError, "NOSCRIPT": rex.NoScriptError, "READONLY": rex.ReadOnlyError,
    "NOAUTH": rex.AuthenticationError, "NOPERM": rex.NoPermissionError, "ASK": rex.AskError,
    "TRYAGAIN": rex.TryAgainError, "MOVED": rex.MovedError, "CLUSTERDOWN": rex.ClusterDownError,
    "CROSSSLOT": rex.ClusterCrossSlotError, "MASTERDOWN": rex.MasterDownError,
}
# ERR replies redis-py reads as another class than ResponseError (those about AUTH and modules come only from
# commands the edge does not send outside redis-py's own connect)
_ERR_TEXTS: dict[str, type[rex.RedisError]] = {"max number of clients reached": rex.ConnectionError}


def reply_error(message: str) -> rex.RedisError:
    """The redis-py exception for a server error reply (`message` without the leading `-`), as redis-py's parser
    builds it: `NOPERM this user...` gives NoPermissionError('this user...') and `ERR syntax error`
    ResponseError('syntax error') (the code cut off), an unknown code a ResponseError with the whole text. Used as
    hiredis' `replyError`: the exception is the reply's value, never raised."""
    code, _, rest = message.partition(" ")
    if code in _CODES:
        return _CODES[code](rest, status_code=code)
    if code == "ERR":
        return _ERR_TEXTS.get(rest, rex.ResponseError)(rest, status_code=code)
    return rex.ResponseError(message)


def is_missing_key(exc: BaseException) -> bool:
    """Whether `exc` is the server saying the key does not exist (XINFO on a missing stream: `no such key`)."""
    return isinstance(exc, rex.ResponseError) and "no such key" in str(exc).lower()


def is_no_group(exc: BaseException) -> bool:
    """Whether `exc` is the server's NOGROUP: the stream or its consumer group does not exist."""
    return isinstance(exc, NoGroupError) or (isinstance(exc, rex.ResponseError) and str(exc).startswith("NOGROUP"))


def is_busy_group(exc: BaseException) -> bool:
    """Whether `exc` is the server's BUSYGROUP: the consumer group to create exists already."""
    return isinstance(exc, rex.ResponseError) and str(exc).startswith("BUSYGROUP")


def is_no_permission(exc: BaseException) -> bool:
    """Whether `exc` is the server's NOPERM: the ACL denies this user the command or one of its keys (from redis-py's
    parser or `reply_error` it is a NoPermissionError; a script's `error_reply` may carry the code in its text)."""
    return isinstance(exc, rex.NoPermissionError) or (
        isinstance(exc, rex.ResponseError) and str(exc).startswith("NOPERM"))


def is_wrong_type(exc: BaseException) -> bool:
    """Whether `exc` (redis-py's, or already translated) is the server's WRONGTYPE: the key holds another type."""
    return isinstance(exc, rex.ResponseError | RedisCommandError) and "WRONGTYPE" in str(exc)


# --- cluster replies: which refusals a client may send again, and where to -----------------------------------------
# A MOVED, ASK, TRYAGAIN or CLUSTERDOWN reply means the server did not run the command: sending it again (to the
# node named, or later) cannot apply it twice. CROSSSLOT is a refusal too, but sending it again cannot cure it.


class ClusterRedirectError(RedisCommandError):
    """The cluster kept refusing a command (MOVED, ASK, TRYAGAIN or CLUSTERDOWN) after every re-send allowed: the
    slot map did not settle (a migration or failover outlasting the wait). Nothing of the refused commands was
    applied."""


@dataclasses.dataclass(frozen=True)
class Redirect:
    """Where a MOVED or ASK reply sends a command: `slot` (0..16383) now served (MOVED) or being imported (ASK) by
    `host`:`port`. `host` is "" when the server left it out (the node's own address: ask the same host)."""

    slot: int
    host: str
    port: int
    ask: bool  # ASK: for this command only, after ASKING; MOVED: the slot map changed


def is_moved(exc: BaseException) -> bool:
    """Whether `exc` is a MOVED reply: the slot is served by another node; the command was not run."""
    return isinstance(exc, rex.MovedError) or _has_code(exc, "MOVED")


def is_ask(exc: BaseException) -> bool:
    """Whether `exc` is an ASK reply: the key is migrating; run the command on the named node after ASKING."""
    return (isinstance(exc, rex.AskError) and not isinstance(exc, rex.MovedError)) or _has_code(exc, "ASK")


def is_try_again(exc: BaseException) -> bool:
    """Whether `exc` is TRYAGAIN: a multi-key command met a slot in migration; it was not run."""
    return isinstance(exc, rex.TryAgainError) or _has_code(exc, "TRYAGAIN")


def is_cluster_down(exc: BaseException) -> bool:
    """Whether `exc` is CLUSTERDOWN: the node does not serve the slot now (a failover under way, slots uncovered);
    the command was not run."""
    return isinstance(exc, rex.ClusterDownError) or _has_code(exc, "CLUSTERDOWN")


def is_cross_slot(exc: BaseException) -> bool:
    """Whether `exc` is CROSSSLOT: the command's keys hash to different slots; nothing was run, and sending it
    again cannot help (the keys must share a hash tag)."""
    return isinstance(exc, rex.ClusterCrossSlotError) or _has_code(exc, "CROSSSLOT")


def is_refused_by_cluster(exc: BaseException) -> bool:
    """Whether `exc` is a refusal that a re-send may cure (MOVED, ASK, TRYAGAIN, CLUSTERDOWN): the command was not
    run, so sending it again cannot apply it twice."""
    return is_moved(exc) or is_ask(exc) or is_try_again(exc) or is_cluster_down(exc)


def redirect_target(exc: BaseException) -> Redirect | None:
    """The target of a MOVED or ASK reply (`MOVED 3999 127.0.0.1:6381`, `ASK 3999 [::1]:6381`, `MOVED 3999 :6381`),
    None for any other error or a malformed one."""
    if not (is_moved(exc) or is_ask(exc)):
        return None
    text = str(exc).split(" ", 1)[1] if str(exc).startswith(("MOVED ", "ASK ")) else str(exc)
    slot, _, address = text.strip().partition(" ")
    host, _, port = address.rpartition(":")
    if not (slot.isdigit() and port.isdigit()):
        return None
    return Redirect(int(slot), host.strip("[]"), int(port), ask=is_ask(exc))


def _has_code(exc: BaseException, code: str) -> bool:
    return isinstance(exc, rex.ResponseError) and str(exc).startswith(code + " ")
