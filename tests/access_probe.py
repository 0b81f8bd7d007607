"""Tries every path of a kvfs store as another user (tests/test_access.py).

    python access_probe.py SPEC_JSON

Started as root, it imports everything it will use, then becomes the uid,
gid and groups the spec names (so where the checkout lives does not
matter), runs the spec's checks and prints one JSON object: check -> what
happened ("ok", "ok:<value>", "EACCES", "PermissionDenied", "exit <n>:
<line>", or "<Error>: <message>").
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Callable

import kvfs
import kvfs.native  # noqa: F401 - loaded before the privileges go
from kvfstools import cli


def _open(path: str, flags: int) -> str:
    os.close(os.open(path, flags))
    return "ok"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return "ok"


def _metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return f"ok:{r.status}"
    except urllib.error.HTTPError as e:
        return f"http {e.code}"


def _cli(argv: list[str]) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    lines = err.getvalue().strip().splitlines()
    return f"exit {rc}: {lines[-1] if lines else ''}" + (f" ({len(lines)} lines)" if len(lines) > 1 else "")


def _digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def main() -> None:
    spec = json.loads(sys.argv[1])
    p = spec["paths"]
    me = spec["uid"]
    cli.build_parser()  # imports every command module now
    import kvfsd.rebuild  # noqa: F401 - and what rebuild-index imports
    if "metrics_port" in p:
        _metrics(p["metrics_port"])  # and what urllib imports on its first request (as root: answered)

    os.setgroups(spec.get("groups", []))
    os.setgid(spec["gid"])
    os.setuid(me)

    state: dict[str, Any] = {}

    def store() -> kvfs.Store:
        if "store" not in state:
            raise RuntimeError("no connection")
        return state["store"]

    def connect() -> str:
        state["store"] = kvfs.connect(p["socket"])
        return "ok"

    def get_t1() -> str:
        s = store()
        s.arena = None  # read the segment files themselves, as a client without T0 would
        return "ok" if _digest(s.get(p["key"], ns=p["ns"])) == p["sha"] else "WRONG BYTES"

    ns, key = p["ns"], p["key"]
    mnt_obj = os.path.join(p["mount"], ns, key)
    checks: dict[str, Callable[[], str]] = {
        "socket": connect,
        "right": lambda: f"ok:{store().right}",
        "get": lambda: "ok" if _digest(store().get(key, ns=ns)) == p["sha"] else "WRONG BYTES",
        "get_t1": get_t1,
        "stats": lambda: "ok" if store().stats()["objects"] >= 1 else "no objects",
        "put": lambda: "ok" if store().put(f"put-{me}", os.urandom(200_000), ns=ns) else "already there",
        "delete": lambda: f"ok:{store().delete([f'victim-{me}'], ns=ns)}",
        "compact": lambda: "ok" if "segments" in store().compact() else "?",
        "verify": lambda: "ok" if "broken_count" in store().verify_store() else "?",
        "segment_r": lambda: _open(p["segment"], os.O_RDONLY),
        "segment_w": lambda: _open(p["segment"], os.O_WRONLY),
        "stripe_list": lambda: f"ok:{len(os.listdir(p['stripe']))}",
        "root_list": lambda: f"ok:{len(os.listdir(p['root']))}",
        "index": lambda: _open(os.path.join(p["root"], "index", "data.mdb"), os.O_RDONLY),
        "index_lock": lambda: _open(os.path.join(p["root"], "index", "lock.mdb"), os.O_RDONLY),
        "settings": lambda: _open(os.path.join(p["root"], "kvfs.json"), os.O_RDONLY),
        "lock": lambda: _open(os.path.join(p["root"], "kvfs.lock"), os.O_RDONLY),
        "journal": lambda: _open(p["journal"], os.O_RDONLY),
        "arena_r": lambda: _open(p["arena"], os.O_RDONLY),
        "arena_w": lambda: _open(p["arena"], os.O_RDWR),
        "directory_r": lambda: _open(p["directory"], os.O_RDONLY),
        "directory_w": lambda: _open(p["directory"], os.O_RDWR),
        "generation_r": lambda: _open(p["generation"], os.O_RDONLY),
        "generation_w": lambda: _open(p["generation"], os.O_RDWR),
        "mount_ls": lambda: "ok" if key in os.listdir(os.path.join(p["mount"], ns)) else "missing",
        "mount_stat": lambda: "ok" if os.stat(mnt_obj).st_size == p["size"] else "wrong size",
        "mount_read": lambda: "ok" if _digest(_read(mnt_obj)) == p["sha"] else "WRONG BYTES",
        "mount_stats": lambda: "ok" if "objects" in json.loads(_read(os.path.join(p["mount"], ".kvfs", "stats")))
        else "?",
        "mount_xattr": lambda: "ok" if os.getxattr(mnt_obj, "user.kvfs.checksum") else "?",
        "mount_access_r": lambda: "ok" if os.access(mnt_obj, os.R_OK) else "denied",
        "mount_create": lambda: _write(os.path.join(p["mount"], ns, f"fuse-{me}"), b"x" * 5000),
        "mount_mkdir": lambda: (os.mkdir(os.path.join(p["mount"], f"ns-{me}")), "ok")[1],
        "mount_unlink": lambda: (os.unlink(os.path.join(p["mount"], ns, f"fvictim-{me}")), "ok")[1],
        "metrics": lambda: _metrics(p["metrics_port"]),
        "rebuild_index": lambda: _cli(["rebuild-index", "--root", p["root"]]),
        "old_index": lambda: f"ok:{len(os.listdir(p['old_index']))}",
    }
    out: dict[str, str] = {}
    for name in spec["checks"]:
        try:
            out[name] = checks[name]()
        except kvfs.PermissionDenied as e:
            out[name] = "PermissionDenied"
            out[name + ".message"] = str(e)
        except PermissionError:
            out[name] = "EACCES"
        except Exception as e:  # noqa: BLE001 - reported, judged by the test
            out[name] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
