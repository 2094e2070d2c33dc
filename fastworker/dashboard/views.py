"""What the templates show, computed without I/O: consumer roles, truncated previews, pretty payloads, charts.

Everything here returns plain text or numbers; the templates escape it (Jinja autoescape). Nothing here builds
markup from a server value: the chart is numbers in an SVG the template draws.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable

from fastworker.dashboard.sampler import Counters, History
from fastworker.ops.deadletters import DeadLetter
from fastworker.ops.inspect import ConsumerInfo, text
from fastworker.settlement import RETRY_CONSUMER

CLAIM_SUFFIX = ".claim"  # the reclaimer's consumer is `<first consumer name>.claim` (worker.py)
PREVIEW_CHARS = 160  # a value in a list
DETAIL_CHARS = 256 * 1024  # a value in one letter's view
CHART_WIDTH, CHART_HEIGHT = 320, 64
MIN_SPAN_MS = 10_000  # the shortest time a chart spans


def consumer_role(consumer: ConsumerInfo) -> str:
    """What a consumer is, in a few words, for the label beside its name ("" for a plain worker consumer)."""
    if consumer.name == RETRY_CONSUMER:
        return "retries: entries waiting for their next attempt"
    if consumer.name.endswith(CLAIM_SUFFIX):
        return "reclaimer: entries taken from crashed consumers"
    if consumer.dead:
        return "dead: nothing pending, idle too long"
    return ""


def clip(value: str, limit: int = PREVIEW_CHARS) -> str:
    """`value` cut to `limit` characters, saying how much was left out."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}… ({len(value) - limit:,} more characters)"


def one_line(value: str, limit: int = PREVIEW_CHARS) -> str:
    return clip(" ".join(value.split()), limit)


def fields_preview(letter: DeadLetter, limit: int = PREVIEW_CHARS) -> str:
    """The original fields as `name=value` pairs on one line, cut to `limit`."""
    if not letter.original:
        return "(no fields: the entry was deleted before it was handled)"
    pairs = (f"{text(name)}={text(value)}" for name, value in letter.original.items())
    return one_line(" ".join(pairs), limit)


def pretty(value: str) -> tuple[str, bool]:
    """(the value, pretty-printed when it is a JSON object or array; whether it was), cut to DETAIL_CHARS."""
    try:
        document = json.loads(value)
    except ValueError:
        return clip(value, DETAIL_CHARS), False
    if not isinstance(document, dict | list):
        return clip(value, DETAIL_CHARS), False
    return clip(json.dumps(document, indent=2, ensure_ascii=False), DETAIL_CHARS), True


def letter_fields(letter: DeadLetter) -> list[tuple[str, str, bool]]:
    """(name, value, is JSON) of each original field, for one letter's view."""
    return [(text(name), *pretty(text(value))) for name, value in letter.original.items()]


def letter_facts(letter: DeadLetter) -> list[tuple[str, str]]:
    """The `fw:*` facts other than the error and its traceback (shown on their own), sorted by name."""
    return sorted((name, clip(value, DETAIL_CHARS)) for name, value in letter.meta.items()
                  if name not in ("error", "traceback"))


def utc(ms: int | None) -> str:
    """A server timestamp in milliseconds as UTC, to the second."""
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    if rate >= 100:
        return f"{rate:,.0f}/s"
    return f"{rate:.1f}/s"


# --- charts -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Line:
    label: str
    kind: str  # "added" or "acked": the CSS class that colours it
    polylines: list[str]  # SVG `points` strings; a gap (an unknown rate) starts a new one
    now: str  # the latest rate, formatted


@dataclasses.dataclass(frozen=True)
class Chart:
    width: int
    height: int
    top: str  # the rate at the top of the chart
    span: str  # how far back it goes: the history there is, up to the window
    lines: list[Line]
    empty: bool  # fewer than two samples yet


def format_span(ms: int) -> str:
    return f"{round(ms / 60_000)} min" if ms >= 60_000 else f"{ms // 1000} s"


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^n that is at least `value` (and at least 1)."""
    if value <= 1:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        candidate = step * 10.0 ** exponent
        if candidate >= value:
            return candidate
    return 10.0 ** (exponent + 1)  # pragma: no cover - the loop always returns


def _polylines(points: Iterable[tuple[int, float | None]], start_ms: int, window_ms: int, top: float) -> list[str]:
    runs: list[list[str]] = [[]]
    for at_ms, rate in points:
        if rate is None:
            runs.append([])
            continue
        x = (at_ms - start_ms) / window_ms * CHART_WIDTH
        y = CHART_HEIGHT - rate / top * (CHART_HEIGHT - 2) - 1
        runs[-1].append(f"{max(0.0, x):.1f},{y:.1f}")
    return [" ".join(run) for run in runs if len(run) > 1]


def chart(history: History, now_ms: int, lines: list[tuple[str, str, Callable[[Counters], int | None]]]) -> Chart:
    """A chart of the history's last window: one line per (label, kind, counter picked from each sample)."""
    series = [(label, kind, history.series(pick), history.rate_now(pick)) for label, kind, pick in lines]
    highest = max((rate for *_, points, _ in series for _, rate in points if rate is not None), default=0.0)
    top = nice_ceiling(highest)
    # A young history fills the chart rather than a sliver at its right end.
    oldest_ms = history.samples[0].at_ms if history.samples else now_ms
    span_ms = min(history.window_ms, max(MIN_SPAN_MS, now_ms - oldest_ms))
    drawn = [Line(label, kind, _polylines(points, now_ms - span_ms, span_ms, top), format_rate(now))
             for label, kind, points, now in series]
    return Chart(CHART_WIDTH, CHART_HEIGHT, format_rate(top), format_span(span_ms), drawn, len(history.samples) < 2)


def stream_chart(history: History, now_ms: int, stream: str, groups: list[str]) -> Chart:
    """Entries added to `stream` and acknowledged by each of its groups, per second."""
    lines: list[tuple[str, str, Callable[[Counters], int | None]]] = [
        ("added", "added", lambda c: c.added.get(stream))]
    lines += [(f"acked by {group}", "acked", _acked(stream, group)) for group in groups]
    return chart(history, now_ms, lines)


def _acked(stream: str, group: str) -> Callable[[Counters], int | None]:
    return lambda c: c.acked.get((stream, group))

