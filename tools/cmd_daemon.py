"""`kvfs daemon`: run the daemon in the foreground."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kvfs.sizes import parse_age, parse_size

if TYPE_CHECKING:
    from kvfsd.shared_tier import RemoteConfig


def _dir_slots(text: str) -> int:
    from kvfs.directory import BUCKET, PROBE
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n and (n < BUCKET * PROBE or n & (n - 1)):
        raise argparse.ArgumentTypeError(f"a power of two >= {BUCKET * PROBE}, or 0 for none (got {n})")
    return n


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """A flag's type that checks the text with ``parse`` and keeps it as
    written (sizes like 4G, ages like 7d: converted where they are used)."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return check


_size = _checked(parse_size)
_age = _checked(parse_age)


DAEMON_PARSER: list[argparse.ArgumentParser] = []  # set by add_parser: the daemon's flags, for kvfstools.config_file


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("daemon", help="run the kvfs daemon in the foreground")
    add_daemon_arguments(p)
    DAEMON_PARSER[:] = [p]
    return p


def add_daemon_arguments(p: argparse.ArgumentParser) -> None:
    """The daemon's flags; a configuration file's keys are the same
    (kvfstools.config_file)."""
    p.add_argument("--config", default=None, metavar="FILE",
                   help="read settings from this TOML file too (its keys are these flags without dashes); the "
                        "flags given here win over it, it wins over <root>/kvfs.toml and /etc/kvfs/kvfs.toml "
                        "(README, configuration)")
    p.add_argument("--root", default=None, help="store root (default $KVFS_ROOT or ~/.kvfs)")
    p.add_argument("--stripe", action="append", default=[], metavar="DIR",
                   help="a stripe directory, ideally one per NVMe device (repeatable; default <root>/stripe0)")
    p.add_argument("--socket", default=None, help="socket path (default $KVFS_SOCKET or <root>/kvfs.sock)")
    p.add_argument("--capacity", type=_size, default=None, help="bytes the stripes may use, e.g. 500G (default 90%% of free space)")
    p.add_argument("--durability", choices=["fast", "sync"], default="fast",
                   help="sync: a put returns after fdatasync and index commit; fast: may lose the last "
                        "writes on an OS crash, never serves wrong bytes (default fast)")
    p.add_argument("--sync-interval", type=float, default=2.0, metavar="SECONDS",
                   help="fast mode: sync the index and the segments it points into this often; a power cut "
                        "loses at most the fast puts of about this long plus T0's write-back backlog (default 2)")
    p.add_argument("--stripe-unit", type=_size, default="4M", help="chunk size for striping large values (default 4M)")
    p.add_argument("--segment-size", type=_size, default="1G", help="seal segments at this size (default 1G)")
    p.add_argument("--lease-timeout", type=float, default=30.0, help="seconds before an unreleased lease ends")
    p.add_argument("--shm-size", type=_size, default=None,
                   help="T0 shared-memory arena in /dev/shm, e.g. 4G; 0 disables T0 "
                        "(default min(25%% of RAM, 4G, half of /dev/shm's free space))")
    p.add_argument("--shm-dir", default="/dev/shm",
                   help="the tmpfs for the T0 arena, the location directory and the T0 journal (default "
                        "/dev/shm; one mounted with huge=advise gives the arena 2 MiB pages: README, tuning)")
    p.add_argument("--promote-after", type=int, default=2,
                   help="copy a T1 object into T0 on its Nth access (default 2; 0: never)")
    p.add_argument("--dir-slots", type=_dir_slots, default=1 << 18,
                   help="slots of the shared location directory that lets clients find objects without a "
                        "round trip (power of two; 192 bytes each, sparse; 0: none; default 262144)")
    p.add_argument("--allow-uid", action="append", default=[], metavar="UID[:RIGHT]",
                   help="admit this user (a uid or a name) on every path: socket, mount, data files, metrics; "
                        "RIGHT is read, write (the default: read and put) or admin (also delete, evict, "
                        "compact, verify); repeatable. Default: only the daemon's own user and root")
    p.add_argument("--allow-gid", action="append", default=[], metavar="GID[:RIGHT]",
                   help="admit the members of this group (a gid or a name; primary or supplementary), "
                        "as --allow-uid; repeatable")
    p.add_argument("--mount", default=None, metavar="DIR",
                   help="also mount the store at DIR (FUSE: /<namespace>/<key> files, /.kvfs/stats)")
    p.add_argument("--mount-impl", choices=("auto", "c", "pyfuse3"), default="auto",
                   help="which mount serves --mount: c (libfuse's low-level API, object reads in C on threads "
                        "of its own), pyfuse3, or auto (default): c where it was built, else pyfuse3; "
                        "kvfs stats says which, and why")
    p.add_argument("--mount-threads", type=int, default=0, metavar="N",
                   help="worker threads of the C mount (default 0: 8)")
    p.add_argument("--compact-at", type=float, default=0.2, metavar="SHARE",
                   help="compact in the background once dead bytes exceed this share of the capacity "
                        "(default 0.2; 0: only when asked, kvfs compact)")
    p.add_argument("--compact-threshold", type=float, default=0.5, metavar="R",
                   help="segments at least this share dead are compacted (default 0.5)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics")
    p.add_argument("--poll-us", type=float, default=200.0, metavar="US",
                   help="after answering a request, poll that connection this many microseconds for the next "
                        "before sleeping: a client waiting on each answer then pays no wake-up (default 200; "
                        "0: never; README, tuning)")
    g = p.add_argument_group("shared tier (several nodes; off unless --remote is given; README, several nodes)")
    g.add_argument("--remote", default=None, metavar="s3://BUCKET/PREFIX",
                   help="write committed objects through to this S3 bucket and read local misses through from it")
    g.add_argument("--remote-endpoint", default=None, metavar="URL",
                   help="the S3 endpoint (MinIO, Ceph RGW, SeaweedFS...; default AWS); https uses TLS")
    g.add_argument("--remote-credentials", default=None, metavar="FILE",
                   help="an AWS credentials file (INI, profile $AWS_PROFILE or default); default: the AWS_* "
                        "variables, else unsigned requests")
    g.add_argument("--presence", default=None, metavar="redis://HOST:PORT[,HOST:PORT...]",
                   help="the presence index: a Redis or Valkey cluster (or one server; valkey:// too); without "
                        "it remote lookups are S3 HEAD requests")
    g.add_argument("--remote-ns", action="append", default=[], metavar="GLOB",
                   help="write through only namespaces matching GLOB (repeatable; default every namespace)")
    g.add_argument("--remote-queue", type=int, default=65536, metavar="N",
                   help="uploads waiting at most; more are dropped and counted (default 65536)")
    g.add_argument("--remote-timeout", type=float, default=2.0, metavar="S",
                   help="one S3 read (a GET of 16 MiB at most, or a HEAD) takes at most this long; a failure makes "
                        "the shared tier local-only until S3 answers a retry again (default 2; uploads get 120)")
    g.add_argument("--remote-gc-older-than", type=_age, default=None, metavar="AGE",
                   help="remove shared-tier objects not accessed for AGE (e.g. 7d, 12h) once an hour")
    p.add_argument("--log-level", default="INFO")


