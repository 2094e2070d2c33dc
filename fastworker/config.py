"""Settings: one frozen, validated, picklable object, and the only code that reads the environment.

Every tunable is a field of `Settings` with its default, its unit in its name, and a help line. Its command-line
flag (`--batch-size`) and environment fallback (`FASTWORKER_BATCH_SIZE`) are derived from the field name, so a
field cannot exist without exactly one flag. Precedence: flag > environment > default. The connection also honours
the app's own variables: `REDIS_URL`, or `REDIS_HOST`, `REDIS_PORT`, `REDIS_PASSWORD`, `REDIS_DB`,
`REDIS_USERNAME` and `REDIS_TLS`, and `REDIS_TLS_CA`: the CA file that signed the server's certificate, added to
any rediss:// URL (as redis-py's `ssl_ca_certs` query parameter) that does not name one itself.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

from fastworker.errors import ConfigError

ENV_PREFIX = "FASTWORKER_"
REDIS_SCHEMES = ("redis", "rediss", "unix")
TLS_CA_ENV = "REDIS_TLS_CA"  # the CA file of a server with a private CA; read by load_settings()
# A blocking read must come back before the socket gives up on it: BLOCK plus this much slack.
SOCKET_TIMEOUT_MARGIN_MS = 1000
# The timeout watchdog checks every half timeout, so a call is cancelled between 1 and 1.5 timeouts.
TIMEOUT_OVERSHOOT = 1.5


def _field(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None) -> Any:
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _default_processes() -> int:
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of a worker fleet. Build it with `Settings(...)` or `load_settings()`."""

    redis_url: str = _field("redis://localhost:6379/0", help="server URL: redis://, rediss:// (TLS) or unix://")
    batch_size: int = _field(500, help="entries per XREADGROUP (COUNT) and per settle pipeline")
    block_ms: int = _field(2000, help="how long one XREADGROUP waits for new entries (BLOCK)")
    claim_idle_ms: int = _field(60_000, help="pending entries idle this long are claimed from any consumer")
    claim_interval_ms: int = _field(5_000, help="how often the reclaimer looks for idle pending entries")
    max_deliveries: int = _field(5, help="deliveries after which a failing entry goes to the dead-letter stream")
    concurrency: int = _field(64, help="handler calls in flight at once, per worker process")
    handler_timeout_s: float = _field(30.0, help="a handler call running longer has failed (cancelled within 1.5x)")
    shutdown_grace_s: float = _field(30.0, help="time to finish in-flight work after SIGTERM before leaving it")
    socket_timeout_s: float = _field(10.0, help="socket timeout of every connection; must exceed block_ms")
    dead_letter_suffix: str = _field(":dead", help="dead letters of stream S go to S + this suffix")
    group_start_id: str = _field("0", help="ID a missing group is created at: 0 (whole stream) or $ (new only)")
    processes: int = _field(help="worker processes (default: CPU count)", factory=_default_processes)
    consumers: int = _field(0, help="consumer names over all processes (0: one per process)")
    consumer_prefix: str = _field(help="consumer names are PREFIX-0 .. PREFIX-N (default: host name)",
                                  factory=socket.gethostname)
    gc_threshold: int = _field(20_000, help="worker processes' first GC generation threshold (0: Python's 700)")
    crash_loop_restarts: int = _field(5, help="worker deaths before ready (or failed starts) within "
                                      "crash_loop_window_s that stop the fleet")
    crash_loop_window_s: float = _field(60.0, help="window in which crash_loop_restarts deaths mean a crash loop")
    http_port: int = _field(0, help="serve /healthz, /readyz and /metrics on this port (0: off)")
    http_host: str = _field("0.0.0.0", help="address the HTTP endpoints listen on")
    sample_interval_s: float = _field(5.0, help="how often stream gauges (length, pending, lag) are sampled")
    trim_interval_s: float = _field(0.0, help="trim the app's streams safely this often (0: never)")
    trim_retain_s: float = _field(3600.0, help="trimming keeps entries younger than this, even when acked")
    dead_consumer_idle_s: float = _field(86400.0, help="drop consumers idle this long with nothing pending (0: never)")
    log_level: str = _field("INFO", help="DEBUG, INFO, WARNING or ERROR")
    log_format: str = _field("text", help="text or json (one object a line)")
    output_streams: tuple[str, ...] = _field((), help="streams the handlers write results to, comma-separated: "
                                             "housekeeping trims them by the output limits below (default none)")
    output_max_age_s: float = _field(86400.0, help="output streams keep nothing older than this (0: no age limit)")
    output_max_len: int = _field(0, help="output streams keep at most this many newest entries (0: no limit)")

    def __post_init__(self) -> None:
        if not isinstance(self.output_streams, tuple):  # a comma list or any iterable given in code
            object.__setattr__(self, "output_streams", split_list(self.output_streams))
        problems = _problems(self)
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def consumer_count(self) -> int:
        return self.consumers or self.processes

    def consumer_names(self) -> list[str]:
        return [f"{self.consumer_prefix}-{index}" for index in range(self.consumer_count)]

    def redacted_url(self) -> str:
        return redact_url(self.redis_url)


