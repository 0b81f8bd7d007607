"""What makes a change survive a power cut, in one place.

A write is durable after its file's fsync or fdatasync; a new or removed
name, after its directory's fsync (kvfsd.volatile_disk writes down the
rules, and the power-cut campaign tests them). Each helper here does the
second half of that: the daemon's files are only as durable as the
directories that name them.
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make ``path``'s entries (creations, removals, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file (or a directory) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkdir_durable(path: str | os.PathLike[str], mode: int = 0o777) -> None:
    """``mkdir -p``, each created directory's name made durable in its
    parent; ``path``'s own name too if it existed (someone may have just
    made it: a store whose root's name is lost is lost whole)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode)
        except FileExistsError:
            pass
        fsync_dir(d.parent)
    if not missing:
        fsync_dir(path.parent)


def replace_durable(tmp: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename a written ``tmp`` over ``dst`` so that a power cut leaves the
    old file or the whole new one: the data first, then the rename."""
    fsync_file(tmp)
    os.replace(tmp, dst)
    fsync_dir(Path(dst).parent)
