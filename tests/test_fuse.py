"""The FUSE mount, for real: a daemon with --mount, and cp, ls, rm, mkdir,
dd and Python's open() against it. Every test runs against both mounts,
the C one (kvfsd._cfuse) and pyfuse3's. Skipped only where /dev/fuse is
missing, or one mount was not built (CI has both)."""
import errno
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import put_and_corrupt
from kvfsd.testing import DaemonProcess

if not os.path.exists("/dev/fuse"):
    pytest.skip("no /dev/fuse on this machine", allow_module_level=True)

MiB = 1 << 20
IMPLS = {"c": "kvfsd._cfuse", "pyfuse3": "pyfuse3"}  # --mount-impl, and the module it needs


@pytest.fixture(scope="module", params=sorted(IMPLS))
def impl(request):
    pytest.importorskip(IMPLS[request.param], reason=f"the {request.param} mount was not built (libfuse3-dev)")
    return request.param


def daemon(root, impl, **kw) -> DaemonProcess:
    """A daemon whose mount is ``impl``'s."""
    return DaemonProcess(root, extra=["--mount-impl", impl], **kw)


@pytest.fixture(scope="module")
def mounted(tmp_path_factory, impl):
    base = tmp_path_factory.mktemp(f"fuse-{impl}")
    d = daemon(base / "store", impl, stripes=2, capacity="2G", shm_size="256M", mount=base / "mnt")
    with d:
        s = d.connect()
        assert s.stats()["mount"]["impl"] == impl
        yield d, s, Path(d.mount)
        s.close()
        assert d.alive(), d.log()
        assert "internal error" not in d.log(), d.log()


def fresh_ns(mnt: Path, name: str) -> Path:
    p = mnt / name
    p.mkdir()
    return p


@pytest.mark.parametrize("size", [0, 1, 4095, 4 * MiB + 1, 100 * MiB])
def test_cp_in_and_out_identical(mounted, tmp_path, size, impl):
    d, s, mnt = mounted
    ns = mnt / "cp"
    ns.mkdir(exist_ok=True)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    subprocess.run(["cp", str(src), str(ns / f"v{size}")], check=True)
    assert (ns / f"v{size}").stat().st_size == size
    out = tmp_path / "out"
    subprocess.run(["cp", str(ns / f"v{size}"), str(out)], check=True)
    assert out.read_bytes() == src.read_bytes()
    assert s.get(f"v{size}", ns="cp") == src.read_bytes()  # the same object for the client library
    if impl == "c" and size >= 4 * MiB:  # whole pages went to the disk from the request, no copy
        assert s.stats()["mount"]["writes_direct"] > 0


def test_client_puts_show_up_and_ls_matches_keys(mounted):
    d, s, mnt = mounted
    vals = {f"k{i:03d}": os.urandom(1000 + i) for i in range(50)}
    s.put_many(list(vals), list(vals.values()), ns="fromlib")
    listed = sorted(os.listdir(mnt / "fromlib"))
    assert listed == sorted(s.keys("fromlib")) == sorted(vals)
    for k, v in vals.items():
        with open(mnt / "fromlib" / k, "rb") as f:
            assert f.read() == v
    st = (mnt / "fromlib" / "k007").stat()
    assert st.st_size == len(vals["k007"]) and not st.st_mode & 0o222  # read-only file
    assert "fromlib" in os.listdir(mnt) and ".kvfs" in os.listdir(mnt)


def test_concurrent_readers_through_fuse_and_client(mounted):
    d, s, mnt = mounted
    vals = [os.urandom(3 * MiB) for _ in range(8)]
    keys = [f"c{i}" for i in range(8)]
    s.put_many(keys, vals, ns="conc")
    errors = []

    def via_fuse():
        try:
            for _ in range(3):
                for k, v in zip(keys, vals):
                    assert (mnt / "conc" / k).read_bytes() == v
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def via_client():
        try:
            with d.connect() as c:
                for _ in range(3):
                    for k, v in zip(keys, vals):
                        assert c.get(k, ns="conc") == v
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=f) for f in (via_fuse, via_fuse, via_client, via_client)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_rm_mkdir_rmdir_and_rename(mounted, tmp_path):
    d, s, mnt = mounted
    ns = fresh_ns(mnt, "ops")
    (tmp_path / "a").write_bytes(b"A" * 5000)
    shutil.copy(tmp_path / "a", ns / "a")
    with pytest.raises(OSError) as e:
        os.rmdir(ns)
    assert e.value.errno == errno.ENOTEMPTY
    os.rename  # noqa: B018 - rename is refused with EXDEV, so mv copies and deletes
    with pytest.raises(OSError) as e:
        os.rename(ns / "a", ns / "b")
    assert e.value.errno == errno.EXDEV
    subprocess.run(["mv", str(ns / "a"), str(ns / "b")], check=True)
    assert os.listdir(ns) == ["b"] and (ns / "b").read_bytes() == b"A" * 5000
    os.unlink(ns / "b")
    assert s.contains(["a", "b"], ns="ops") == [False, False]
    os.rmdir(ns)
    assert "ops" not in os.listdir(mnt)
    with pytest.raises(FileNotFoundError):
        os.unlink(mnt / "cp" / "no-such-key")


