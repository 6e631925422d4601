"""One report, three forms: the HTML page, Markdown, and JSON."""
from __future__ import annotations

import enum
import json
from typing import Any


class ReportFormat(str, enum.Enum):
    HTML = "html"
    MARKDOWN = "md"
    JSON = "json"


def render(report: dict[str, Any], form: ReportFormat) -> str:
    if form is ReportFormat.HTML:
        from listener.report.html import render_html

        return render_html(report)
    if form is ReportFormat.MARKDOWN:
        from listener.report.markdown import render_markdown

        return render_markdown(report)
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"
