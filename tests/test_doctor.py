"""`kvfs doctor`: what the node offers, checked without a daemon, each
finding with the command that fixes it; exit status 1 only when something
the configuration asks for is missing. Tested by hiding things: modules
made unimportable, a /dev/shm too small for the arena asked, a stripe on
tmpfs, a root open to everyone."""
import json
import os
import tempfile
from pathlib import Path

import pytest

from helpers import BOTH_MOUNTS, kvfs_without


def doctor(tmp_path, *flags, hidden=(), env=None):
    e = dict(os.environ, KVFS_SYSTEM_CONFIG="/nonexistent/kvfs.toml")
    e.pop("KVFS_ROOT", None)
    e.update(env or {})
    r = kvfs_without(list(hidden) or ["no_such_module_hidden"], "doctor", "--json", "--root",
                     str(tmp_path / "store"), *flags, env=e)
    assert r.returncode in (0, 1), (r.returncode, r.stdout, r.stderr)
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    for c in checks.values():
        assert c["status"] in ("ok", "degraded", "missing") and c["detail"], c
        assert c["status"] == "ok" or c["fix"] or c["name"].startswith("NIXL"), c  # what to do about it
    return r.returncode, checks


def test_every_check_answers_and_the_table_reads(tmp_path):
    rc, checks = doctor(tmp_path)
    names = set(checks)
    assert {"mount (FUSE)", "T0 arena (shared memory)", "huge pages for T0", "root and socket permissions",
            "CUDA (cupy)", "NIXL backends", "vllm (integration)", "lmcache (integration)",
            "nixl (integration)"} <= names
    assert any(n.startswith("stripe ") for n in names)
    assert rc == 0  # nothing asked for is missing on a machine that runs the tests
    r = kvfs_without(["no_such_module_hidden"], "doctor", "--root", str(tmp_path / "store"))
    assert "check" in r.stdout.splitlines()[0] and "mount (FUSE)" in r.stdout


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse on this machine")
def test_the_mount_missing_fails_only_when_asked_for(tmp_path):
    rc, checks = doctor(tmp_path, hidden=BOTH_MOUNTS)
    assert checks["mount (FUSE)"]["status"] == "missing" and not checks["mount (FUSE)"]["needed"] and rc == 0
    assert "libfuse3-dev" in checks["mount (FUSE)"]["fix"]
    rc, checks = doctor(tmp_path, "--mount", str(tmp_path / "mnt"), hidden=BOTH_MOUNTS)
    assert checks["mount (FUSE)"]["needed"] and rc == 1
    rc, checks = doctor(tmp_path, "--mount", str(tmp_path / "mnt"), hidden=["kvfsd._cfuse"])
    assert checks["mount (FUSE)"]["status"] == "degraded" and "pyfuse3" in checks["mount (FUSE)"]["detail"]
    assert rc == 0  # pyfuse3's mount still serves


def test_an_arena_larger_than_the_shm_dir_is_missing(tmp_path):
    rc, checks = doctor(tmp_path, "--shm-size", "100T")
    c = checks["T0 arena (shared memory)"]
    assert c["status"] == "missing" and c["needed"] and rc == 1 and "remount" in c["fix"]
    rc, checks = doctor(tmp_path, "--shm-size", "0")
    assert checks["T0 arena (shared memory)"]["status"] == "ok" and rc == 0


def test_a_stripe_on_tmpfs_is_degraded(tmp_path):
    stripe = Path(tempfile.mkdtemp(prefix="kvfs-doctor-", dir="/dev/shm"))
    try:
        rc, checks = doctor(tmp_path, "--stripe", str(stripe))
        c = checks[f"stripe {stripe}"]
        assert c["status"] == "degraded" and "tmpfs" in c["detail"] and "NVMe" in c["fix"]
        assert not list(stripe.iterdir())  # the O_DIRECT probe left nothing behind
    finally:
        os.rmdir(stripe)
    rc, checks = doctor(tmp_path, "--stripe", str(tmp_path / "nvme"))  # a new one, on this disk
    assert checks[f"stripe {tmp_path / 'nvme'}"]["status"] in ("ok", "degraded")
    assert not (tmp_path / "nvme").exists()  # only looked


def test_a_root_open_to_others_without_grants_is_degraded(tmp_path):
    (tmp_path / "store").mkdir(mode=0o777)
    os.chmod(tmp_path / "store", 0o777)
    rc, checks = doctor(tmp_path)
    c = checks["root and socket permissions"]
    assert c["status"] == "degraded" and c["fix"] == f"chmod 700 {tmp_path / 'store'}"
    rc, checks = doctor(tmp_path, "--allow-gid", "0:read")
    assert checks["root and socket permissions"]["status"] == "ok"


def test_integrations_missing_are_reported_not_fatal_and_asked_for_extras_are(tmp_path):
    rc, checks = doctor(tmp_path, hidden=["vllm", "lmcache"])
    assert checks["vllm (integration)"]["status"] == "missing" and "kvfs[vllm]" in checks["vllm (integration)"]["fix"]
    assert checks["lmcache (integration)"]["status"] == "missing" and rc == 0
    rc, checks = doctor(tmp_path, "--metrics-port", "9464", hidden=["prometheus_client"])
    c = checks["prometheus_client (--metrics-port)"]
    assert c["status"] == "missing" and c["needed"] and rc == 1
