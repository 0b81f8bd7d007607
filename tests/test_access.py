"""The trust model: only the daemon's user (and root) by default, exactly the
granted users with exactly their right once --allow-uid/--allow-gid name
them, on every path (socket, mount, segment files and stripes, index,
arena, location directory, journal, generation, lock, metrics, the offline
tools), and a clean refusal each time while the daemon serves everyone else.

The integration test runs a real daemon (as root, with a mount and metrics)
and tries every path from processes that became other users
(tests/access_probe.py). It needs root to become them: CI runs as root."""
import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kvfs import protocol as P
from kvfsd.access import OP_RIGHT, Grant, Policy, Right, parse_grant
from kvfsd.fileperms import (GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ, FilePerms, Kind, acl_xattr,
                             granted_perm, parse_acl_xattr)
from kvfsd.testing import DaemonProcess

PROBE = Path(__file__).with_name("access_probe.py")
OTHER_UID, READER, WRITER, ADMIN_MEMBER, ADMIN_GROUP = 20001, 20002, 20003, 20004, 20010


# -- the policy itself (pure) -------------------------------------------------
def test_every_op_has_a_right_and_rights_are_levels():
    assert set(OP_RIGHT) == set(P.OPS)
    assert OP_RIGHT[P.LOOKUP] == Right.READ and OP_RIGHT[P.ALLOC] == Right.WRITE
    assert OP_RIGHT[P.DELETE] == OP_RIGHT[P.EVICT] == OP_RIGHT[P.COMPACT] == OP_RIGHT[P.VERIFY] == Right.ADMIN
    assert Right.READ < Right.WRITE < Right.ADMIN


def test_policy_grants():
    pol = Policy.of(1000, ["2000:read", "2001", "2002:admin", "2000:write"], ["3000:read"])
    assert pol.shared
    assert pol.right_of(1000) == Right.ADMIN and pol.right_of(0) == Right.ADMIN  # owner and root
    assert pol.right_of(2000) == Right.WRITE  # the highest grant of a uid wins
    assert pol.right_of(2001) == Right.WRITE  # no right given: write
    assert pol.right_of(2002) == Right.ADMIN
    assert pol.right_of(4000) is None
    assert pol.right_of(4000, [5, 3000]) == Right.READ  # any group, primary or not
    assert pol.right_of(2000, [3000]) == Right.WRITE  # the best of uid and groups
    assert not Policy.of(1000).shared and Policy.of(1000).right_of(2000) is None
    assert pol.refusal(Right.WRITE, Right.READ, "x", "y") is None
    err = pol.refusal(Right.READ, Right.ADMIN, "delete", "uid 2000")
    assert err is not None and "delete needs the admin right" in str(err) and "--allow-uid UID:admin" in str(err)
    assert "not admitted" in str(pol.refusal(None, Right.READ, "lookup", "uid 9"))


def test_grant_parsing():
    assert parse_grant("12:admin", "uid") == Grant(12, Right.ADMIN)
    assert parse_grant("root", "uid") == Grant(0, Right.WRITE)
    assert parse_grant("root:read", "gid") == Grant(0, Right.READ)
    assert parse_grant("7:", "uid") == Grant(7, Right.WRITE)
    for bad in ("12:all", "no-such-user-kvfs"):
        with pytest.raises(ValueError):
            parse_grant(bad, "uid")


def test_acl_encoding():
    raw = acl_xattr(6, {20: 4, 10: 6}, {30: 4})
    assert parse_acl_xattr(raw) == [(USER_OBJ, 6, 0xFFFFFFFF), (USER, 6, 10), (USER, 4, 20),
                                    (GROUP_OBJ, 0, 0xFFFFFFFF), (GROUP, 4, 30), (MASK, 6, 0xFFFFFFFF),
                                    (OTHER, 0, 0xFFFFFFFF)]
    assert granted_perm(Kind.DATA, Right.READ) == 4 and granted_perm(Kind.DATA, Right.WRITE) == 6
    assert granted_perm(Kind.TRAVERSE, Right.ADMIN) == 1 and granted_perm(Kind.PRIVATE, Right.ADMIN) == 0
    assert FilePerms(Policy.of(1, ["2"])).acl_for(Kind.PRIVATE, False) is None
    assert FilePerms(Policy.of(1)).acl_for(Kind.DATA, False) is None


