"""kill -9 under load; corrupted bytes are never served."""
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kvfs
from kvfsd.testing import DaemonProcess
from helpers import value_for

HERE = Path(__file__).parent


def _stream_and_kill(d: DaemonProcess, start: int, seconds: float) -> list[int]:
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.Popen([sys.executable, str(HERE / "writer_client.py"), str(d.socket), str(start)],
                         stdout=subprocess.PIPE, text=True, env=env)
    acked: list[int] = []
    reader = threading.Thread(target=lambda: acked.extend(int(l) for l in p.stdout))  # type: ignore[union-attr]
    reader.start()
    time.sleep(seconds)
    d.kill()
    p.wait(30)
    reader.join(30)
    return acked


@pytest.mark.parametrize("cycle", range(2))
def test_kill9_sync_loses_no_acknowledged_put(tmp_path, cycle):
    d = DaemonProcess(tmp_path / "s", stripes=2, durability="sync", capacity="4G")
    d.start()
    acked = _stream_and_kill(d, 0, 1.0 + random.random())
    assert len(acked) > 5, d.log()
    d.start()
    with d.connect() as s:
        for i in acked:
            assert s.get(f"k{i}") == value_for(i), f"acknowledged sync put k{i} lost or wrong"
        # nothing half-written is visible either
        for k in s.keys():
            assert s.get(k) == value_for(int(k[1:]))
    d.stop()


@pytest.mark.parametrize("shm", ["0", "64M"], ids=["T1", "T0"])
def test_kill9_fast_never_serves_wrong_bytes(tmp_path, shm):
    d = DaemonProcess(tmp_path / "s", stripes=2, durability="fast", capacity="4G", shm_size=shm)
    d.start()
    acked = _stream_and_kill(d, 0, 1.5)
    acked += _stream_and_kill(d.start(), 100000, 1.0)
    d.start()
    with d.connect() as s:
        present = list(s.keys())
        for k in present:
            assert s.get(k) == value_for(int(k[1:]))
        # a process crash (not an OS crash) keeps the page cache and /dev/shm:
        # fast mode keeps acked puts too (T0's backlog via its journal)
        assert set(present) >= {f"k{i}" for i in acked}
    d.stop()


def _flip(path: str, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    b = os.pread(fd, 1, offset)
    os.pwrite(fd, bytes([b[0] ^ 0x01]), offset)
    os.close(fd)


@pytest.mark.parametrize("size", [100, 5 * 1024 * 1024])
def test_corrupted_payload_is_a_miss_never_bytes(t1_store, size):
    store = t1_store
    data = os.urandom(size)
    store.put("victim", data)
    store.put("bystander", b"fine")
    path, off, length = store.stat("victim").extents[-1]
    _flip(path, off + length // 2)
    with pytest.raises(kvfs.NotFound):
        store.get("victim")
    assert store.get_many_into(["victim", "bystander"], [bytearray(size), bytearray(4)]) == [-1, 4]
    st = store.stats()
    assert st["counters"]["corrupt_dropped"] == 1
    assert store.contains(["victim"]) == [False]  # dropped from the index
    assert store.put("victim", data) is True and store.get("victim") == data  # can be stored again


def test_corruption_in_open_segment_found_by_recovery(tmp_path):
    d = DaemonProcess(tmp_path / "s", stripes=1)
    with d:
        with d.connect() as s:
            s.put("a", b"A" * 1000)
            s.put("b", b"B" * 1000)
            path, off, _ = s.stat("a").extents[0]
        d.kill()
        _flip(path, off + 10)
        d.start()
        with d.connect() as s:
            assert s.contains(["a", "b"]) == [False, True]
            assert s.get("b") == b"B" * 1000
            assert s.stats()["recovery"]["objects_dropped"] == 1
