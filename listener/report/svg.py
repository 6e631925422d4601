"""The report's charts as inline SVG, drawn here: no chart library, no script.

Each function returns SVG text whose every label went through
``html.escape``; the HTML template inserts it as is. Charts scale with the
page (a viewBox and ``width: 100%``), so they read on a phone and print.
"""
from __future__ import annotations

from html import escape
from typing import Any, Sequence

from listener.report.figures import OUTCOMES, Step

COLOURS = {"fired": "#2e7d32", "skipped": "#8d99a6", "late": "#ef8f00", "failed": "#c62828"}
INK = "#1f2933"
MUTED = "#616e7c"
GRID = "#d9dee3"
BAR = "#3d6fb6"
WIDTH = 480
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif"'


def _text(x: float, y: float, text: str, *, size: int = 12, anchor: str = "start",
          fill: str = INK, extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="{fill}"{extra}>{escape(text)}</text>')


def _svg(height: float, label: str, body: list[str]) -> str:
    return (f'<svg viewBox="0 0 {WIDTH} {height:.0f}" role="img" aria-label="{escape(label)}" '
            f'preserveAspectRatio="xMinYMin meet" {FONT}>'
            f'<title>{escape(label)}</title>' + "".join(body) + "</svg>")


def _empty(label: str) -> str:
    return _svg(60, label, [_text(WIDTH / 2, 35, "no actions in this window", anchor="middle",
                                  fill=MUTED)])


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def legend(y: float) -> list[str]:
    parts, x = [], 0.0
    for outcome in OUTCOMES:
        name = outcome.value
        parts.append(f'<rect x="{x:.1f}" y="{y - 10:.1f}" width="12" height="12" rx="2" '
                     f'fill="{COLOURS[name]}"/>')
        parts.append(_text(x + 17, y, name, size=12, fill=MUTED))
        x += 24 + 8 * len(name) + 12
    return parts


def outcomes_by_rule(rules: Sequence[dict[str, Any]]) -> str:
    """One stacked horizontal bar per rule: its actions by outcome, to a common scale."""
    label = "Actions by rule and outcome"
    if not rules:
        return _empty(label)
    label_width, count_width, row = 178.0, 52.0, 26.0
    bar_width = WIDTH - label_width - count_width
    top = 28.0
    most = max(r["total"] for r in rules) or 1
    body = legend(14)
    for index, rule in enumerate(rules):
        y = top + index * row
        name = f'{rule["rule"]}'
        body.append(_text(label_width - 8, y + 15, _short(name, 26), size=12, anchor="end",
                          extra=f' data-rule="{escape(name)}"'))
        x = label_width
        for outcome in OUTCOMES:
            count = rule["outcomes"][outcome.value]
            if not count:
                continue
            width = max(count / most * bar_width, 1.5)
            body.append(
                f'<rect x="{x:.2f}" y="{y + 3:.1f}" width="{width:.2f}" height="{row - 8:.1f}" '
                f'fill="{COLOURS[outcome.value]}"><title>{escape(name)} '
                f'({escape(rule["table"])}): {count} {outcome.value}</title></rect>')
            x += width
        body.append(_text(x + 6, y + 15, str(rule["total"]), size=12, fill=MUTED))
    return _svg(top + len(rules) * row + 4, label, body)


def bucket_labels(edges_ms: Sequence[int]) -> list[str]:
    """Bucket i holds [edges[i-1], edges[i]); bucket 0 is below the first edge."""
    def short(ms: int) -> str:
        for size, unit in ((3_600_000, "h"), (60_000, "m"), (1000, "s")):
            if ms >= size and ms % size == 0:
                return f"{ms // size}{unit}"
        return f"{ms}"
    return ["<0"] + [short(edge) for edge in edges_ms[:-1]] + [f"\u2265{short(edges_ms[-1])}"]


def lateness_histogram(edges_ms: Sequence[int], counts: Sequence[int]) -> str:
    """Actions per lateness bucket (fixed edges, from 0 ms up to an hour)."""
    label = "Lateness histogram"
    if not counts or not any(counts):
        return _empty(label)
    left, right, top, plot_height = 34.0, 6.0, 18.0, 150.0
    slot = (WIDTH - left - right) / len(counts)
    most = max(counts)
    labels = bucket_labels(edges_ms)
    body = [f'<line x1="{left}" y1="{top + plot_height}" x2="{WIDTH - right}" '
            f'y2="{top + plot_height}" stroke="{GRID}"/>',
            _text(left - 4, top + 4, str(most), size=10, anchor="end", fill=MUTED),
            _text(left - 4, top + plot_height, "0", size=10, anchor="end", fill=MUTED)]
    for index, count in enumerate(counts):
        x = left + index * slot
        if count:
            height = max(count / most * plot_height, 1.5)
            span = f"{labels[index]} ms" if index else "early (< 0 ms)"
            body.append(f'<rect x="{x + 2:.1f}" y="{top + plot_height - height:.1f}" '
                        f'width="{slot - 4:.1f}" height="{height:.1f}" fill="{BAR}">'
                        f'<title>from {escape(span)}: {count}</title></rect>')
            body.append(_text(x + slot / 2, top + plot_height - height - 3, str(count), size=9,
                              anchor="middle", fill=MUTED))
        body.append(_text(x + slot / 2, top + plot_height + 13, labels[index], size=9,
                          anchor="middle", fill=MUTED))
    body.append(_text(WIDTH / 2, top + plot_height + 30, "lateness from (ms unless marked)",
                      size=10, anchor="middle", fill=MUTED))
    return _svg(top + plot_height + 36, label, body)


def _slot_label(at: str, step: Step, first: bool) -> str:
    # at is ISO 8601 text from PostgreSQL: "2026-03-02T10:00:00+00:00"
    date, _, clock = at.partition("T")
    if step is Step.DAY:
        return date[5:10]
    hour = clock[:5]
    return f"{date[5:10]} {hour}" if first or hour == "00:00" else hour


def actions_over_time(timeline: Sequence[dict[str, Any]], step: Step) -> str:
    """Actions per hour or per day, stacked by outcome."""
    label = f"Actions per {step.value}"
    totals = [sum(int(slot.get(o.value) or 0) for o in OUTCOMES) for slot in timeline]
    if not timeline or not any(totals):
        return _empty(label)
    left, right, top, plot_height = 34.0, 6.0, 26.0, 140.0
    slot_width = (WIDTH - left - right) / len(timeline)
    most = max(totals)
    every = max(1, round(len(timeline) / 6))
    body = legend(12)
    body += [f'<line x1="{left}" y1="{top + plot_height}" x2="{WIDTH - right}" '
             f'y2="{top + plot_height}" stroke="{GRID}"/>',
             f'<line x1="{left}" y1="{top}" x2="{WIDTH - right}" y2="{top}" stroke="{GRID}" '
             f'stroke-dasharray="3 3"/>',
             _text(left - 4, top + 4, str(most), size=10, anchor="end", fill=MUTED),
             _text(left - 4, top + plot_height, "0", size=10, anchor="end", fill=MUTED)]
    gap = 1.0 if slot_width > 4 else 0.0
    for index, slot in enumerate(timeline):
        x = left + index * slot_width
        y = top + plot_height
        for outcome in OUTCOMES:
            count = int(slot.get(outcome.value) or 0)
            if not count:
                continue
            height = count / most * plot_height
            y -= height
            body.append(f'<rect x="{x + gap / 2:.2f}" y="{y:.2f}" '
                        f'width="{max(slot_width - gap, 0.5):.2f}" height="{height:.2f}" '
                        f'fill="{COLOURS[outcome.value]}"><title>{escape(str(slot["at"]))}: '
                        f'{count} {outcome.value}</title></rect>')
        if index % every == 0:
            body.append(_text(x + slot_width / 2, top + plot_height + 14,
                              _slot_label(str(slot["at"]), step, index == 0), size=9,
                              anchor="middle", fill=MUTED))
    return _svg(top + plot_height + 22, label, body)
