"""The dashboard served by a running fleet: under `/dashboard/` on the supervisor's `--http-port`.

`serve_on_fleet(supervisor, token)` registers a start-up hook; once the supervisor's monitor listens, the hook
mounts the dashboard on it (`Monitor.mounts`), answered through `bridge.serve_asgi` in the supervisor's event
loop. The dashboard samples the app's streams itself (the monitor's gauges are for /metrics) and shows the worker
processes from the supervisor's slots and their last reports: no Redis call for those.

Since that port usually listens on every interface (Prometheus scrapes it), the fleet's dashboard answers only
clients on the same machine: an operator reaches it through an SSH tunnel or `kubectl port-forward`.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.routing import Mount

from fastworker.dashboard.app import Dashboard, create_app
from fastworker.dashboard.bridge import serve_asgi

if TYPE_CHECKING:
    from fastworker.supervisor import Slot, Supervisor

logger = logging.getLogger(__name__)

MOUNT = "/dashboard"
INTERVAL_S = 2.0  # how often the fleet's dashboard samples (or every sample_interval_s, when that is shorter)


def serve_on_fleet(supervisor: Supervisor, token: str | None) -> None:
    """Serve the dashboard from `supervisor`'s HTTP port once it runs (its settings must have http_port set)."""

    async def mount(started: Supervisor) -> None:
        monitor = started.monitor
        assert monitor is not None, "the supervisor runs its hooks after its monitor started"
        dashboard = Dashboard(started.settings, stream_names=started.app.streams(), token=token,
                              fleet=SupervisorView(started), loopback_clients_only=True,
                              interval_s=min(INTERVAL_S, started.settings.sample_interval_s))
        app = Starlette(routes=[Mount(MOUNT, app=create_app(dashboard))])
        monitor.mounts[MOUNT] = functools.partial(serve_asgi, app)
        logger.info("serving the dashboard on http://127.0.0.1:%d%s/ (%s; loopback clients only)",
                    started.settings.http_port, MOUNT, "writes need the token" if token else "read-only")

    supervisor.on_started.append(mount)


class SupervisorView:
    """The fleet as the dashboard shows it: `Supervisor.inspect()` (what `fastworker inspect` shows: consumers,
    handlers, calls in flight, recent failures) with each process's counts by outcome, restarts and problems."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def workers(self) -> list[dict[str, Any]]:
        rows = self.supervisor.inspect()["workers"]
        slots = {slot.index: slot for slot in self.supervisor.slots}
        return [{**row, **slot_facts(slots[row["index"]])} for row in rows if row["index"] in slots]

    def handlers(self) -> list[dict[str, str]]:
        return [{"stream": h.stream, "group": h.group, "handler": h.name,
                 "kind": "batch" if h.batch else ("async" if h.is_async else "sync")}
                for h in self.supervisor.app.handlers]


def slot_facts(slot: Slot) -> dict[str, Any]:
    """What inspect() leaves out: the process's counts by outcome, its slot's restarts, and its problems."""
    stats = slot.stats or {}
    counts: dict[str, int] = {}
    for _stream, _group, outcome, value in stats.get("counts", ()):
        counts[outcome] = counts.get(outcome, 0) + value
    problems = [f"{loop}: {reason}" for loop, reason in sorted(stats.get("problems", {}).items())]
    return {"counts": counts, "restarts": slot.restarts, "problems": problems}
