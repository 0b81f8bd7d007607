"""Progress of long admin commands: one line on stderr, redrawn in place,
shown only on a terminal (scripts and --json consumers get clean output)."""
from __future__ import annotations

import sys
from typing import Callable

from kvfs.sizes import format_size


def progress_bar(label: str) -> Callable[[int, int], None] | None:
    """``show(done, total)`` in bytes, or None when stderr is no terminal."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        print(f"\r{label} [{'#' * int(30 * frac):<30}] {format_size(done)} / {format_size(total)}",
              end="", file=sys.stderr)
        if done >= total:
            print(file=sys.stderr)
    return show


def progress_count(label: str) -> Callable[[str, int, int], None] | None:
    """``show(phase, done, _total)`` for work whose total is unknown (a
    count so far); ``done < 0`` ends the line. None when stderr is no terminal."""
    if not sys.stderr.isatty():
        return None

    def show(phase: str, done: int, _total: int) -> None:
        if done < 0:
            print(file=sys.stderr)
        else:
            print(f"\r{label} {done} {phase}", end="", file=sys.stderr)
    return show
