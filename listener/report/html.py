"""The report as one self-contained HTML page.

Styles are inline, charts are inline SVG (listener.report.svg), there is no
script and no external URL: the file reads offline, in a mail attachment, on a
phone and on paper. Jinja2 autoescaping escapes every value that came from
the database; the charts escape their own labels.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

from listener.report import svg
from listener.report.figures import OUTCOMES, PERCENTILES, Step


def format_ms(value: Any) -> str:
    """A lateness for people: '0.4 ms', '12 ms', '1.25 s', '3.5 min'; '-' when none."""
    if value is None:
        return "\u2013"
    ms = float(value)
    if abs(ms) < 10:
        return f"{ms:.1f} ms"
    if abs(ms) < 1000:
        return f"{ms:.0f} ms"
    if abs(ms) < 60_000:
        return f"{ms / 1000:.2f} s"
    if abs(ms) < 3_600_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"


def format_when(value: Any) -> str:
    """PostgreSQL's ISO 8601 text shortened to 'YYYY-MM-DD HH:MM:SS' (UTC); '-' when none."""
    if not value:
        return "\u2013"
    text = str(value)
    date, sep, clock = text.partition("T")
    if not sep:
        return text
    return f"{date} {clock[:8]}"


def short_key(value: Any) -> Markup:
    """A long row key (a uuid) as its first 8 characters, the whole key on hover."""
    text = "" if value is None else str(value)
    if len(text) <= 12:
        return Markup("{}").format(text)
    return Markup('<span title="{}">{}\u2026</span>').format(text, text[:8])


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                                     trim_blocks=False, lstrip_blocks=False)
    environment.filters["ms"] = format_ms
    environment.filters["instant"] = format_when
    environment.filters["key"] = short_key
    text = resources.files("listener.report").joinpath("report.html.j2").read_text("utf-8")
    return environment.from_string(text)


def render_html(report: dict[str, Any]) -> str:
    charts = {
        "outcomes": svg.outcomes_by_rule(report["rules"]),
        "histogram": svg.lateness_histogram(report["histogram"]["edges_ms"],
                                            report["histogram"]["counts"]),
        "timeline": svg.actions_over_time(report["timeline"], Step(report["step"])),
    }
    action_findings = sum(1 for f in report["findings"] if f.get("severity") == "action")
    return _template().render(report=report, charts=charts, action_findings=action_findings,
                              outcomes=[o.value for o in OUTCOMES], percentiles=PERCENTILES)
