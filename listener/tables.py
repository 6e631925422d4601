"""Plain-text tables for the command line, the demo and the benchmarks."""
from __future__ import annotations

from typing import Sequence


def format_table(rows: Sequence[Sequence[str]], numbers_right: bool = False) -> str:
    """The first row is the header, underlined; columns padded to their widest cell.
    With `numbers_right`, every column but the first is right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = [cell.rjust(w) if numbers_right and i else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    lines = [line(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in rows[1:]]
    return "\n".join(lines)
