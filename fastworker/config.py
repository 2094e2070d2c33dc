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
import difflib
import math
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

from fastworker.errors import ConfigError
from fastworker.policy import Backoff

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
    read_ahead: int = _field(4, help="the most batches (0 to 8) each consumer reads ahead while it handles one, "
                                    "when the stream has a backlog; the depth adapts to hide the round trip to the "
                                    "server, each batch holds up to --batch-size entries per stream (0: off)")
    claim_idle_ms: int = _field(60_000, help="entries pending this long with no verdict (their worker died or hung) "
                                "are claimed from any consumer")
    claim_interval_ms: int = _field(5_000, help="how often the reclaimer looks for idle pending entries")
    max_deliveries: int = _field(5, help="deliveries after which a failing entry goes to the dead-letter stream")
    retry_first_s: float = _field(1.0, help="a failed entry is retried after this many seconds the first time")
    retry_factor: float = _field(2.0, help="each later retry waits this many times longer")
    retry_max_s: float = _field(300.0, help="no retry waits longer than this many seconds (backoff cap)")
    retry_jitter: float = _field(0.1, help="retry delays vary by up to this fraction either way (0 to 0.99)")
    concurrency: int = _field(64, help="handler calls in flight at once, per worker process")
    handler_timeout_s: float = _field(30.0, help="a handler call running longer has failed (cancelled within 1.5x)")
    shutdown_grace_s: float = _field(30.0, help="time to finish in-flight work after SIGTERM before leaving it")
    socket_timeout_s: float = _field(10.0, help="socket timeout of every connection")
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
    output_streams: tuple[str, ...] = _field((), help="streams the handlers write results to, comma-separated "
                                             "(default none): the fleet's housekeeping trims them to the output "
                                             "limits")
    output_max_age_s: float = _field(86400.0, help="output streams keep nothing older than this (0: no age limit)")
    output_max_len: int = _field(0, help="output streams keep at most this many newest entries (0: no limit)")
    tracing: str = _field("auto", help="OpenTelemetry spans per handler call: auto (when the app configured a tracer "
                          "provider and fastworker[otel] is installed), on or off")

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

    def backoff(self) -> Backoff:
        """The fleet's default retry backoff, for handlers that declare none."""
        return Backoff(self.retry_first_s, self.retry_factor, self.retry_max_s, self.retry_jitter)

    def redacted_url(self) -> str:
        return redact_url(self.redis_url)


# How a problem names a setting: by its field name (settings built in code), or, inside load_settings(), by the
# flag or environment variable its value came from, so that an error speaks the words the user typed.
_naming: ContextVar[Callable[[str], str]] = ContextVar("naming", default=str)


def _n(name: str) -> str:
    return _naming.get()(name)


def _problems(s: Settings) -> list[str]:
    """Every way these settings are malformed or hazardous; empty when they are sound."""
    return _range_problems(s) or _hazards(s) + _format_problems(s)


# The range of each numeric setting on its own: checked when a flag is parsed, and again in Settings.
AT_LEAST = {"batch_size": 1, "block_ms": 1, "read_ahead": 0, "claim_idle_ms": 1, "claim_interval_ms": 1,
            "max_deliveries": 1, "concurrency": 1, "processes": 1, "consumers": 0, "crash_loop_restarts": 1,
            "gc_threshold": 0,
            "http_port": 0, "trim_interval_s": 0, "trim_retain_s": 0, "dead_consumer_idle_s": 0,
            "output_max_age_s": 0, "output_max_len": 0, "retry_first_s": 0, "retry_factor": 1, "retry_max_s": 0,
            "retry_jitter": 0}
POSITIVE = ("handler_timeout_s", "shutdown_grace_s", "socket_timeout_s", "crash_loop_window_s", "sample_interval_s")
AT_MOST = {"read_ahead": 8, "http_port": 65535, "retry_max_s": 86_400, "retry_jitter": 0.99}
CHOICES = {"log_level": ("DEBUG", "INFO", "WARNING", "ERROR"), "log_format": ("text", "json"),
           "group_start_id": ("0", "$"), "tracing": ("auto", "on", "off")}


