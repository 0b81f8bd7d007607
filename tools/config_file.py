"""The daemon's configuration files (TOML), layered under its flags.

A file's keys are the daemon's flags without their dashes (``shm-size =
"4G"``, ``stripe = ["/nvme0/kvfs", "/nvme1/kvfs"]``, ``durability =
"sync"``); a repeatable flag takes a list. Where a value comes from, the
later wins:

    the flag's default
    /etc/kvfs/kvfs.toml            the node's file, if present ($KVFS_SYSTEM_CONFIG names another)
    <root>/kvfs.toml               the store's file, if present (it cannot set root)
    --config FILE                  the file named on the command line (it must exist)
    the command line's flags

The root itself (where the store's file is) comes from ``--root``, else
``$KVFS_ROOT``, else ``--config``'s file, else the node's file, else
``~/.kvfs``. An unknown key, a value of the wrong type or one the flag
refuses is one error naming the key and the file (InvalidArgument).
``kvfs config --show`` prints what the daemon would run with, and where
each value came from.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kvfs.errors import InvalidArgument

# the node's file; $KVFS_SYSTEM_CONFIG names another (a container's, a test's)
SYSTEM = Path(os.environ.get("KVFS_SYSTEM_CONFIG", "/etc/kvfs/kvfs.toml"))
STORE_FILE = "kvfs.toml"
DEFAULT = "default"
COMMAND_LINE = "command line"
NOT_IN_FILES = {"config", "log_level"}  # flags that say how to read the rest, or how to log


class _Unset(list):  # type: ignore[type-arg]
    """What a flag not on the command line holds while the command line is
    parsed alone (a list, so repeatable flags can append to it)."""


def _tomllib() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    from kvfs.optional import need
    return need("tomli")  # pragma: no cover - Python 3.10


def _actions(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags a file may set, by their key (the flag without dashes)."""
    out = {}
    for a in p._actions:
        if a.option_strings and a.dest not in NOT_IN_FILES and a.dest != "help":
            out[a.option_strings[0].lstrip("-")] = a
    return out


def explicit(p: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests the command line sets itself."""
    blank = argparse.Namespace(**{a.dest: _Unset() for a in p._actions if a.dest != "help"})
    ns, _ = p.parse_known_args(argv, namespace=blank)
    return {d for d, v in vars(ns).items() if not (isinstance(v, _Unset) and not v)}


def read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return dict(_tomllib().load(f))
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read it ({e.strerror})") from None
    except ValueError as e:  # tomllib.TOMLDecodeError
        raise InvalidArgument(f"{path}: not valid TOML ({e})") from None


def _value(a: argparse.Action, key: str, v: Any, path: Path) -> Any:
    """A file's value for flag ``a``, as the command line would give it."""
    where = f"{path}: {key}"
    if isinstance(a, argparse._AppendAction):
        items = v if isinstance(v, list) else [v]
        return [_value_one(a, where, x) for x in items]
    return _value_one(a, where, v)


def _value_one(a: argparse.Action, where: str, v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise InvalidArgument(f"{where}: a string or a number, not {type(v).__name__} {v!r}")
    text = str(v)
    try:
        out = a.type(text) if callable(a.type) else text
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise InvalidArgument(f"{where}: {e}") from None
    if a.choices is not None and out not in a.choices:
        raise InvalidArgument(f"{where}: one of {', '.join(map(str, a.choices))}, not {v!r}")
    return out


def root_of(cli: argparse.Namespace, given: set[str], files: list[tuple[Path, dict[str, Any]]]) -> tuple[Path, str]:
    """The store's root, and where it came from."""
    if "root" in given and cli.root:
        return Path(cli.root), COMMAND_LINE
    if os.environ.get("KVFS_ROOT"):
        return Path(os.environ["KVFS_ROOT"]), "$KVFS_ROOT"
    for path, data in reversed(files):  # --config's, then the node's
        if "root" in data:
            return Path(str(data["root"])).expanduser(), str(path)
    return Path.home() / ".kvfs", DEFAULT


def resolve(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    """The daemon's arguments with the files under the command line, and
    where each came from (dest -> "default", a file's path, or "command line")."""
    args = p.parse_args(argv)
    given = explicit(p, argv)
    actions = _actions(p)
    files: list[tuple[Path, dict[str, Any]]] = []
    named: list[tuple[Path, dict[str, Any]]] = []
    if getattr(args, "config", None):
        path = Path(args.config).expanduser()
        if not path.exists():
            raise InvalidArgument(f"--config {path}: no such file")
        named.append((path, read(path)))
    if SYSTEM.exists() and not (named and named[0][0].resolve() == SYSTEM.resolve()):
        files.append((SYSTEM, read(SYSTEM)))
    root, root_from = root_of(args, given, files + named)
    store = root / STORE_FILE
    if store.exists():
        data = read(store)
        if "root" in data:
            raise InvalidArgument(f"{store}: root: the store's own file cannot move the store")
        files.append((store, data))
    files += named
    source = {a.dest: DEFAULT for a in actions.values()}
    for path, data in files:
        for key, v in data.items():
            a = actions.get(key)
            if a is None:
                near = key.replace("_", "-")
                hint = f" (did you mean {near}?)" if near in actions else ""
                raise InvalidArgument(f"{path}: {key}: not a setting of kvfs daemon{hint}")
            if a.dest in given or a.dest == "root":
                continue  # the command line wins; the root is root_of's
            setattr(args, a.dest, _value(a, key, v, path))
            source[a.dest] = str(path)
    args.root = str(root)
    source["root"] = root_from
    for d in given:
        if d in source:
            source[d] = COMMAND_LINE
    return args, source


def daemon_settings(args: argparse.Namespace, command: str, own: tuple[str, ...] = ()
                    ) -> tuple[argparse.Namespace, dict[str, str]]:
    """``resolve`` for `kvfs COMMAND [daemon flags]` (daemon, config,
    doctor): the command line after COMMAND, less the command's own flags."""
    from .cmd_daemon import DAEMON_PARSER

    argv: list[str] = args._argv
    return resolve(DAEMON_PARSER[0], [a for a in argv[argv.index(command) + 1:] if a not in own])


def describe(p: argparse.ArgumentParser, args: argparse.Namespace, source: dict[str, str]) -> list[dict[str, Any]]:
    """Every setting: its key, effective value and source (kvfs config --show)."""
    rows = []
    for key, a in _actions(p).items():
        v = getattr(args, a.dest)
        rows.append({"key": key, "value": v, "from": source.get(a.dest, DEFAULT)})
    return rows
