"""The web dashboard: a live view of streams, groups, consumers and worker processes, and dead-letter actions.

`fastworker dashboard` serves it against any server; `fastworker run APP --http-port P --dashboard` serves it from
the fleet's supervisor under `/dashboard/` on the same port. It needs the optional extra `fastworker[dashboard]`
(Starlette, uvicorn, Jinja2). Everything it reads or changes goes through `fastworker.ops`; this package renders
and guards: read-only unless started with a token, writes checked against cross-site requests, and every value
from the server escaped by the templates.
"""

from fastworker.dashboard.app import Dashboard, create_app

__all__ = ["Dashboard", "create_app"]
