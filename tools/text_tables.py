"""Read back the plain-text tables `kvfstools.table.render` prints.

The README's headline tables and the charts in docs/ are drawn from the
benchmark blocks `make bench-readme` wrote, so they can never disagree with
them. A table is a header line, a line of dash runs (one run per column,
which gives every column's span: render pads each cell to its column's
width) and its rows, up to the first blank or unaligned line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


class TableError(LookupError):
    """A block has no table, row or column the caller named: the benchmark's output changed."""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]

    def col(self, name: str) -> int:
        try:
            return self.headers.index(name)
        except ValueError:
            raise TableError(f"no column {name!r} in {self.headers}") from None


_DASHES = re.compile(r"-+")


def tables(text: str) -> list[Table]:
    lines = text.split("\n")
    out = []
    for i in range(1, len(lines)):
        rule = lines[i]
        if not rule.strip() or set(rule) - {"-", " "}:
            continue
        spans = [(m.start(), m.end()) for m in _DASHES.finditer(rule)]
        # the last column runs to the end of the line (render strips trailing blanks, never widens)
        spans[-1] = (spans[-1][0], None)  # type: ignore[assignment]
        def cells(line: str) -> list[str]:
            return [line[a:b].strip() for a, b in spans]
        rows = []
        for line in lines[i + 1:]:
            if not line.strip() or line.startswith("#"):
                break
            rows.append(cells(line))
        out.append(Table(cells(lines[i - 1]), rows))
    return out


def table_named(text: str, first: str) -> Table:
    """The table whose first column is headed ``first``."""
    for t in tables(text):
        if t.headers[0] == first:
            return t
    raise TableError(f"no table {first!r}")


def first_header(text: str) -> str:
    """The first column's heading of the first table (a block's row labels)."""
    found = tables(text)
    if not found:
        raise TableError("no table")
    return found[0].headers[0]


def find_row(text: str, col: str, where: dict[str, str]) -> tuple[Table, list[str]]:
    """The first row, of the first table with column ``col`` and every
    column of ``where``, whose cells equal ``where``'s values."""
    for t in tables(text):
        if col not in t.headers or any(k not in t.headers for k in where):
            continue
        for row in t.rows:
            if all(row[t.col(k)] == v for k, v in where.items()):
                return t, row
    raise TableError(f"no row {where} with a column {col!r}")


def cell(text: str, col: str, where: dict[str, str]) -> str:
    t, row = find_row(text, col, where)
    return row[t.col(col)]


def number(text: str, col: str, where: dict[str, str]) -> float:
    """A cell's leading number ("16.45 (1.00)" is 16.45)."""
    c = cell(text, col, where)
    m = re.match(r"-?\d+(\.\d+)?", c)
    if not m:
        raise TableError(f"{col!r} of {where} is {c!r}, not a number")
    return float(m.group(0))