def value_problem(name: str, value: Any) -> str | None:
    """What is wrong with one setting's value on its own (its range or choices), without its name; None when it
    is fine."""
    if name in CHOICES:
        choices = CHOICES[name]
        if (value.upper() if name == "log_level" else value) not in choices:
            return f"must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}"
        return None
    low = AT_LEAST.get(name)
    if low is not None and value < low:
        return f"must be at least {low}, got {value}" if low else f"must not be negative, got {value}"
    if name in POSITIVE and not value > 0:
        return f"must be positive, got {value}"
    if name in AT_MOST and value > AT_MOST[name]:
        return f"must be at most {AT_MOST[name]}, got {value}"
    return None


def _range_problems(s: Settings) -> list[str]:
    problems = [f"{_n(field.name)} {problem}" for field in fields()
                if field.name not in CHOICES and (problem := value_problem(field.name, getattr(s, field.name)))]
    if not problems and s.retry_first_s > s.retry_max_s:
        problems.append(f"{_n('retry_first_s')} ({s.retry_first_s:g}) must be at most {_n('retry_max_s')} "
                        f"({s.retry_max_s:g})")
    return problems


def _hazards(s: Settings) -> list[str]:
    problems = []
    if s.handler_timeout_s * 1000 * TIMEOUT_OVERSHOOT >= s.claim_idle_ms:
        problems.append(
            f"{_n('handler_timeout_s')} ({s.handler_timeout_s:g}) must be shorter than {_n('claim_idle_ms')} "
            f"({s.claim_idle_ms}) "
            f"/ {TIMEOUT_OVERSHOOT:g}: a call may run {TIMEOUT_OVERSHOOT:g}x its timeout before it is cancelled, and "
            "live work would be claimed by other consumers while it still runs")
    if s.socket_timeout_s * 1000 < s.block_ms + SOCKET_TIMEOUT_MARGIN_MS:
        problems.append(
            f"{_n('socket_timeout_s')} ({s.socket_timeout_s:g}) must exceed {_n('block_ms')} ({s.block_ms}) by at "
            f"least {SOCKET_TIMEOUT_MARGIN_MS} ms: a blocking read would time out and be retried forever")
    if s.consumers and s.consumers < s.processes:
        problems.append(f"{_n('consumers')} ({s.consumers}) must be 0 or at least {_n('processes')} ({s.processes})")
    if not s.dead_letter_suffix:
        problems.append(f"{_n('dead_letter_suffix')} must not be empty: dead letters would go back to their own stream")
    if s.output_streams and not s.trim_interval_s:
        problems.append(f"{_n('output_streams')} needs {_n('trim_interval_s')} above 0: housekeeping trims them, and "
                        "it is off")
    if s.output_streams and not (s.output_max_age_s or s.output_max_len):
        problems.append(f"{_n('output_streams')} needs {_n('output_max_age_s')} or {_n('output_max_len')} above 0: "
                        "with neither, nothing says which results to keep")
    return problems


def _format_problems(s: Settings) -> list[str]:
    problems = [f"{_n(name)} {problem}" for name in CHOICES if (problem := value_problem(name, getattr(s, name)))]
    if not s.consumer_prefix or any(c.isspace() for c in s.consumer_prefix):
        problems.append(f"{_n('consumer_prefix')} must be a non-empty word, got {s.consumer_prefix!r}")
    url_problem = _url_problem(s.redis_url)
    return [*problems, url_problem] if url_problem else problems


def logging_problems(level: str, fmt: str) -> list[str]:
    return [f"{_n(name)} {problem}" for name, value in (("log_level", level), ("log_format", fmt))
            if (problem := value_problem(name, value))]


def environ_value(field_name: str) -> str | None:
    """A setting's environment variable, if set: for what must be known before the settings are resolved."""
    return os.environ.get(env_name(field_name)) or None


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        return f"{_n('redis_url')} {redact_url(url)!r} is malformed: {exc}"
    if parts.scheme not in REDIS_SCHEMES:
        return f"{_n('redis_url')} {redact_url(url)!r} must start with redis://, rediss:// or unix://"
    if parts.scheme != "unix" and not parts.hostname:
        return f"{_n('redis_url')} {redact_url(url)!r} has no host"
    db = parts.path.lstrip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        return f"{_n('redis_url')} {redact_url(url)!r}: database must be a number, got {db!r}"
    for ca_file in parse_qs(parts.query).get("ssl_ca_certs", []):
        if not os.path.isfile(ca_file):
            return f"{_n('redis_url')} {redact_url(url)!r}: the CA file ssl_ca_certs={ca_file} does not exist"
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


