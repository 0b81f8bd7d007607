"""Reads into device memory (GPU): T0 by the copy engine, T1 by kvikio or
pinned staging, verified on the GPU.

Invariants:
- the leases of a device read last until its copies have landed
  (``DeviceReads.result``);
- a record that fails its check is reported and its size returned as -1;
  its bytes in device memory are not to be used.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from . import protocol as P
from .errors import InvalidArgument, NotFound
from .gpu import DeviceBuffer, GpuPlane, device_buffer
from .host_reads import HostReads, as_readable, as_writable
from .keys import normalize_key, normalize_keys, normalize_ns
from .optional import missing
from .store_state import BATCH_KEYS

log = logging.getLogger("kvfs")


# get_many_into_async works in waves: the first of FIRST_WAVE keys, each next
# one twice as large, up to WAVE_MAX. A wave's lookup and planning (about
# 9 us a key in Python) run while the copies of the waves before it are
# under way, and the waves past the first groups are started only as the
# caller waits, AHEAD groups ahead of it: so the copy engine starts after a
# few dozen keys, and the caller's compute on group 0 starts at once, not
# after the whole batch's control work (a 4096-key layer-wise load spent
# 40 ms there before its first layer could compute). A wave takes the
# locations this process knows (its cache, the shared directory) with no
# round trip, as blocking reads do, and looks up only the rest: a daemon
# busy with write-back answers a lookup in milliseconds, and a load that
# asked it once per wave waited that long a dozen times.
FIRST_WAVE = 64
WAVE_MAX = 512
AHEAD = 2


class DeviceReads:
    """Reads into device memory in flight (``Store.get_many_into_async``).

    Invariants: every item is read by exactly one wave, waves start in item
    order, and the waves covering group g (and AHEAD more) have started
    before ``wait(g)`` blocks; every lease taken lasts until every started
    wave has landed (``result``), and ``result`` starts what is left first.
    An error while starting a wave is raised by the call that started it;
    after it, no wave starts, and ``result`` still lands what had started.
    An item copied from a known location (no lease) counts only if the
    removal generation read before its location did not move until its
    group had landed and its check passed; otherwise it is read again,
    under a lease, before its size is given out (``_settle``)."""

    def __init__(self, store: "DeviceReading", ns: str, ks: list[str], outs: Sequence[Any], group_size: int,
                 gpu: GpuPlane, full: bool) -> None:
        self.store, self.ns, self.ks, self.group_size = store, ns, ks, group_size
        self._outs, self._gpu, self._full = outs, gpu, full
        self._devs: list[DeviceBuffer | None] = [None] * len(ks)
        self.sizes = [-1] * len(ks)
        self.found: dict[int, list[Any]] = {}
        self.waves: list[tuple[int, int, Any]] = []  # (first item, end, PendingRead)
        self.leases: list[int] = []
        # items copied from known locations (no lease): item -> the generation read before
        self.known: dict[int, int] = {}
        self._gens: set[int] = set()  # the generations in ``known``'s values
        self.settled: set[int] = set()  # known items checked (and read again where needed)
        self.started = 0  # items of the waves started so far
        self._wave = FIRST_WAVE
        self.failed = False
        self.done = False

    def _start_until(self, end: int) -> None:
        """Start waves until items ``[0, end)`` are all in one."""
        st = self.store
        while self.started < min(end, len(self.ks)) and not self.failed:
            a = self.started
            b = min(len(self.ks), a + self._wave)
            try:
                devs = [o if type(o) is DeviceBuffer else device_buffer(o) for o in self._outs[a:b]]
                for d in devs:
                    if d is None:
                        raise InvalidArgument("get_many_into_async takes device buffers only")
                    if d.readonly:
                        raise InvalidArgument("destination device buffer is read-only")
                self._devs[a:b] = devs
                found: dict[int, list[Any]] = {}
                known: dict[int, int] = {}
                cache = st._locs
                if cache is not None:
                    gen, cached = st._known_locations(cache, self.ns, self.ks[a:b])
                    if cached:
                        found = {a + i: item for i, item in cached.items()} if a else cached
                        known = dict.fromkeys(found, gen)
                        self._gens.add(gen)
                rest = [i for i in range(a, b) if i not in found]
                for c in range(0, len(rest), BATCH_KEYS):
                    part = rest[c:c + BATCH_KEYS]
                    res = st._call(P.LOOKUP, {"ns": self.ns, "keys": [self.ks[i] for i in part], **st._fetch})
                    if res["lease"]:
                        self.leases.append(res["lease"])
                    found.update((part[i], item) for i, item in enumerate(res["items"]) if item is not None)
                plan = self._gpu.plan(self.ns, self.ks, found, self._devs,  # type: ignore[arg-type]
                                      st.arena, st._path, self.sizes)
                self.waves.append((a, b, self._gpu.start(self.ns, self.ks, found, plan, self._full,
                                                         self.group_size, range(a, b))))
            except BaseException:
                self.failed = True
                raise
            self.found.update(found)
            self.known.update(known)  # only a wave that started has copies to settle
            self.started = b
            self._wave = min(2 * self._wave, WAVE_MAX)

    def wait(self, group: int) -> list[int]:
        """Sizes of group ``group``'s items (-1: missing or failed) once its
        bytes have landed in device memory."""
        gs = self.group_size
        lo, hi = group * gs, min(len(self.ks), (group + 1) * gs)
        self._start_until((group + 1 + AHEAD) * gs)
        bad: set[int] = set()
        for a, b, pending in self.waves:
            if a < hi and b > lo:
                bad |= pending.wait(group)
        self._settle(range(lo, hi), bad)
        return [-1 if i in bad and i not in self.known else self.sizes[i] for i in range(lo, hi)]

    def _settle(self, items: range, bad: set[int]) -> None:
        """Known-location items of ``items`` whose copies have landed: keep
        those whose generation held and whose check passed, read the others
        again under a lease (``_read_device``), and report the kept ones as
        hits. Each item is settled once."""
        st = self.store
        cache = st._locs
        todo = [i for i in items if i in self.known and i not in self.settled]
        if not todo or cache is None:
            return
        self.settled.update(todo)
        now = cache.generation()
        # as a blocking read settles its known locations: forget the failed
        # ones, report the hits; then read the failed ones again
        known = self.known
        # the usual case, nothing failed and no removal since: no pass per item
        stale = {i for i in todo if i in bad or known[i] != now} if bad or self._gens - {now} else set()
        again = st._settle_known(cache, self.ns, self.ks, set(todo), stale, self.sizes, todo)
        if again:
            devs = [self._devs[i] for i in again]
            for i, n in zip(again, st._read_device(self.ns, [self.ks[i] for i in again], devs)):  # type: ignore[arg-type]
                self.sizes[i] = n

    def result(self) -> list[int]:
        """Start what is left, wait for every group, report failed items,
        end the leases."""
        if not self.done:
            error: BaseException | None = None
            try:
                self._start_until(len(self.ks))
            except BaseException as e:  # noqa: BLE001 - what started lands first
                error = e
            self.done = True
            bad: set[int] = set()
            try:
                for _a, _b, pending in self.waves:
                    try:
                        bad |= pending.finish()
                    except BaseException as e:  # noqa: BLE001 - the other waves still land first
                        error = error or e
            finally:
                for lease in self.leases:
                    self.store._release(lease)
            if error is not None:
                raise error
            self._settle(range(self.started), bad)
            for i in sorted(bad):
                if i in self.known:  # settled: read again where it failed
                    continue
                self.sizes[i] = -1
                if i in self.found:
                    self.store._call(P.REPORT_BAD, {"ns": self.ns, "key": self.ks[i], "seq": self.found[i][2]})
        return list(self.sizes)

    def __enter__(self) -> "DeviceReads":
        return self

    def __exit__(self, *exc: object) -> None:
        self.result()


class DeviceReading(HostReads):
    def get_into(self, key: str | bytes, out: Any, *, ns: str = "default") -> int:
        tried = type(key) is str and type(ns) is str
        if tried:
            n = self._direct_read(ns, key, out)
            if n >= 0:
                return n
        k, ns = normalize_key(key), normalize_ns(ns)
        dev = device_buffer(out)
        if dev is not None:
            sizes = self._read_device(ns, [k], [dev])
        else:
            read = self._read_located if tried else self._read_batch  # (not the direct read twice)
            sizes, _ = read(ns, [k], [as_writable(out)], False)
        if sizes[0] < 0:
            raise NotFound(f"{ns}/{k} not found")
        return sizes[0]

    def _device_or_host(self, data: Any) -> Any:
        dev = device_buffer(data)
        return dev if dev is not None else as_readable(data)

    def _gpu_plane(self) -> GpuPlane:
        if self._gpu is None:
            try:
                plane = GpuPlane(self.reader, use_kvikio=self.gpu_reader != "staging")
            except ImportError as e:
                raise missing("cupy", e) from None
            if self.gpu_reader == "kvikio" and plane.kvikio is None:
                raise missing("kvikio")
            self._gpu = plane
        return self._gpu

    def get_many_into(self, keys: Sequence[str | bytes], outs: Sequence[Any], *, ns: str = "default") -> list[int]:
        ks, ns = normalize_keys(keys), normalize_ns(ns)
        if len(outs) != len(ks):
            raise InvalidArgument("keys and outs must have the same length")
        devs = [device_buffer(o) for o in outs]
        if any(d is not None for d in devs):
            if not all(d is not None for d in devs):
                raise InvalidArgument("outs must be all device buffers or all host buffers")
            res: list[int] = []
            for i in range(0, len(ks), BATCH_KEYS):
                res += self._read_device(ns, ks[i:i + BATCH_KEYS], devs[i:i + BATCH_KEYS])  # type: ignore[arg-type]
            return res
        views: list[memoryview | None] = [as_writable(o) for o in outs]
        out: list[int] = []
        for i in range(0, len(ks), BATCH_KEYS):
            sizes, _ = self._read_batch(ns, ks[i:i + BATCH_KEYS], views[i:i + BATCH_KEYS], False)
            out += sizes
        return out

    def get_many_into_async(self, keys: Sequence[str | bytes], outs: Sequence[Any], *, ns: str = "default",
                            group_size: int | None = None) -> "DeviceReads":
        """Start reading ``keys`` into device buffers and return at once.

        Items are in groups of ``group_size`` consecutive keys (default: one
        group). ``reads.wait(g)`` returns the sizes of group g once its
        bytes are in device memory, so compute on group g can start while
        the next groups are still copying (an inference engine loading a
        KV cache layer by layer: one group per layer). ``reads.result()``
        (or leaving ``with``) waits for everything and ends the lease; the
        lease covers every copy until then. A failed item reads -1 and is
        reported to the daemon; there is no second lookup here (retry it
        with ``get_many_into``). Keys are looked up and their copies started
        in waves (FIRST_WAVE keys, then twice as many each time, up to
        WAVE_MAX): the first groups' before this returns, the others as
        ``wait`` asks for groups before them (AHEAD groups ahead) or at
        ``result``. So copies begin at once, and compute on the first
        groups need not wait for the control work of the last ones. An
        error in a later wave (a bad buffer, the daemon gone) is raised by
        the ``wait`` or ``result`` that started it."""
        ks, ns = normalize_keys(keys), normalize_ns(ns)
        if len(outs) != len(ks):
            raise InvalidArgument("keys and outs must have the same length")
        gs = group_size or max(1, len(ks))
        gpu = self._gpu_plane()
        self._check_restart()
        self._conn()
        reads = DeviceReads(self, ns, ks, outs, gs, gpu, self.verify == "full")
        try:
            reads._start_until(max(FIRST_WAVE, (1 + AHEAD) * gs))
        except BaseException:
            try:
                reads.result()  # what was started lands before its leases end
            except Exception:  # noqa: BLE001 - the first error is the one to raise
                pass
            raise
        return reads

    def _read_device(self, ns: str, ks: list[str], outs: list[DeviceBuffer]) -> list[int]:
        """Read into device buffers (kvfs.gpu), as the host path does: keys
        whose location is known (cache, directory) are copied with no round
        trip, and such a copy counts only if the removal generation did not
        move until it completed (a seqlock: an extent evicted and reused
        under it is caught); the rest, and what failed, are looked up under
        a lease that ends only once their copies have completed. A failed
        item is reported (the daemon re-checks and drops it) and looked up
        once more."""
        for d in outs:
            if d.readonly:
                raise InvalidArgument("destination device buffer is read-only")
        gpu = self._gpu_plane()
        self._drop_stale_fds()
        self._check_restart()
        self._conn()
        sizes = [-1] * len(ks)
        todo = list(range(len(ks)))
        full = self.verify == "full"
        cache = self._locs
        if cache is not None:
            gen, cached = self._known_locations(cache, ns, ks)
            if cached:
                plan = gpu.plan(ns, ks, cached, outs, self.arena, self._path, sizes)
                missed = gpu.run(ns, ks, cached, plan, full)  # every copy has completed
                if cache.generation() != gen:
                    missed.update(cached)
                todo = self._settle_known(cache, ns, ks, cached, missed, sizes, todo)
        for attempt in range(2):
            if not todo:
                break
            res = self._call(P.LOOKUP, {"ns": ns, "keys": [ks[i] for i in todo], **self._fetch})
            lease = res["lease"]
            found = {i: item for i, item in zip(todo, res["items"]) if item is not None}
            try:
                plan = gpu.plan(ns, ks, found, outs, self.arena, self._path, sizes)
                bad = gpu.run(ns, ks, found, plan, full)
            finally:
                if lease:
                    self._release(lease)
            for i in bad:
                sizes[i] = -1
                if attempt == 0:
                    self._call(P.REPORT_BAD, {"ns": ns, "key": ks[i], "seq": found[i][2]})
            todo = sorted(bad)
        return sizes
