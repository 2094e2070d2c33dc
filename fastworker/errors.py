"""Errors and signals of fastworker, and the process exit codes they map to.

Every exception fastworker raises derives from `FastworkerError`. Redis client errors are translated into these
at the I/O edge (`fastworker.edge`), so no other module needs to know redis-py's exception classes. `Reject` and
`Retry` are signals a handler raises to choose a message's fate explicitly.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes: distinct so that scripts and supervisors can tell failures apart."""

    OK = 0
    FAILURE = 1
    USAGE = 2  # bad command line (argparse uses 2 as well)
    CONFIG = 3
    APP_IMPORT = 4
    REDIS_UNREACHABLE = 5
    REDIS_AUTH = 6
    CRASH_LOOP = 7
    UNHEALTHY = 8
    TLS = 9  # the server's TLS certificate was not trusted, or names another host: pass its CA, retrying won't help
    INTERRUPTED = 130  # second signal: left at once, the PEL keeps the rest


class FastworkerError(Exception):
    """Root of every error fastworker raises."""

    exit_code = ExitCode.FAILURE


class ConfigError(FastworkerError):
    """A setting is missing, malformed, or combined with another in a hazardous way."""

    exit_code = ExitCode.CONFIG


class AppImportError(FastworkerError):
    """The `module:attr` app reference could not be imported or is not an App."""

    exit_code = ExitCode.APP_IMPORT


class RedisUnavailable(FastworkerError):
    """The server cannot be reached (refused, timed out, connection lost)."""

    exit_code = ExitCode.REDIS_UNREACHABLE


class RedisTLSError(RedisUnavailable):
    """The server's TLS certificate does not verify (unknown CA, expired, or issued for another host name).

    A `RedisUnavailable`, so that running loops ride it out like an outage (a certificate rotated under a running
    fleet); at start-up it is its own exit code, since retrying cannot fix it.
    """

    exit_code = ExitCode.TLS

    @classmethod
    def from_verification(cls, verify_message: str, hostname_mismatch: bool, where: str = "") -> RedisTLSError:
        """The one line for a failed certificate check, with what to do about it."""
        verify_message = verify_message.rstrip(".")
        if hostname_mismatch:
            return cls(f"the server's TLS certificate is not valid for the name we connected to{where}: "
                       f"{verify_message}; connect by a name the certificate lists (see README 'TLS')")
        return cls(f"the server's TLS certificate is not trusted{where}: {verify_message}; pass the CA that signed "
                   "it: rediss://HOST:PORT/DB?ssl_ca_certs=/path/ca.pem, or REDIS_TLS_CA=/path/ca.pem in the "
                   "environment (see README 'TLS')")


class RedisAuthError(FastworkerError):
    """The server refused our credentials (wrong password, unknown ACL user, missing permission)."""

    exit_code = ExitCode.REDIS_AUTH


class RedisPermissionError(RedisAuthError):
    """The server accepted our credentials, but its ACL denies a command (or key) the fleet needs."""


class RedisCommandError(FastworkerError):
    """The server answered a command with an error that is not one of the cases handled above."""


class SettleRefused(RedisCommandError):
    """The server refused to write part of a settlement (a missing permission, a key of the wrong type, ...).

    Nothing of a refused step was written: its entries are still pending, and the step can be sent again as it is,
    without handling the entries again. `cause` is the server's error, translated.
    """

    def __init__(self, cause: FastworkerError, steps: int = 1) -> None:
        super().__init__(f"the server refused to settle a batch ({steps} step(s)): {cause}")
        self.cause = cause
        self.exit_code = cause.exit_code


class NoGroupError(RedisCommandError):
    """The stream or its consumer group does not exist (deleted, flushed, or a restart without data)."""


class Reject(FastworkerError):
    """Raised by a handler: the message can never succeed, dead-letter it now without retrying."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(FastworkerError):
    """Raised by a handler: retry the message later, after `delay_s` seconds if given (e.g. an HTTP 429's
    Retry-After), else after the handler's backoff delay for this attempt.

    Any other exception retries too (unless the handler's `dead_on` names it); `Retry` marks the failure as expected
    (logged at INFO, without a traceback) and may choose the delay. Delays are capped at MAX_RETRY_DELAY_S.
    """

    def __init__(self, reason: str = "retry requested by handler", *, delay_s: float | None = None) -> None:
        if delay_s is not None and not delay_s >= 0:
            raise ValueError(f"Retry delay_s must be a number of seconds >= 0, got {delay_s!r}")
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s


class PayloadInvalid(FastworkerError):
    """An entry's payload does not fit the type its handler declared. Dead-lettered at its first delivery: no
    retry can make it fit. The message names the field path, e.g. `$.params.days: expected int, got str`."""


class CrashLoop(FastworkerError):
    """Worker processes keep dying: leave it to systemd or Kubernetes to decide what comes next."""

    exit_code = ExitCode.CRASH_LOOP


class PartitionMismatch(ConfigError):
    """The partition count configured for a logical stream differs from the count recorded on the server for it:
    producers and consumers would disagree on which keys hold its entries. A logical stream's count is fixed once
    recorded; configure the recorded one (`recorded`), or move the stream's entries to a new logical stream."""

    def __init__(self, stream: str, configured: int, recorded: int, record_key: str) -> None:
        super().__init__(f"stream {stream!r} is configured with {configured} partition(s), but the server records "
                         f"{recorded} (key {record_key!r}): a logical stream keeps its partition count, configure "
                         f"{recorded}")
        self.stream = stream
        self.configured = configured
        self.recorded = recorded
        self.record_key = record_key
