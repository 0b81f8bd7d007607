"""`kvfs ls [NS] [--long] [--json]`: list namespaces, or the objects of one namespace."""
from __future__ import annotations

import argparse
import json
import time

from kvfs.sizes import format_size

from .cli import add_socket_arg
from .table import render


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ls", help="list namespaces, or the keys in NS (--long: size, tier, created)")
    add_socket_arg(p)
    p.add_argument("ns", nargs="?", help="namespace")
    p.add_argument("-l", "--long", action="store_true", help="with NS: size, tier and creation time of each object")
    p.add_argument("--json", action="store_true", help="print JSON (one list)")
    return p


def run(args: argparse.Namespace) -> int:
    import kvfs

    with kvfs.connect(args.socket) as store:
        if args.ns is None:
            names = store.namespaces()
            print(json.dumps(names) if args.json else "\n".join(names))
            return 0
        if not args.long:
            keys = list(store.keys(args.ns))
            print(json.dumps(keys) if args.json else "\n".join(keys))
            return 0
        objs = list(store.objects(args.ns))
    if args.json:
        print(json.dumps(objs))
    else:
        print(render(["key", "size", "tier", "created"],
                     [[o["key"], format_size(o["size"]), o["tier"],
                       time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["created"]))] for o in objs]))
    return 0
