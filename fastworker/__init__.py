"""fastworker: a Redis Streams worker fleet that consumes at peak load without losing a message."""

from fastworker.app import App, Dedup, Handler, load_app
from fastworker.config import Settings, load_settings
from fastworker.errors import (
    AppImportError,
    ConfigError,
    ExitCode,
    FastworkerError,
    PayloadInvalid,
    RedisAuthError,
    RedisPermissionError,
    RedisTLSError,
    RedisUnavailable,
    Reject,
    Retry,
)
from fastworker.message import Message
from fastworker.policy import Backoff
from fastworker.publisher import Entry, PayloadError, Publisher, StreamTypeError, SyncPublisher
from fastworker.server import EmbeddedServer
from fastworker.worker import Worker, run

__version__ = "0.1.0"

__all__ = [
    "App",
    "AppImportError",
    "Backoff",
    "ConfigError",
    "Dedup",
    "EmbeddedServer",
    "Entry",
    "ExitCode",
    "FastworkerError",
    "Handler",
    "Message",
    "PayloadError",
    "PayloadInvalid",
    "Publisher",
    "RedisAuthError",
    "RedisPermissionError",
    "RedisTLSError",
    "RedisUnavailable",
    "Reject",
    "Retry",
    "Settings",
    "StreamTypeError",
    "SyncPublisher",
    "Worker",
    "__version__",
    "load_app",
    "load_settings",
    "run",
]
