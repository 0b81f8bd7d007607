"""Daemon configuration: defaults, and the per-store settings persisted in
``<root>/kvfs.json`` so a restart with other flags cannot misread the data."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvfs.errors import InvalidArgument
from kvfs.format import DEFAULT_SEGMENT_SIZE, DEFAULT_STRIPE_UNIT, FORMAT_VERSION, PAGE

from .access import Policy
from .durable import mkdir_durable, replace_durable

if TYPE_CHECKING:
    from .shared_tier import RemoteConfig


def default_root() -> Path:
    return Path(os.environ.get("KVFS_ROOT") or Path.home() / ".kvfs")


def default_socket(root: Path | None = None) -> Path:
    env = os.environ.get("KVFS_SOCKET")
    if env:
        return Path(env)
    return (root or default_root()) / "kvfs.sock"


@dataclass
class Config:
    root: Path
    stripes: list[Path] = field(default_factory=list)
    socket: Path | None = None
    capacity: int | None = None  # bytes on the stripes; None: 90% of free space at start
    durability: str = "fast"
    # fast mode: the index (and the segments it points into) is synced this
    # often; a power cut loses at most the fast puts of about this long
    # (plus T0's write-back backlog), README "Durability"
    sync_interval: float = 2.0
    stripe_unit: int = DEFAULT_STRIPE_UNIT
    segment_size: int = DEFAULT_SEGMENT_SIZE
    lease_timeout: float = 30.0
    high_watermark: float = 0.95
    low_watermark: float = 0.90
    map_size: int = 1 << 40  # LMDB map: sparse, so large costs nothing
    shm_size: int | None = None  # T0 arena bytes; None: min(25% of RAM, 4 GiB, half of shm_dir's free space); 0: no T0
    # the tmpfs that holds the arena, the location directory and the T0
    # journal (a tmpfs mounted huge=advise gives the arena 2 MiB pages)
    shm_dir: Path = Path("/dev/shm")
    promote_after: int = 2  # a T1 object is copied into T0 on this many accesses
    dir_slots: int = 1 << 18  # location directory slots (kvfs.directory; sparse shm); 0: none
    # who besides the daemon's own user and root is admitted, and with which
    # right: "UID[:read|write|admin]" or "NAME[:...]" (kvfsd.access)
    allow_uids: list[str | int] = field(default_factory=list)
    allow_gids: list[str | int] = field(default_factory=list)
    mount: Path | None = None  # mount the store here (FUSE), if set
    mount_impl: str = "auto"  # c, pyfuse3, or auto: c where kvfsd._cfuse was built (kvfsd.mount)
    mount_threads: int = 0  # the C mount's workers; 0: kvfsd.mount_c.DEFAULT_THREADS (8)
    # background compaction: when dead bytes exceed this share of the
    # capacity (0: never), segments at least compact_threshold dead are compacted
    compact_at: float = 0.2
    compact_threshold: float = 0.5
    metrics_port: int | None = None  # serve Prometheus metrics on 127.0.0.1:<port>
    # after answering a request, poll its connection this long for the next
    # one before sleeping in epoll (kvfsd.server, Conn.read_exact); 0: never
    poll_us: float = 200.0
    # the shared tier (T2, kvfsd.shared_tier): off unless set
    remote: "RemoteConfig | None" = None
    policy: Policy = field(default_factory=lambda: Policy(os.getuid()))  # set by resolve()

    def resolve(self) -> "Config":
        """Fill defaults, reconcile with the persisted store settings, create
        directories. Raises InvalidArgument on a conflicting configuration."""
        self.root = Path(self.root).expanduser().absolute()
        self.policy = Policy.of(os.getuid(), [str(u) for u in self.allow_uids], [str(g) for g in self.allow_gids])
        if self.durability not in ("fast", "sync"):
            raise InvalidArgument(f"durability must be 'fast' or 'sync', not {self.durability!r}")
        if not 0.05 <= self.sync_interval <= 3600:
            raise InvalidArgument(f"the sync interval must be 0.05 to 3600 seconds, not {self.sync_interval}")
        mkdir_durable(self.root)
        if self.socket is None:
            self.socket = default_socket(self.root)
        if self.stripe_unit < PAGE or self.stripe_unit % PAGE:
            raise InvalidArgument("stripe unit must be a multiple of 4 KiB")
        saved_path = self.root / "kvfs.json"
        given = [Path(s).expanduser().absolute() for s in self.stripes]
        if saved_path.exists():
            saved = json.loads(saved_path.read_text())
            if saved.get("format") != FORMAT_VERSION:
                raise InvalidArgument(f"store at {self.root} has format {saved.get('format')}, this kvfs reads {FORMAT_VERSION}")
            stripes = [Path(s) for s in saved["stripes"]]
            if given and set(given) != set(stripes):
                missing = set(stripes) - set(given)
                if missing:
                    raise InvalidArgument(
                        f"store at {self.root} has stripes {[str(s) for s in stripes]}; "
                        f"missing {[str(s) for s in sorted(missing)]} (stripes can be added, not removed)")
                stripes += [g for g in given if g not in stripes]
            self.stripes = stripes
            self.stripe_unit = int(saved.get("stripe_unit", self.stripe_unit))
        else:
            self.stripes = given or [self.root / "stripe0"]
        for s in self.stripes:
            mkdir_durable(s)
        tmp = saved_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "stripes": [str(s) for s in self.stripes],
                                   "stripe_unit": self.stripe_unit}, indent=1))
        replace_durable(tmp, saved_path)
        if self.capacity is None:
            seen: set[int] = set()
            free = 0
            for s in self.stripes:
                dev = os.stat(s).st_dev
                if dev not in seen:
                    seen.add(dev)
                    free += shutil.disk_usage(s).free
            self.capacity = int(free * 0.9)
        if self.capacity <= 0:
            raise InvalidArgument("capacity must be positive")
        if not 0 <= self.poll_us <= 10000:
            raise InvalidArgument("--poll-us must be 0-10000")
        self.shm_dir = Path(self.shm_dir).absolute()
        if not self.shm_dir.is_dir():
            raise InvalidArgument(f"--shm-dir {self.shm_dir}: not a directory")
        self.shm_size = resolve_shm_size(self.shm_size, self.shm_dir)
        # Whole segments are the unit of reclaim: keep them small relative to
        # the capacity so eviction can free space in reasonable steps.
        seg = min(self.segment_size, max(self.capacity // 16, 2 * self.stripe_unit + 2 * PAGE))
        self.segment_size = max(seg, 2 * self.stripe_unit + 2 * PAGE)
        return self


def resolve_shm_size(asked: int | None, shm_dir: Path = Path("/dev/shm")) -> int:
    """The T0 arena size. A default never takes more than half of what
    ``shm_dir`` has free (containers often give /dev/shm only 64 MiB); an
    explicit size that it cannot hold is refused, because touching pages
    past a full tmpfs kills the process with SIGBUS instead of failing a
    write."""
    try:
        shm_free = shutil.disk_usage(shm_dir).free
    except OSError:
        shm_free = 0
    if asked is None:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        size = min(ram // 4, 4 << 30, shm_free // 2)
        return size - size % (1 << 20)
    if asked < 0:
        raise InvalidArgument("--shm-size must be >= 0")
    if asked > shm_free:
        raise InvalidArgument(f"--shm-size {asked} is more than {shm_dir} has free ({shm_free} bytes)")
    return asked - asked % 4096