def _problems(s: Settings) -> list[str]:
    """Every way these settings are malformed or hazardous; empty when they are sound."""
    return _range_problems(s) or _hazards(s) + _format_problems(s)


def _range_problems(s: Settings) -> list[str]:
    problems = [f"{name} must be at least {low}, got {getattr(s, name)}" for name, low in (
        ("batch_size", 1), ("block_ms", 1), ("claim_idle_ms", 1), ("claim_interval_ms", 1),
        ("max_deliveries", 1), ("concurrency", 1), ("processes", 1), ("consumers", 0), ("crash_loop_restarts", 1),
        ("gc_threshold", 0), ("http_port", 0), ("trim_interval_s", 0), ("trim_retain_s", 0),
        ("dead_consumer_idle_s", 0), ("output_max_age_s", 0), ("output_max_len", 0),
    ) if getattr(s, name) < low]
    return problems + [f"{name} must be positive, got {getattr(s, name)}" for name in (
        "handler_timeout_s", "shutdown_grace_s", "socket_timeout_s", "crash_loop_window_s", "sample_interval_s",
    ) if not getattr(s, name) > 0]


def _hazards(s: Settings) -> list[str]:
    problems = []
    if s.handler_timeout_s * 1000 * TIMEOUT_OVERSHOOT >= s.claim_idle_ms:
        problems.append(
            f"handler_timeout_s ({s.handler_timeout_s:g}) must be shorter than claim_idle_ms ({s.claim_idle_ms}) "
            f"/ {TIMEOUT_OVERSHOOT:g}: a call may run {TIMEOUT_OVERSHOOT:g}x its timeout before it is cancelled, and "
            "live work would be claimed by other consumers while it still runs")
    if s.socket_timeout_s * 1000 < s.block_ms + SOCKET_TIMEOUT_MARGIN_MS:
        problems.append(
            f"socket_timeout_s ({s.socket_timeout_s:g}) must exceed block_ms ({s.block_ms}) by at least "
            f"{SOCKET_TIMEOUT_MARGIN_MS} ms: a blocking read would time out and be retried forever")
    if s.http_port > 65535:
        problems.append(f"http_port must be at most 65535, got {s.http_port}")
    if s.consumers and s.consumers < s.processes:
        problems.append(f"consumers ({s.consumers}) must be 0 or at least processes ({s.processes})")
    if not s.dead_letter_suffix:
        problems.append("dead_letter_suffix must not be empty: dead letters would go back to their own stream")
    if s.output_streams and not s.trim_interval_s:
        problems.append("output_streams needs trim_interval_s above 0: housekeeping trims them, and it is off")
    if s.output_streams and not (s.output_max_age_s or s.output_max_len):
        problems.append("output_streams needs output_max_age_s or output_max_len above 0: with neither, nothing "
                        "says which results to keep")
    return problems


def _format_problems(s: Settings) -> list[str]:
    problems = []
    if s.group_start_id not in ("0", "$"):
        problems.append(f"group_start_id must be 0 or $, got {s.group_start_id!r}")
    if not s.consumer_prefix or any(c.isspace() for c in s.consumer_prefix):
        problems.append(f"consumer_prefix must be a non-empty word, got {s.consumer_prefix!r}")
    problems += logging_problems(s.log_level, s.log_format)
    url_problem = _url_problem(s.redis_url)
    return [*problems, url_problem] if url_problem else problems


def logging_problems(level: str, fmt: str) -> list[str]:
    problems = []
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    if fmt not in ("text", "json"):
        problems.append(f"log_format must be text or json, got {fmt!r}")
    return problems