def remote_config(args: argparse.Namespace) -> "RemoteConfig | None":
    from kvfs.errors import InvalidArgument
    from kvfsd.shared_tier import RemoteConfig
    if not args.remote:
        for flag in ("presence", "remote_endpoint", "remote_credentials", "remote_gc_older_than"):
            if getattr(args, flag):
                raise InvalidArgument(f"--{flag.replace('_', '-')} needs --remote")
        return None
    if args.remote_queue < 1 or args.remote_timeout <= 0:
        raise InvalidArgument("--remote-queue must be >= 1 and --remote-timeout > 0")
    return RemoteConfig(url=args.remote, endpoint=args.remote_endpoint,
                        credentials=Path(args.remote_credentials) if args.remote_credentials else None,
                        presence=args.presence, namespaces=args.remote_ns or ["*"], queue=args.remote_queue,
                        timeout=args.remote_timeout,
                        gc_older_than=parse_age(args.remote_gc_older_than) if args.remote_gc_older_than else None)


def run(args: argparse.Namespace) -> int:
    import logging

    from kvfsd.config import Config, default_root
    from kvfsd.main import run as run_daemon

    from .config_file import daemon_settings

    if hasattr(args, "_argv"):  # the config files under the command line
        args, _source = daemon_settings(args, "daemon")

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s kvfsd %(levelname)s %(message)s")
    cfg = Config(
        root=Path(args.root) if args.root else default_root(),
        stripes=[Path(s) for s in args.stripe],
        socket=Path(args.socket) if args.socket else None,
        capacity=parse_size(args.capacity) if args.capacity else None,
        durability=args.durability,
        sync_interval=args.sync_interval,
        stripe_unit=parse_size(args.stripe_unit),
        segment_size=parse_size(args.segment_size),
        lease_timeout=args.lease_timeout,
        shm_size=parse_size(args.shm_size) if args.shm_size is not None else None,
        shm_dir=Path(args.shm_dir),
        promote_after=args.promote_after,
        dir_slots=args.dir_slots,
        mount=Path(args.mount).absolute() if args.mount else None,
        mount_impl=args.mount_impl,
        mount_threads=args.mount_threads,
        allow_uids=args.allow_uid,
        allow_gids=args.allow_gid,
        compact_at=args.compact_at,
        compact_threshold=args.compact_threshold,
        metrics_port=args.metrics_port,
        poll_us=args.poll_us,
        remote=remote_config(args),
    )
    return run_daemon(cfg)
