"""Error translation: redis-py's and the socket's errors become fastworker's, here and nowhere else."""

from __future__ import annotations

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
    if isinstance(exc, rex.ResponseError) and str(exc).startswith("NOGROUP"):
        return NoGroupError(str(exc))
    return RedisCommandError(f"{type(exc).__name__}: {exc}")


@contextmanager
def translated(url: str = "") -> Iterator[None]:
    try:
        yield
    except (rex.RedisError, OSError) as exc:
        raise translate(exc, url) from exc