APP_ENV = ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB", "REDIS_USERNAME")
# FASTWORKER_* variables that are not settings: the deploy files' app reference, the test server's binary, the
# dashboard's write token.
OTHER_ENV = ("FASTWORKER_APP", "FASTWORKER_SERVER_BIN", "FASTWORKER_DASHBOARD_TOKEN")


def url_from_app_env(environ: Mapping[str, str]) -> str | None:
    """The app's connection variables as one URL: REDIS_URL wins, then REDIS_HOST and friends."""
    if environ.get("REDIS_URL"):
        return environ["REDIS_URL"]
    if not any(environ.get(key) for key in APP_ENV):
        return None
    host = environ.get("REDIS_HOST") or "localhost"
    port = environ.get("REDIS_PORT") or "6379"
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"REDIS_PORT must be a port number (1 to 65535), got {port!r}")
    db = environ.get("REDIS_DB") or "0"
    if not db.isdigit():
        raise ConfigError(f"REDIS_DB must be a database number (0, 1, ...), got {db!r}")
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
    """Convert one textual value to the field's type, or say in one line (naming `source`) what is wrong."""
    try:
        return parse_text(field, raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_text(field: dataclasses.Field[Any], raw: str) -> Any:
    """One textual value as the field's type; ValueError saying what was expected, with the unit."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if kind.startswith("tuple["):
        return split_list(raw)
    unit = " of milliseconds" if field.name.endswith("_ms") else " of seconds" if field.name.endswith("_s") else ""
    try:
        if kind == "int":
            return int(raw)
        if kind == "float" and math.isfinite(value := float(raw)):
            return value
        if kind == "float":
            raise ValueError(raw)
    except ValueError:
        expected = f"a whole number{unit}" if kind == "int" else f"a number{unit}"
        raise ValueError(f"expected {expected}, got {raw!r}") from None
    return raw


def user_name(name: str, source: str) -> str:
    """The name a user knows a setting by: the environment variable its value came from, the field name when it
    was set in code, else its flag (a default is changed with the flag)."""
    if source.startswith("env:"):
        return source.removeprefix("env:").split(" + ")[0].replace(",", "/")
    return name if source == "code" else flag_name(name)


@contextmanager
def named(sources: Mapping[str, str]) -> Iterator[None]:
    """Within this block, problems name each setting by where its value came from (see `user_name`)."""
    token = _naming.set(lambda name: user_name(name, sources.get(name, "default")))
    try:
        yield
    finally:
        _naming.reset(token)


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per FASTWORKER_* variable that names no setting (a typo is otherwise silently ignored), with the
    closest real name when there is one."""
    environ = os.environ if environ is None else environ
    known = [env_name(field.name) for field in fields()] + list(OTHER_ENV)
    warnings = []
    for name in sorted(key for key in environ if key.startswith(ENV_PREFIX) and key not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"{name} is not a fastworker setting and is ignored{hint}")
    return warnings


def load_settings(
    flags: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> tuple[Settings, dict[str, str]]:
    """Resolve every setting from flags (by field name, as text), the environment and the defaults.

    Returns the settings and, per field, where its value came from: `flag`, `env:NAME`, `code` or `default`.
    A problem names each setting as the user set it: `--batch-size`, `FASTWORKER_BATCH_SIZE`, `REDIS_PORT`.
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
            sources[name] = "env:" + ("REDIS_URL" if environ.get("REDIS_URL") else
                                      ",".join(key for key in APP_ENV if environ.get(key)))
        else:
            sources[name] = "default"
    unknown = set(overrides) - {field.name for field in fields()}
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if environ.get(TLS_CA_ENV):
        default_url = next(field.default for field in fields() if field.name == "redis_url")
        values["redis_url"] = with_tls_ca(values.get("redis_url", default_url), environ[TLS_CA_ENV])
        sources["redis_url"] += f" + env:{TLS_CA_ENV}"
    with named(sources):
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
