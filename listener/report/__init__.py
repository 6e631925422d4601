"""The operations report: figures from the ledger, rendered as HTML, Markdown or JSON."""
from listener.report.figures import (ReportError, assemble, figures_over_rpc, figures_over_sql,
                                     window)
from listener.report.formats import ReportFormat, render

__all__ = ["ReportError", "ReportFormat", "assemble", "figures_over_rpc", "figures_over_sql",
           "render", "window"]