def test_acls_apply_and_revoke(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    f.chmod(0o644)
    FilePerms(Policy.of(os.getuid(), ["54321:read"])).apply(f, Kind.DATA)
    entries = parse_acl_xattr(os.getxattr(f, "system.posix_acl_access"))
    assert (USER, 4, 54321) in entries and (OTHER, 0, 0xFFFFFFFF) in entries
    assert f.stat().st_mode & 0o077 == 0o040  # group bits show the mask; nothing for others
    FilePerms(Policy.of(os.getuid())).apply(f, Kind.DATA)  # no grants any more: revoked
    with pytest.raises(OSError) as e:
        os.getxattr(f, "system.posix_acl_access")
    assert e.value.errno == errno.ENODATA
    assert f.stat().st_mode & 0o777 == 0o600


# -- every path, as other users ------------------------------------------------
ALL_CHECKS = ["socket", "right", "get", "get_t1", "stats", "put", "delete", "compact", "verify",
              "segment_r", "segment_w", "stripe_list", "root_list", "index", "index_lock", "settings", "lock",
              "journal", "arena_r", "arena_w", "directory_r", "directory_w", "generation_r", "generation_w",
              "mount_ls", "mount_stat", "mount_read", "mount_stats", "mount_xattr", "mount_access_r",
              "mount_create", "mount_mkdir", "mount_unlink", "metrics", "rebuild_index"]
CLIENT = ["right", "get", "get_t1", "stats", "put", "delete", "compact", "verify"]
PRIVATE = ["stripe_list", "root_list", "index", "index_lock", "settings", "lock", "journal", "directory_w",
           "generation_w"]
MOUNT = ["mount_ls", "mount_stat", "mount_read", "mount_stats", "mount_xattr", "mount_access_r",
         "mount_create", "mount_mkdir", "mount_unlink"]


def refused_everywhere() -> dict[str, str]:
    """What a user the daemon does not admit sees."""
    exp = {c: "EACCES" for c in ALL_CHECKS}
    exp["socket"] = "PermissionDenied"
    exp.update({c: "RuntimeError: no connection" for c in CLIENT})
    exp["mount_access_r"] = "denied"
    exp["metrics"] = "http 403"
    exp["rebuild_index"] = "PermissionDenied"  # judged by its line (see _judge)
    return exp


def expected(right: str) -> dict[str, str]:
    exp = {c: "ok" for c in ALL_CHECKS}
    exp.update({c: "EACCES" for c in PRIVATE})
    exp.update({"right": f"ok:{right}", "metrics": "ok:200", "rebuild_index": "PermissionDenied",
                "delete": "ok:1"})
    if right in ("read", "write"):
        exp.update({"delete": "PermissionDenied", "compact": "PermissionDenied", "verify": "PermissionDenied",
                    "mount_unlink": "EACCES"})
    if right == "read":
        exp.update({"put": "PermissionDenied", "segment_w": "EACCES", "arena_w": "EACCES",
                    "mount_create": "EACCES", "mount_mkdir": "EACCES"})
    return exp


def _judge(got: dict[str, str], exp: dict[str, str], who: str) -> None:
    rebuild = got.get("rebuild_index", "")
    if "rebuild_index" in exp:
        # one line, exit 2, a PermissionDenied that says whose store it is: never a traceback
        assert rebuild.startswith("exit 2: kvfs rebuild-index: PermissionDenied:") and "belongs to uid" in rebuild \
            and "lines)" not in rebuild, rebuild
        got = dict(got, rebuild_index="PermissionDenied")
    wrong = {c: (got.get(c), e) for c, e in exp.items() if got.get(c) != e}
    assert not wrong, f"{who}: (got, expected) {wrong}"
    for c in exp:
        if exp[c] == "PermissionDenied" and c != "rebuild_index":
            msg = got[c + ".message"]
            assert ("needs the" in msg and "right" in msg) or "may not connect" in msg, msg


@pytest.fixture
def open_dir():
    if os.getuid() != 0:
        pytest.skip("becoming other users needs root (CI runs as root)")
    pytest.importorskip("pyfuse3")  # CI has it; .ci/run checks it imports
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    d = Path(tempfile.mkdtemp(prefix="kvfs-access-"))
    d.chmod(0o711)  # others may pass through to the store; what is inside decides
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(paths: dict, uid: int, groups: list[int] = (), checks: list[str] = ALL_CHECKS) -> dict[str, str]:
    spec = {"uid": uid, "gid": uid, "groups": list(groups), "paths": paths, "checks": checks}
    r = subprocess.run([sys.executable, str(PROBE), json.dumps(spec)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _results(got: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in got.items() if not k.endswith(".message")}


def test_every_path_refuses_by_default_admits_exactly_the_grants_and_revokes(open_dir):
    from kvfsd.arena import arena_path

    root, mnt, port = open_dir / "s", open_dir / "mnt", _free_port()
    grants = ["--allow-uid", f"{READER}:read", "--allow-uid", str(WRITER), "--allow-gid", f"{ADMIN_GROUP}:admin"]
    base = ["--metrics-port", str(port)]
    value = os.urandom(3 << 20)
    d = DaemonProcess(root, stripes=2, shm_size="64M", mount=mnt, extra=base)
    a = arena_path(root.absolute())
    paths = {"socket": str(d.socket), "root": str(root), "mount": str(mnt), "ns": "shared", "key": "blk",
             "sha": hashlib.sha256(value).hexdigest(), "size": len(value), "metrics_port": port, "arena": str(a),
             "directory": str(a.with_suffix(".dir")), "journal": str(a.with_suffix(".journal")),
             "generation": str(root / "generation")}

    def seed(s, uids):
        for u in uids:
            s.put(f"victim-{u}", b"v", ns="shared")
            s.put(f"fvictim-{u}", b"f", ns="shared")
        s.flush()

    with d:  # 1. no grants: nobody but the daemon's user (and root)
        with d.connect() as s:
            s.put("blk", value, ns="shared")
            s.flush()
            ext = s.stat("blk", ns="shared").extents[0][0]
            seed(s, [OTHER_UID])
        paths.update(segment=ext, stripe=str(Path(ext).parent))
        _judge(_probe(paths, OTHER_UID), refused_everywhere(), "no grants, another user")
        with d.connect() as s:  # and the daemon served on
            assert s.get("blk", ns="shared") == value

    d.extra = base + grants  # 2. grants: exactly those users, each with its right
    with d:
        with d.connect() as s:
            seed(s, [READER, WRITER, ADMIN_MEMBER])
        for who, uid, groups, right in (("reader", READER, [], "read"), ("writer", WRITER, [], "write"),
                                        ("admin by group", ADMIN_MEMBER, [ADMIN_GROUP], "admin")):
            got = _probe(paths, uid, groups)
            _judge(got, expected(right), who)
        # after the others looked at it (the kernel caches entries for all users)
        _judge(_probe(paths, OTHER_UID), refused_everywhere(), "grants, a user not granted")
        with d.connect() as s:
            assert s.get("blk", ns="shared") == value
            assert s.get(f"put-{WRITER}", ns="shared") and s.get(f"fuse-{WRITER}", ns="shared") == b"x" * 5000
            assert s.contains([f"put-{READER}", f"fuse-{READER}"], ns="shared") == [False, False]
            assert s.contains([f"victim-{READER}", f"victim-{WRITER}", f"victim-{ADMIN_MEMBER}"], ns="shared") \
                == [True, True, False]
            new_seg = s.stat(f"put-{WRITER}", ns="shared").extents[0][0]  # a segment made under the grants
            assert s.stats()["access"]["uids"] == {str(READER): "read", str(WRITER): "write"}

    d.extra = base  # 3. grants removed: what they opened is closed again, new segments included
    with d:
        for seg in (ext, new_seg):
            got = _results(_probe(dict(paths, segment=seg), READER,
                                  checks=["socket", "segment_r", "mount_ls", "metrics"]))
            assert got == {"socket": "PermissionDenied", "segment_r": "EACCES", "mount_ls": "EACCES",
                           "metrics": "http 403"}, got

    # 4. the offline tools: an index rebuilt as the owner, and the old one kept, stay private
    r = subprocess.run([sys.executable, "-m", "kvfstools.cli", "rebuild-index", "--root", str(root), "--json"],
                       capture_output=True, text=True, check=True)
    old = json.loads(r.stdout)["old_index"]
    d.extra = base + grants
    with d:  # even with grants
        got = _results(_probe(dict(paths, old_index=old), READER, checks=["old_index", "index", "socket", "get"]))
        assert got == {"old_index": "EACCES", "index": "EACCES", "socket": "ok", "get": "ok"}, got
    d.remove_shm()