def test_objects_are_immutable(mounted, tmp_path):
    d, s, mnt = mounted
    s.put("fixed", b"original", ns="imm")
    p = mnt / "imm" / "fixed"
    for mode in ("wb", "ab", "r+b"):
        with pytest.raises(OSError) as e:
            open(p, mode)
        assert e.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    with pytest.raises(OSError):
        os.truncate(p, 0)
    assert p.read_bytes() == b"original"


def test_invalid_names(mounted):
    d, s, mnt = mounted
    ns = fresh_ns(mnt, "names")
    for bad, want in (("x" * 201, errno.EINVAL), ("x" * 256, errno.ENAMETOOLONG), ("new\nline", errno.EINVAL)):
        with pytest.raises(OSError) as e:
            open(ns / bad, "wb")
        assert e.value.errno == want, bad
    with pytest.raises(OSError) as e:
        os.mkdir(mnt / ("n" * 101))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.mkdir(ns / "nested")
    assert e.value.errno in (errno.EPERM, errno.EROFS)
    with pytest.raises(OSError) as e:
        open(mnt / "at-root", "wb")
    assert e.value.errno in (errno.EPERM, errno.EROFS)
    assert s.keys("names") is not None and list(s.keys("names")) == []


def test_a_new_file_is_invisible_until_closed(mounted):
    d, s, mnt = mounted
    ns = fresh_ns(mnt, "partial")
    with open(ns / "p", "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        assert s.contains(["p"], ns="partial") == [False]
    assert s.get("p", ns="partial") == b"x" * 100_000


def test_stats_file_and_xattrs(mounted):
    d, s, mnt = mounted
    st = json.loads((mnt / ".kvfs" / "stats").read_text())
    assert st["objects"] == s.stats()["objects"] and "tiers" in st
    s.put("x", b"xattr me", ns="xa", meta={"dtype": "bf16"})
    p = str(mnt / "xa" / "x")
    assert set(os.listxattr(p)) == {"user.kvfs.checksum", "user.kvfs.tier", "user.kvfs.meta"}
    assert os.getxattr(p, "user.kvfs.checksum").decode() == s.stat("x", ns="xa").checksum
    assert os.getxattr(p, "user.kvfs.tier") in (b"T0", b"T0+T1", b"T1")
    assert json.loads(os.getxattr(p, "user.kvfs.meta")) == {"dtype": "bf16"}


def test_dd_and_du_and_find(mounted, tmp_path):
    d, s, mnt = mounted
    data = os.urandom(9 * MiB)
    s.put("dd", data, ns="tools")
    out = tmp_path / "dd.out"
    subprocess.run(["dd", f"if={mnt / 'tools' / 'dd'}", f"of={out}", "bs=1M", "status=none"], check=True)
    assert out.read_bytes() == data
    found = subprocess.run(["find", str(mnt / "tools"), "-type", "f"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert found == [str(mnt / "tools" / "dd")]
    du = int(subprocess.run(["du", "-sk", str(mnt / "tools")], capture_output=True, text=True,
                            check=True).stdout.split()[0])
    assert du >= 9 * 1024


def test_corrupted_object_reads_as_eio(tmp_path, impl):
    d = daemon(tmp_path / "s", impl, capacity="1G", shm_size=0, mount=tmp_path / "mnt")
    with d, d.connect() as s:
        put_and_corrupt(s, "bad", "c", 2 * MiB, 12345)
        with pytest.raises(OSError) as e:
            (tmp_path / "mnt" / "c" / "bad").read_bytes()
        assert e.value.errno == errno.EIO
        assert s.contains(["bad"], ns="c") == [False]  # reported and dropped


def test_kill9_with_the_mount_active_then_restart(tmp_path, impl):
    d = daemon(tmp_path / "s", impl, capacity="1G", shm_size="64M", durability="sync", mount=tmp_path / "mnt")
    with d:
        mnt = tmp_path / "mnt"
        (mnt / "k").mkdir()
        (mnt / "k" / "v").write_bytes(b"survives" * 1000)
        d.kill()
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno == errno.ENOTCONN  # the dead mount
        d.start()  # detaches the stale mount and mounts again
        assert (mnt / "k" / "v").read_bytes() == b"survives" * 1000
    assert not os.path.ismount(tmp_path / "mnt")  # SIGTERM unmounted it


def test_bench_fuse_quick(tmp_path):
    import sys
    r = subprocess.run([sys.executable, "-m", "kvfstools.cli", "bench", "--fuse", "--quick", "--dir", str(tmp_path),
                        "--json", str(tmp_path / "f.json")], capture_output=True, check=True)
    res = json.loads((tmp_path / "f.json").read_text())
    m = res["median"]
    assert res["impls"] == ["c", "pyfuse3"]  # both mounts, in the same run
    for impl in res["impls"]:
        assert m[f"cp_{impl}"] > 0 and m[f"hot_1m_{impl}"] > 0 and m[f"readers_hot_{impl}"] > 0
        assert m[f"storehot_1m_{impl}"] > 0
        assert res["mount_stats"][impl]["impl"] == impl
    assert m["cp_null_c"] > 0 and m["cp_null_py"] > 0  # each mount's ceiling ran beside it
    assert b"C mount GB/s" in r.stdout and b"pyfuse3 mount GB/s" in r.stdout


def test_out_of_order_writes_are_stored_right(mounted):
    """In-order writes are hashed as they arrive; a writer that seeks back
    takes the other path (hash at commit). Both store the right bytes."""
    d, s, mnt = mounted
    ns = fresh_ns(mnt, "order")
    data = os.urandom(9 * MiB + 123)
    fd = os.open(ns / "rev", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    step = 3 * MiB
    for off in reversed(range(0, len(data), step)):
        os.pwrite(fd, data[off:off + step], off)
    os.close(fd)
    with open(ns / "fwd", "wb") as f:
        for off in range(0, len(data), 1 << 20):
            f.write(data[off:off + (1 << 20)])
    assert s.get("rev", ns="order") == data and s.get("fwd", ns="order") == data
    assert s.stat("rev", ns="order").checksum == s.stat("fwd", ns="order").checksum


def test_write_when_the_stripe_is_on_another_filesystem(tmp_path, impl):
    """Writes go straight to the stripe, here on tmpfs (another filesystem
    than the root's): nothing assumes one filesystem."""
    import tempfile
    stripe = Path(tempfile.mkdtemp(prefix="kvfs-test-stripe-", dir="/dev/shm"))
    try:
        d = daemon(tmp_path / "s", impl, stripes=[str(stripe)], capacity="256M", shm_size=0,
                          mount=tmp_path / "mnt")
        with d, d.connect() as s:
            (tmp_path / "mnt" / "x").mkdir()
            data = os.urandom(9 * MiB + 5)
            (tmp_path / "mnt" / "x" / "v").write_bytes(data)
            assert s.get("v", ns="x") == data
    finally:
        shutil.rmtree(stripe, ignore_errors=True)


def test_forgotten_inodes_are_dropped(mounted):
    """The daemon keeps an inode per name only while the kernel holds it."""
    if os.geteuid() != 0:
        pytest.skip("dropping the kernel's inode cache needs root (CI runs as root)")
    d, s, mnt = mounted
    s.put_many([f"f{i}" for i in range(300)], [b"x"] * 300, ns="forget")
    assert len(os.listdir(mnt / "forget")) == 300
    for i in range(300):
        (mnt / "forget" / f"f{i}").stat()
    # dropping the kernel's dentry and inode caches makes it send FORGETs
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    st = json.loads((mnt / ".kvfs" / "stats").read_text())["fuse"]
    assert st["inodes"] < 300, st
    assert (mnt / "forget" / "f7").read_bytes() == b"x"  # a new inode number, the same object


def test_truncate_while_writing(mounted):
    d, s, mnt = mounted
    ns = fresh_ns(mnt, "trunc")
    with open(ns / "t", "wb") as f:
        f.write(b"a" * 5_000_000)
        f.flush()
        f.truncate(1_000_000)
        f.seek(1_000_000)
        f.write(b"b" * 10)
    assert s.get("t", ns="trunc") == b"a" * 1_000_000 + b"b" * 10


STREAM_SIZES = [100, 70 * 1024, 4 * MiB, 4 * MiB + 100, 4 * MiB + 70 * 1024, 9 * MiB]


def test_written_files_survive_kill9_and_recovery_checks_them(tmp_path, impl):
    """Writes land in T1 at their final place; the last chunk is trimmed to
    where a record of its length goes (short tails differ), which recovery
    checks record by record in open segments. Nothing may be dropped."""
    d = daemon(tmp_path / "s", impl, stripes=2, capacity="1G", shm_size=0, mount=tmp_path / "mnt")
    vals = {f"v{n}": os.urandom(n) for n in STREAM_SIZES}
    with d:
        ns = fresh_ns(tmp_path / "mnt", "st")
        for k, v in vals.items():
            (tmp_path / "src").write_bytes(v)
            subprocess.run(["cp", str(tmp_path / "src"), str(ns / k)], check=True)
        with d.connect() as s:
            st = s.stats()
            # one writer at a time: every trimmed tail gave its slack back (what
            # is left is the alignment padding any put has)
            assert st["disk_bytes"] - st["live_bytes"] < 8192 * len(vals), st
        d.kill()
        d.start()
        with d.connect() as s:
            rec = s.stats()["recovery"]
            assert rec["objects_dropped"] == 0 and rec["records_verified"] >= len(vals), rec
            for k, v in vals.items():
                assert s.get(k, ns="st") == v
                assert (tmp_path / "mnt" / "st" / k).read_bytes() == v


def test_holes_and_truncate_then_extend_read_as_zeros(mounted):
    d, s, mnt = mounted
    ns = fresh_ns(mnt, "holes")
    with open(ns / "sparse", "wb") as f:  # chunk 0 and most of chunk 1 are never written
        f.seek(5 * MiB)
        f.write(b"end")
    assert s.get("sparse", ns="holes") == bytes(5 * MiB) + b"end"
    with open(ns / "regrow", "wb") as f:
        f.write(b"x" * 100)
        f.flush()
        f.truncate(50)
        f.seek(200)
        f.write(b"y")
    assert (ns / "regrow").read_bytes() == b"x" * 50 + bytes(150) + b"y"
    fd = os.open(ns / "grown", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.ftruncate(fd, 6 * MiB + 3)  # only a size: every byte is a hole
    os.close(fd)
    assert s.contains(["grown"], ns="holes") == [False]  # nothing written: a draft
    assert (ns / "grown").read_bytes() == bytes(6 * MiB + 3)  # reading it stores it as it is
    assert s.get("grown", ns="holes") == bytes(6 * MiB + 3)


def test_a_file_closed_with_nothing_written_can_be_reopened_and_written(mounted):
    """fio's layout (create, ftruncate, close, reopen for the job) and
    `touch` then write: a draft until something is written."""
    d, s, mnt = mounted
    ns = fresh_ns(mnt, "drafts")
    data = os.urandom(3 * MiB + 5)
    fd = os.open(ns / "fio", os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, len(data))
    os.close(fd)
    assert (ns / "fio").stat().st_size == len(data)
    fd = os.open(ns / "fio", os.O_RDWR)
    for off in range(0, len(data), MiB):
        os.pwrite(fd, data[off:off + MiB], off)
    os.close(fd)
    assert s.get("fio", ns="drafts") == data and (ns / "fio").read_bytes() == data
    (ns / "touched").touch()
    with open(ns / "touched", "wb") as f:  # O_TRUNC of an empty draft
        f.write(b"hello")
    assert s.get("touched", ns="drafts") == b"hello"
    with pytest.raises(OSError) as e:  # stored: immutable from here on
        open(ns / "touched", "ab")
    assert e.value.errno == errno.EROFS
    (ns / "read-first").touch()
    assert (ns / "read-first").read_bytes() == b""  # reading a draft stores it, empty
    with pytest.raises(OSError) as e:
        open(ns / "read-first", "wb")
    assert e.value.errno == errno.EROFS
    assert s.get("read-first", ns="drafts") == b""


def test_a_draft_nobody_writes_is_stored_after_a_while(tmp_path, impl, monkeypatch):
    monkeypatch.setenv("KVFS_FUSE_DRAFT_S", "0.3")
    d = daemon(tmp_path / "s", impl, shm_size="16M", mount=tmp_path / "mnt")
    with d, d.connect() as s:
        ns = fresh_ns(Path(d.mount), "late")
        (ns / "empty").touch()
        assert s.contains(["empty"], ns="late") == [False]
        deadline = time.monotonic() + 10
        while s.contains(["empty"], ns="late") == [False] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.get("empty", ns="late") == b""


def test_a_failed_write_is_reported_and_nothing_is_stored(tmp_path, impl):
    """No room: `cp` fails (at a write or at close, as write-behind reports
    it), the file never appears, its space comes back, and the daemon goes
    on serving."""
    d = daemon(tmp_path / "s", impl, capacity="48M", shm_size=0, mount=tmp_path / "mnt")
    with d, d.connect() as s:
        ns = fresh_ns(tmp_path / "mnt", "full")
        (tmp_path / "big").write_bytes(os.urandom(96 * MiB))
        r = subprocess.run(["cp", str(tmp_path / "big"), str(ns / "big")], capture_output=True)
        assert r.returncode != 0 and b"No space left" in r.stderr, r
        assert not (ns / "big").exists() and s.contains(["big"], ns="full") == [False]
        assert s.stats()["disk_bytes"] < 8 * MiB  # the reservations were released
        (ns / "small").write_bytes(b"fits")
        assert s.get("small", ns="full") == b"fits"
        assert d.alive()


def _daemon_rss_anon_and_fds(d) -> tuple[int, int]:
    status = Path(f"/proc/{d.proc.pid}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:"))
    return kb << 10, len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def test_readers_writers_and_library_clients_at_once(mounted):
    """Writers and readers through the mount and library clients, all at
    once, twice over: every byte right, nothing stuck (each thread has a
    deadline), and the daemon's memory and open files back where the first
    round left them (no handle, buffer or segment dup kept)."""
    d, s, mnt = mounted
    ns = fresh_ns(mnt, "mix")
    sizes = [100, 70 * 1024, 4 * MiB + 100, 9 * MiB]
    lib = {f"lib{i}": os.urandom(sizes[i % len(sizes)]) for i in range(12)}
    s.put_many(list(lib), list(lib.values()), ns="mix")

    def one_round(tag: str) -> None:
        written: dict[str, bytes] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def guard(fn):
            def run(*a):
                try:
                    fn(*a)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
            return run

        @guard
        def writer(w: int) -> None:
            for i in range(6):
                data = os.urandom(sizes[(w + i) % len(sizes)])
                name = f"{tag}-w{w}-{i}"
                with open(ns / name, "wb") as f:
                    for off in range(0, len(data), MiB):
                        f.write(data[off:off + MiB])
                with lock:
                    written[name] = data

        @guard
        def reader() -> None:
            for _ in range(3):
                for k, v in lib.items():
                    assert (ns / k).read_bytes() == v, k
                with lock:
                    done = list(written.items())
                for k, v in done:
                    assert (ns / k).read_bytes() == v, k

        @guard
        def client() -> None:
            with d.connect() as c:
                for i in range(20):
                    k = f"{tag}-c{threading.get_ident()}-{i}"
                    v = os.urandom(sizes[i % len(sizes)])
                    c.put(k, v, ns="mix")
                    assert c.get(k, ns="mix") == v
                    with lock:
                        done = list(written.items())
                    for wk, wv in done[-2:]:
                        assert c.get(wk, ns="mix") == wv, wk

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
        threads += [threading.Thread(target=reader) for _ in range(3)]
        threads += [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 180
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "stuck: a thread did not finish in 180 s"
        assert not errors, errors
        for k, v in written.items():  # and what each writer wrote, once more, after everything settled
            assert s.get(k, ns="mix") == v and (ns / k).read_bytes() == v, k

    one_round("r0")
    rss0, fds0 = _daemon_rss_anon_and_fds(d)
    one_round("r1")
    rss1, fds1 = _daemon_rss_anon_and_fds(d)
    assert fds1 <= fds0 + 4, (fds0, fds1)  # a segment or two may have been opened meanwhile
    assert rss1 - rss0 < 48 * MiB, (rss0 >> 20, rss1 >> 20)
    assert d.alive()


def test_a_write_after_the_file_was_stored_is_refused_and_the_object_kept(mounted):
    """dd's pattern, and worse: a descriptor closed (which stores the file)
    while a dup of it still writes. The write is refused (EROFS: objects are
    immutable) and never reaches the stored bytes."""
    d, s, mnt = mounted
    ns = fresh_ns(mnt, "sealed")
    data = os.urandom(5 * MiB + 7)
    fd = os.open(ns / "k", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data)
    dup = os.dup(fd)
    os.close(fd)  # FLUSH: stored now
    with pytest.raises(OSError) as e:
        os.pwrite(dup, b"late" * 1024, 4096)  # into a chunk the file had reserved
    assert e.value.errno == errno.EROFS
    os.close(dup)
    assert s.get("k", ns="sealed") == data and (ns / "k").read_bytes() == data
