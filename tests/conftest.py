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
