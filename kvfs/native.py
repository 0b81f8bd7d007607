"""Which data-plane implementation this process uses.

``backend`` is the C extension kvfs._native when it was built and
KVFS_NATIVE is not "0", else the pure-Python kvfs._native_py with the same
API (the test suite runs the data-plane tests against both).
"""
from __future__ import annotations

import os
from types import ModuleType

from . import _native_py


def _pick() -> tuple[ModuleType, str]:
    if os.environ.get("KVFS_NATIVE", "1") != "0":
        try:
            from . import _native  # type: ignore[attr-defined]
            return _native, "native"
        except ImportError:
            pass
    return _native_py, "python"


backend, name = _pick()


def use(which: str) -> None:
    """Switch implementation ("native" or "python"); for tests and benchmarks."""
    global backend, name
    if which == "python":
        backend, name = _native_py, "python"
    elif which == "native":
        from . import _native  # type: ignore[attr-defined]
        backend, name = _native, "native"
    else:
        raise ValueError("which must be 'native' or 'python'")
