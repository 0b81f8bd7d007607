"""Optional dependencies: what each one is for and how to get it.

The core (client, daemon, admin tools) needs only what ``pip install kvfs``
brings. Everything else is imported through ``need`` where a feature first
uses it, so a missing one is a ``MissingDependency`` naming the extra (and
the system packages, where a build or a library needs them), never a
traceback: the ``kvfs`` command prints it as one line and exits with 2.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from .errors import MissingDependency


@dataclass(frozen=True)
class Optional:
    extra: str  # pip install 'kvfs[<extra>]'
    used_for: str
    system: str = ""  # what else to install, where pip alone is not enough


FUSE_SYSTEM = "building it needs libfuse3-dev and pkg-config, mounting needs fuse3 (apt install fuse3 libfuse3-dev pkg-config)"

KNOWN: dict[str, Optional] = {
    "pyfuse3": Optional("fuse", "the mount (kvfs daemon --mount, kvfs bench --fuse)", FUSE_SYSTEM),
    "prometheus_client": Optional("metrics", "Prometheus metrics (kvfs daemon --metrics-port)"),
    "cupy": Optional("gpu", "device memory (CuPy arrays, CUDA torch tensors; kvfs bench --gpu)",
                     "a CUDA driver and a GPU"),
    "kvikio": Optional("gpu", "T1 reads straight into device memory (gpu_reader='kvikio')"),
    "numpy": Optional("numpy", "NumPy buffers and the benchmarks"),
    "torch": Optional("demo", "kvfs demo-ttft (on a GPU node install torch's CUDA build first)"),
    "transformers": Optional("demo", "kvfs demo-ttft"),
    "diskcache": Optional("bench", "the diskcache peer of kvfs bench --compare"),
    "redis": Optional("bench", "the Redis peer of kvfs bench --compare", "a Redis server (apt install redis-server)"),
    "matplotlib": Optional("bench", "the charts of kvfs bench --compare --png and make bench-readme"),
    # the engine integrations (kvfs.integrations) and the shared tier
    "vllm": Optional("vllm", "the vLLM connector (kvfs.integrations.vllm)"),
    "lmcache": Optional("lmcache", "the LMCache backend (kvfs.integrations.lmcache)"),
    "nixl": Optional("nixl", "NIXL transfers (kvfs.integrations.nixl)"),
    "obstore": Optional("remote", "the shared tier on S3 (kvfs daemon --remote)"),
    "hiredis": Optional("remote", "the shared tier's presence index (kvfs daemon --presence)"),
}


def missing(module: str, error: BaseException | None = None) -> MissingDependency:
    """The error for ``module`` not importing (``error``: why, when it is
    there but does not load, e.g. a shared library it needs is missing)."""
    top = module.split(".")[0]
    o = KNOWN.get(top)
    if o is None:
        return MissingDependency(f"{module} is needed here and is not installed (pip install {top})", module)
    why = ""
    if error is not None and getattr(error, "name", None) not in (top, module):
        why = f" (it is there but did not load: {error})"
    system = f"; {o.system}" if o.system else ""
    return MissingDependency(f"{o.used_for} needs {top}{why}: pip install 'kvfs[{o.extra}]'{system}", module)


def need(module: str) -> ModuleType:
    """Import ``module``, or raise MissingDependency saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing(module, e) from None


def have(module: str) -> bool:
    """Whether ``module`` imports (for features that fall back without it)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
