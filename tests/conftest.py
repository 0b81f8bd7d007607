from __future__ import annotations

from typing import Iterator

import pytest

from kvfsd.testing import DaemonProcess


@pytest.fixture
def daemon(tmp_path) -> Iterator[DaemonProcess]:
    """A real daemon on a 3-stripe store in a temporary directory."""
    d = DaemonProcess(tmp_path / "store", stripes=3, capacity="2G")
    with d:
        yield d
    if d.proc is not None and d.proc.returncode not in (0, None, -9):
        print(d.log())


@pytest.fixture
def store(daemon):
    s = daemon.connect()
    yield s
    s.close()


@pytest.fixture
def t1_daemon(tmp_path) -> Iterator[DaemonProcess]:
    """A daemon without T0: every read is served from the segment files."""
    d = DaemonProcess(tmp_path / "store-t1", stripes=3, capacity="2G", shm_size=0)
    with d:
        yield d


@pytest.fixture
def t1_store(t1_daemon):
    s = t1_daemon.connect()
    yield s
    s.close()


@pytest.fixture(scope="module")
def daemon_for_fuzz(tmp_path_factory):
    """One daemon shared by all examples of a property test, with a canary object."""
    d = DaemonProcess(tmp_path_factory.mktemp("fuzz") / "store", stripes=2, capacity="1G")
    with d:
        s = d.connect()
        s.put("canary-9d2e", b"still here", ns="zz-canary-7f3a")
        yield d, s
        assert d.alive(), d.log()
        assert "internal error" not in d.log(), d.log()  # every bad input met a precise error
        s.close()
