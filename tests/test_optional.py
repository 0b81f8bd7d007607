"""A missing optional dependency is one line naming what to install and exit
status 2 from the `kvfs` command, a MissingDependency from the library,
never a traceback. Each is tested by hiding the module it needs (an import
hook that refuses it, in a fresh interpreter or in this one)."""
import os
import socket
import subprocess
import sys

import pytest

import kvfs
from kvfs import gpu
from kvfs.errors import KvfsError, MissingDependency
from kvfs.optional import KNOWN, have, missing, need
from helpers import BOTH_MOUNTS, HIDDEN_CLI, FakeDeviceArray, kvfs_without
from kvfsd.testing import DaemonProcess

def one_line(r, *wanted):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "MissingDependency" in err, err
    for w in wanted:
        assert w in err, (w, err)
    return err


@pytest.fixture
def hide(monkeypatch):
    """Make modules unimportable in this interpreter for one test."""
    def hide_(*names):
        for n in names:
            for m in list(sys.modules):
                if m == n or m.startswith(n + "."):
                    monkeypatch.delitem(sys.modules, m)
            monkeypatch.setitem(sys.modules, n, None)  # `import n` raises ModuleNotFoundError
    return hide_


def test_the_mount_without_either_mount_is_one_line(tmp_path):
    r = kvfs_without(BOTH_MOUNTS, "daemon", "--root", str(tmp_path / "s"), "--mount", str(tmp_path / "m"),
                     "--shm-size", "16M")
    one_line(r, "pip install 'kvfs[fuse]'", "libfuse3-dev", "pkg-config", "--mount")
    assert not (tmp_path / "s").exists()  # refused before any work


@pytest.mark.parametrize("impl, hidden, wanted", [("c", "kvfsd._cfuse", "libfuse3-dev"),
                                                  ("pyfuse3", "pyfuse3", "pip install 'kvfs[fuse]'")])
def test_a_mount_asked_for_by_name_and_missing_is_one_line(tmp_path, impl, hidden, wanted):
    r = kvfs_without([hidden], "daemon", "--root", str(tmp_path / "s"), "--mount", str(tmp_path / "m"),
                     "--mount-impl", impl, "--shm-size", "16M")
    one_line(r, wanted)
    assert not (tmp_path / "s").exists()


def test_the_daemon_runs_on_the_core_alone(tmp_path):
    """make demo installs only the core: nothing an extra brings (the shared
    tier's clients, metrics, NumPy, the mount's pyfuse3) may be imported by
    a daemon that does not use it."""
    d = DaemonProcess(tmp_path / "s", shm_size="16M")
    hidden = "hiredis,obstore,prometheus_client,numpy,pyfuse3,torch,cupy,kvikio"
    d.argv = lambda: [sys.executable, "-c", HIDDEN_CLI, hidden, *DaemonProcess.argv(d)[3:]]
    with d, d.connect() as s:
        s.put("k", b"core only", ns="core")
        assert s.get("k", ns="core") == b"core only"
        assert s.stats()["objects"] == 1


def test_without_the_c_mount_the_daemon_mounts_with_pyfuse3_and_says_why(tmp_path):
    """--mount-impl auto (the default) falls back to pyfuse3's mount where the
    C one cannot load; the fallback is in kvfs stats, with the reason."""
    pytest.importorskip("pyfuse3")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    d = DaemonProcess(tmp_path / "s", shm_size="16M", mount=tmp_path / "m")
    # the daemon's own command line, run with kvfsd._cfuse unimportable
    d.argv = lambda: [sys.executable, "-c", HIDDEN_CLI, "kvfsd._cfuse", *DaemonProcess.argv(d)[3:]]
    with d, d.connect() as s:
        (tmp_path / "m" / "ns").mkdir()
        (tmp_path / "m" / "ns" / "k").write_bytes(b"through pyfuse3")
        assert s.get("k", ns="ns") == b"through pyfuse3"
        m = s.stats()["mount"]
        assert m["impl"] == "pyfuse3" and "kvfsd._cfuse" in m["why"], m
    assert "serving the mount with pyfuse3" in d.log()


def test_metrics_without_prometheus_client_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = kvfs_without(["prometheus_client"], "daemon", "--root", str(tmp_path / "s"), "--metrics-port", str(port))
    one_line(r, "pip install 'kvfs[metrics]'", "--metrics-port")


def test_gpu_bench_without_cupy_is_one_line():
    one_line(kvfs_without(["cupy"], "bench", "--gpu"), "pip install 'kvfs[gpu]'", "cupy")


def test_fuse_bench_without_either_mount_is_one_line():
    one_line(kvfs_without(BOTH_MOUNTS, "bench", "--fuse"), "pip install 'kvfs[fuse]'", "kvfsd._cfuse")


def test_ttft_demo_without_torch_is_one_line():
    one_line(kvfs_without(["torch"], "demo-ttft", "--device", "cpu"), "pip install 'kvfs[demo]'", "torch")


def test_device_buffers_without_cupy_or_kvikio_raise_missing_dependency(tmp_path, hide, monkeypatch):
    hide("cupy", "kvikio")
    with DaemonProcess(tmp_path / "s", shm_size="16M") as d, d.connect() as s:
        s.put("k", b"x" * 1000)
        with pytest.raises(MissingDependency) as e:
            s.get_into("k", FakeDeviceArray(1000))
        assert "pip install 'kvfs[gpu]'" in str(e.value) and isinstance(e.value, ImportError)
        assert s.get("k") == b"x" * 1000  # the store works on, for host buffers

        class FakeCuda(gpu.HostCopier):
            name = "cuda"  # where kvikio would be used
        monkeypatch.setattr(gpu, "CudaCopier", FakeCuda)
        with d.connect(gpu_reader="kvikio") as s2:
            with pytest.raises(MissingDependency) as e:
                s2.get_into("k", FakeDeviceArray(1000))
            assert "kvikio" in str(e.value) and "kvfs[gpu]" in str(e.value)


@pytest.mark.parametrize("module", sorted(KNOWN))
def test_every_optional_module_names_its_extra(module, hide):
    hide(module)
    assert not have(module)
    with pytest.raises(MissingDependency) as e:
        need(module)
    msg = str(e.value)
    assert f"pip install 'kvfs[{KNOWN[module].extra}]'" in msg and module in msg and "\n" not in msg
    assert isinstance(e.value, KvfsError) and isinstance(e.value, ImportError) and e.value.name == module


def test_a_module_that_is_there_but_does_not_load_says_so():
    err = missing("pyfuse3", ImportError("libfuse3.so.3: cannot open shared object file", name="_pyfuse3"))
    assert "did not load: libfuse3.so.3" in str(err) and "libfuse3-dev" in str(err)
    assert need("os") is os and have("os") and not have("kvfs_no_such_module")
    assert "pip install kvfs_no_such_module" in str(missing("kvfs_no_such_module"))
    assert kvfs.MissingDependency is MissingDependency