def environ_value(field_name: str) -> str | None:
    """A setting's environment variable, if set: for what must be known before the settings are resolved."""
    return os.environ.get(env_name(field_name)) or None


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        return f"redis_url {redact_url(url)!r} is malformed: {exc}"
    if parts.scheme not in REDIS_SCHEMES:
        return f"redis_url {redact_url(url)!r} must start with redis://, rediss:// or unix://"
    if parts.scheme != "unix" and not parts.hostname:
        return f"redis_url {redact_url(url)!r} has no host"
    db = parts.path.lstrip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        return f"redis_url {redact_url(url)!r}: database must be a number, got {db!r}"
    for ca_file in parse_qs(parts.query).get("ssl_ca_certs", []):
        if not os.path.isfile(ca_file):
            return f"redis_url {redact_url(url)!r}: the CA file ssl_ca_certs={ca_file} does not exist"
    return None


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, safe to log and print."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<malformed URL>"


def fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Settings)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def url_from_app_env(environ: Mapping[str, str]) -> str | None:
    """The app's connection variables as one URL: REDIS_URL wins, then REDIS_HOST and friends."""
    if environ.get("REDIS_URL"):
        return environ["REDIS_URL"]
    keys = ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB", "REDIS_USERNAME")
    if not any(environ.get(key) for key in keys):
        return None
    host = environ.get("REDIS_HOST") or "localhost"
    port = environ.get("REDIS_PORT") or "6379"
    db = environ.get("REDIS_DB") or "0"
    tls = environ.get("REDIS_TLS", "").lower() in ("1", "true", "yes") or environ.get(TLS_CA_ENV)
    scheme = "rediss" if tls else "redis"
    user = quote(environ.get("REDIS_USERNAME", ""), safe="")
    password = environ.get("REDIS_PASSWORD", "")
    auth = f"{user}:{quote(password, safe='')}@" if password else (f"{user}@" if user else "")
    return f"{scheme}://{auth}{host}:{port}/{db}"


def split_list(raw: str | Any) -> tuple[str, ...]:
    """A list setting's value: comma-separated text (or any iterable of names), blanks and repeats dropped."""
    items = raw.split(",") if isinstance(raw, str) else raw
    return tuple(dict.fromkeys(item.strip() for item in items if item.strip()))


def parse_value(field: dataclasses.Field[Any], raw: str, source: str) -> Any:
    """Convert one textual value to the field's type, or say in one line what is wrong with it."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if kind.startswith("tuple["):
        return split_list(raw)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{source}: expected {'an integer' if kind == 'int' else 'a number'}, "
                          f"got {raw!r}") from None
    return raw


def load_settings(
    flags: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> tuple[Settings, dict[str, str]]:
    """Resolve every setting from flags (by field name, as text), the environment and the defaults.

    Returns the settings and, per field, where its value came from: `flag`, `env:NAME`, `code` or `default`.
    """
    environ = os.environ if environ is None else environ
    flags = flags or {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field in fields():
        name = field.name
        if name in overrides:
            values[name], sources[name] = overrides[name], "code"
        elif flags.get(name) is not None:
            values[name] = parse_value(field, flags[name], flag_name(name))
            sources[name] = "flag"
        elif environ.get(env_name(name)):
            values[name] = parse_value(field, environ[env_name(name)], env_name(name))
            sources[name] = f"env:{env_name(name)}"
        elif name == "redis_url" and (app_url := url_from_app_env(environ)):
            values[name] = app_url
            sources[name] = "env:REDIS_URL" if environ.get("REDIS_URL") else "env:REDIS_HOST..."
        else:
            sources[name] = "default"
    unknown = set(overrides) - {field.name for field in fields()}
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if environ.get(TLS_CA_ENV):
        default_url = next(field.default for field in fields() if field.name == "redis_url")
        values["redis_url"] = with_tls_ca(values.get("redis_url", default_url), environ[TLS_CA_ENV])
        sources["redis_url"] += f" + env:{TLS_CA_ENV}"
    return Settings(**values), sources


def with_tls_ca(url: str, ca_file: str) -> str:
    """`url` with `ca_file` as the CA its TLS connection trusts, unless the URL names a CA file itself."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        raise ConfigError(f"{TLS_CA_ENV} is set, but redis_url {redact_url(url)!r} does not use TLS: use rediss://, "
                          f"or REDIS_TLS=true with REDIS_HOST")
    if "ssl_ca_certs" in parse_qs(parts.query):
        return url
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=f"{query}ssl_ca_certs={quote(ca_file, safe='/')}"))
