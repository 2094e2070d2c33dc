"""Who may read the dashboard and who may change data through it: pure decisions over a request's facts.

- Reading: when the dashboard listens on a loopback address (the default), or is served by a fleet (whose HTTP
  port usually listens on every interface, for Prometheus), it answers only requests whose Host header names a
  loopback host, so that a web page cannot reach it through DNS rebinding; served by a fleet it also answers only
  clients connecting from a loopback address (use an SSH tunnel or `kubectl port-forward`).
- Writing (requeue, purge, replay) needs the token the dashboard was started with; without one it is read-only.
  The page's script sends the token in an `Authorization: Bearer` header. Cross-site requests are refused three
  ways: a browser cannot add that header to a cross-site request without a CORS preflight, which is never
  granted; an `Origin` that is not the dashboard's own, or a `Sec-Fetch-Site` other than same-origin, is refused;
  and the body must be JSON (a plain form cannot send it). No cookie is involved, so nothing is sent ambiently.
The token is compared in constant time.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
WRITE_HEADER = "authorization"


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1, an IPv4-mapped loopback address, and the loopback host names."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def host_name(host_header: str) -> str:
    """The host part of a Host header: `[::1]:8484` -> `::1`, `localhost:8484` -> `localhost`."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


@dataclasses.dataclass(frozen=True)
class Guard:
    token: str | None  # None: read-only
    loopback_hosts_only: bool  # listening on loopback (or served by a fleet): refuse other Host headers
    loopback_clients_only: bool  # served by a fleet: refuse clients that do not connect from loopback

    @property
    def writable(self) -> bool:
        return bool(self.token)

    def refuse_read(self, headers: Mapping[str, str], client_host: str | None) -> str | None:
        """Why this request may not even read (None: it may)."""
        if self.loopback_clients_only and not is_loopback(client_host):
            return ("the fleet's dashboard answers clients on this machine only: reach it through an SSH tunnel or "
                    "kubectl port-forward, or run `fastworker dashboard --host ...` elsewhere")
        if self.loopback_hosts_only and not is_loopback(host_name(headers.get("host", ""))):
            return "this dashboard listens on a loopback address and answers only requests for localhost"
        return None

    def refuse_write(self, headers: Mapping[str, str]) -> str | None:
        """Why this request may not change data (None: it may)."""
        if not self.token:
            return ("the dashboard is read-only: start it with --token or FASTWORKER_DASHBOARD_TOKEN to requeue, "
                    "purge or replay")
        origin = headers.get("origin")
        # Host and port only: behind a proxy that terminates TLS the page is https and this server sees http.
        if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
            return "cross-site request refused (its Origin is not this dashboard)"
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "cross-site request refused (Sec-Fetch-Site)"
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return "write requests must send JSON"
        scheme_name, _, presented = headers.get(WRITE_HEADER, "").partition(" ")
        if scheme_name.lower() != "bearer" or not hmac.compare_digest(presented.encode(), self.token.encode()):
            return "the token is missing or wrong"
        return None


SECURITY_HEADERS = {
    # No inline script or style at all: even a value that escaped escaping could not run.
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
