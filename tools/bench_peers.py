"""The peers `kvfs bench --compare` measures kvfs against, each behind the
same two calls: ``put(key, view)`` and ``get_into(key, dest)``.

- FilePerBlock: one file per block under a fan-out of directories, what
  LMCache's local-disk backend does (open, write, close; open, readinto).
- Diskcache: ``diskcache.FanoutCache`` (SQLite index, large values in files).
- Redis: a ``redis-server`` on loopback that this module starts and stops,
  with persistence off, accessed with redis-py (what LMCache's remote
  backend uses). Values come back as bytes and are copied into the
  destination, as a client of these stores has to.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


class FilePerBlock:
    name = "file-per-block"

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[-2:] / f"{key}.bin"

    def put(self, key: str, data: memoryview) -> None:
        p = self._path(key)
        p.parent.mkdir(exist_ok=True)
        tmp = p.with_suffix(".tmp")
        with open(tmp, "wb", buffering=0) as f:
            f.write(data)
        os.replace(tmp, p)  # readers never see a half-written block

    def get_into(self, key: str, dest: Any) -> int:
        with open(self._path(key), "rb", buffering=0) as f:
            return f.readinto(dest)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class Diskcache:
    name = "diskcache"

    def __init__(self, root: Path):
        import diskcache

        self.root = root
        self.cache = diskcache.FanoutCache(str(root), shards=8, timeout=60, size_limit=1 << 40)

    def put(self, key: str, data: memoryview) -> None:
        self.cache.set(key, bytes(data))

    def get_into(self, key: str, dest: Any) -> int:
        v = self.cache.get(key)
        memoryview(dest)[:len(v)] = v
        return len(v)

    def clear(self) -> None:
        self.cache.clear()

    def close(self) -> None:
        self.cache.close()
        shutil.rmtree(self.root, ignore_errors=True)


class Redis:
    name = "redis"

    def __init__(self, root: Path):
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt install redis-server)")
        root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(root), "--protected-mode", "no", "--proto-max-bulk-len", "1gb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pool = redis.ConnectionPool(host="127.0.0.1", port=self.port, max_connections=256)
        self.r = redis.Redis(connection_pool=self.pool)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)

    def put(self, key: str, data: memoryview) -> None:
        self.r.set(key, data)

    def get_into(self, key: str, dest: Any) -> int:
        v = self.r.get(key)
        assert isinstance(v, bytes)
        memoryview(dest)[:len(v)] = v
        return len(v)

    def clear(self) -> None:
        self.r.flushall()

    def close(self) -> None:
        try:
            self.pool.disconnect()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
