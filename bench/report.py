"""Render suites' tables to the terminal (rich) and to Markdown, and format figures for them."""

from __future__ import annotations

import math
from typing import cast

from rich.console import Console, JustifyMethod
from rich.table import Table as RichTable

from bench.suite import Table


def print_tables(tables: list[Table], console: Console | None = None) -> None:
    console = console or Console()
    for table in tables:
        rich_table = RichTable(title=table.title, title_justify="left", header_style="bold")
        justify = table.justify or ["left"] + ["right"] * (len(table.columns) - 1)
        for i, column in enumerate(table.columns):
            rich_table.add_column(column, justify=cast(JustifyMethod, justify[i]), no_wrap=i == 0)  # labels stay whole
        for row in table.rows:
            rich_table.add_row(*row)
        console.print(rich_table)
        for line in table.caption:
            console.print(f"  {line}", style="dim", highlight=False)
        console.print()


def markdown(tables: list[Table], heading: str, preamble: list[str]) -> str:
    lines = [f"# {heading}", "", *preamble, ""]
    for table in tables:
        lines += [f"## {table.title}", "", "| " + " | ".join(table.columns) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(table.columns) - 1)) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table.rows]
        lines += [""] + [f"- {line}" for line in table.caption] + [""]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with `digits` significant digits, or a dash when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1024
    return "-"


def fmt_ratio(value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None:
        return "-"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"
