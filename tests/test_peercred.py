"""SO_PEERCRED: --allow-uid/--allow-gid refuse other local users with a
clear error, on top of the socket's file mode."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from kvfsd.testing import DaemonProcess

NOBODY = 65534


def run_as_nobody(sock: Path) -> str:
    """Connect from a forked child that became uid/gid 65534 (no exec: the
    interpreter and kvfs are already loaded)."""
    import kvfs
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                with kvfs.connect(str(sock)) as s:
                    s.put("from-nobody", b"x")
                out = "ok"
            except kvfs.PermissionDenied as e:
                out = f"denied: {e}"
            except BaseException as e:  # noqa: BLE001
                out = f"error: {type(e).__name__}: {e}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def open_root():
    if os.getuid() != 0:
        pytest.skip("switching to uid 65534 needs root (CI runs as root)")
    d = Path(tempfile.mkdtemp(prefix="kvfs-peercred-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("allow,expect", [([], "ok"), (["--allow-uid", "4242"], "denied"),
                                          (["--allow-uid", str(NOBODY)], "ok"),
                                          (["--allow-gid", str(NOBODY)], "ok")])
def test_peer_credentials(open_root, allow, expect):
    d = DaemonProcess(open_root / "s", extra=allow, shm_size="16M")
    with d:
        d.socket.chmod(0o666)  # let uid 65534 reach the socket: the credential check is what decides
        out = run_as_nobody(d.socket)
        assert out.startswith(expect), out
        if expect == "denied":
            assert "uid 65534" in out and "--allow-uid" in out
            assert "refused a connection" in d.log()
        with d.connect() as s:  # root and the daemon's own uid are always served
            assert s.contains(["from-nobody"]) == [expect == "ok"]
