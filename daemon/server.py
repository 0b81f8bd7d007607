"""The socket server: a trio loop that speaks kvfs.protocol on a Unix socket.

Every blocking engine call goes through ``trio.to_thread.run_sync``; the loop
itself only moves frames. One task per connection answers that connection's
requests in order; connections are independent, so one slow or hostile
client never stalls the others. A frame that cannot be parsed closes only
its own connection; a well-framed bad request gets an error reply.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import socket as stdsocket
import time
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, Callable

import trio

from kvfs import native
from kvfs import protocol as P
from kvfs.errors import InvalidArgument, KvfsError, ProtocolError
from kvfs.keys import normalize_keys, normalize_ns

from .access import OP_RIGHT, Right, action_of
from .connector_stats import ConnectorStats
from .engine import Engine
from .gc_policy import GcPolicy
from .fileperms import Kind
from .jobs import Job, Jobs
from .metrics import RequestStats
from .peers import unix_peer
from .segments import PutPlan
from .space import NeedRoom

log = logging.getLogger("kvfsd")

_conn_ids = itertools.count(1)
MAX_RESERVATIONS = 2  # the one a client fills and the next, asked ahead (kvfs.arena_puts)


class _Closed(Exception):
    pass


class Conn:
    """Buffered reads over a trio socket, with ``recv_into`` for payloads."""

    def __init__(self, sock: trio.socket.SocketType, poll_s: float = 0.0):
        self.sock = sock
        self.poll_s = poll_s
        # Poll for the next request only while polls find it: a poll that
        # ran out turns polling off, and a wait that ended within
        # ``poll_s`` anyway (in epoll, wake-up included) turns it back on.
        # A client that waits on each answer and sends its next request at
        # once is found by the poll every time; one that pauses longer
        # between requests costs at most one spent poll, not one a
        # request (CPU the write-back threads would otherwise have: 0.4-1.1
        # us of the event loop's CPU per 4 KiB put, in batches of 64 on a
        # 2-core VM, when every poll ran out).
        self.polling = poll_s > 0
        self.buf = bytearray()
        self.id = next(_conn_ids)
        self.staging: bytearray | None = None
        self.pending: dict[int, PutPlan] = {}  # alloc'd, not yet committed
        self.next_put = 1
        self.reservations: dict[int, list[int]] = {}  # id -> [rest, end] of arena reservations (put_t0)
        self.next_res = 1
        # work a request left for after its reply is sent (or failed to
        # be): what a client need not wait for (queueing a write-back)
        self.after_reply: list[Callable[[], None]] = []

    # Blocking variants, for a worker thread that owns the connection while
    # its task awaits it (so nothing else reads this socket meanwhile).
    STALL_TIMEOUT = 30.0

    def read_into_blocking(self, view: memoryview) -> None:
        pos = self._take_buffered(view)
        fd = self.sock.fileno()
        poller = None
        while pos < len(view):
            try:
                n = os.readv(fd, [view[pos:]])
            except BlockingIOError:
                if poller is None:
                    poller = select.poll()
                    poller.register(fd, select.POLLIN)
                if not poller.poll(self.STALL_TIMEOUT * 1000):
                    raise _Closed()  # a client that stalls mid-value is treated as dead
                continue
            if n == 0:
                raise _Closed()
            pos += n

    def skip_blocking(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            k = min(n, len(scratch))
            self.read_into_blocking(scratch[:k])
            n -= k

    async def read_exact(self, n: int) -> bytes:
        if len(self.buf) < n:
            began = time.perf_counter()
            if not (self.polling and await self._poll(n)):
                while len(self.buf) < n:
                    data = await self.sock.recv(max(65536, n - len(self.buf)))
                    if not data:
                        raise _Closed()
                    self.buf += data
                # poll next time if a poll would have found these bytes
                self.polling = self.poll_s > 0 and time.perf_counter() - began <= self.poll_s
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def _poll(self, n: int) -> bool:
        """Try to read the next ``n`` bytes for up to ``poll_s``, yielding to
        the loop between tries, before ``read_exact`` parks in epoll; whether
        they came. A client that waits on each answer sends its next request
        within tens of microseconds; finding it here saves the daemon's
        wake-up from epoll (28-50 us on a VM: see native/socket_wait.c for
        the client's side).
        While any task polls, the loop asks epoll without sleeping, so other
        connections are served as before; the cost is CPU only while
        requests keep coming."""
        fd = self.sock.fileno()
        until = time.perf_counter() + self.poll_s
        while len(self.buf) < n:
            try:
                data = os.read(fd, max(65536, n - len(self.buf)))
            except BlockingIOError:
                if time.perf_counter() >= until:
                    return False
                await trio.lowlevel.checkpoint()
                continue
            if not data:
                raise _Closed()
            self.buf += data
        return True

    def _take_buffered(self, view: memoryview) -> int:
        """Move already-received bytes into ``view``; returns how many."""
        k = min(len(self.buf), len(view))
        if k:
            view[:k] = self.buf[:k]
            del self.buf[:k]
        return k

    async def read_into(self, view: memoryview) -> None:
        pos = self._take_buffered(view)
        while pos < len(view):
            n = await self.sock.recv_into(view[pos:])
            if n == 0:
                raise _Closed()
            pos += n

    async def skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            k = min(n, len(scratch))
            await self.read_into(scratch[:k])
            n -= k

    async def send(self, data: bytes) -> None:
        # a reply goes out without giving up the GIL if the socket takes it
        # whole (native/socket_wait.c says why); then one checkpoint, as
        # trio's send would, so a connection that keeps the loop busy still
        # lets the others in
        sent = native.backend.send_held(self.sock.fileno(), data)
        view = memoryview(data)[sent:]
        if not view:
            await trio.lowlevel.checkpoint()
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]


class Server:
    def __init__(self, engine: Engine, socket_path: Path):
        self.engine = engine
        self.socket_path = Path(socket_path)
        self.connections = 0
        self._nursery: trio.Nursery | None = None
        self._promote_wanted = trio.Event()
        self.jobs = Jobs()
        self.requests = RequestStats()  # latency per op (kvfs stats, Prometheus)
        self.connector_stats = ConnectorStats()  # engine adapters' own counters, per namespace
        self.gc = GcPolicy()  # the collector kept off the mirror (kvfsd.gc_policy)
        self.mount_stats: Callable[[], dict[str, Any]] | None = None  # set when the store is mounted too

    async def _thread(self, fn: Callable[..., Any], *a: Any) -> Any:
        return await trio.to_thread.run_sync(partial(fn, *a))

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        path = str(self.socket_path)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        listener = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        await listener.bind(path)
        self.engine.perms.apply(path, Kind.SOCKET)  # before listen: nobody it does not grant gets in
        listener.listen(256)
        log.info("listening on %s", path)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._expire_loop)
                nursery.start_soon(self._promote_loop)
                nursery.start_soon(self._compact_loop)
                nursery.start_soon(self._gc_loop)
                if self.engine.remote is not None and self.engine.remote.cfg.gc_older_than is not None:
                    nursery.start_soon(self._remote_gc_loop, self.engine.remote.cfg.gc_older_than)
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._handle, sock)
        finally:
            listener.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def snapshot(self) -> dict[str, Any]:
        """The engine's stats, plus what only the server knows (blocking)."""
        st = self.engine.stats()
        st["connections"] = self.connections
        st["requests"] = self.requests.snapshot()
        st["access"] = self.engine.cfg.policy.describe()
        st["connectors"] = self.connector_stats.snapshot()
        st["gc"] = self.gc.stats()
        if self.mount_stats is not None:
            st["mount"] = self.mount_stats()
        return st

    def _start_compaction(self, threshold: float | None, stripe: str | None) -> Job:
        job = self.jobs.new("compact")
        assert self._nursery is not None
        self._nursery.start_soon(self._thread, self.jobs.run, job,
                                 lambda progress: self.engine.compact(threshold, stripe, progress))
        return job

    async def _compact_loop(self) -> None:
        """Background compaction once dead bytes pass their share of the capacity."""
        eng = self.engine
        while eng.cfg.compact_at > 0:
            await trio.sleep(COMPACT_CHECK_S)
            if eng.dead_bytes() > eng.cfg.compact_at * eng.capacity and not self.jobs.running("compact"):
                self._start_compaction(None, None)

    async def _remote_gc_loop(self, older_than: float) -> None:
        """Once an hour: shared-tier objects not accessed for ``older_than`` go."""
        remote = self.engine.remote
        assert remote is not None
        while True:
            await trio.sleep(REMOTE_GC_EVERY_S)
            if self.jobs.running("gc-remote"):
                continue
            job = self.jobs.new("gc-remote")
            await self._thread(self.jobs.run, job, lambda progress: remote.gc(older_than, progress))

    async def _gc_loop(self) -> None:
        self.gc.started()
        while True:
            await trio.sleep(1.0)
            self.gc.tick()

    async def _expire_loop(self) -> None:
        """Once a second: leases past their time, and the directory's refill."""
        while True:
            await trio.sleep(1.0)
            await self._thread(self.engine.expire_leases)
            await self._thread(self.engine.refill_directory)

    async def _promote_loop(self) -> None:
        """Copies T1 objects that the promotion policy picked into T0."""
        while True:
            await self._promote_wanted.wait()
            self._promote_wanted = trio.Event()
            while self.engine.promote_q:
                try:
                    await self._thread(self.engine.promote_some)
                except Exception:  # noqa: BLE001 - a failed promotion only means a T1 read later
                    log.exception("promotion to T0 failed")
                    self.engine.promote_q.clear()

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        conn = Conn(sock, self.engine.cfg.poll_us * 1e-6)
        self.connections += 1
        policy = self.engine.cfg.policy
        # the socket's mode and ACL already keep out whoever is not granted;
        # this is the same decision taken again on the peer's credentials,
        # and the only place the difference between rights is made
        peer = unix_peer(sock)
        right = policy.right_of(peer.uid, peer.gids)
        if right is None:
            log.warning("refused a connection from %s (not in --allow-uid/--allow-gid)", peer.who)
        try:
            while True:
                try:
                    prefix = await conn.read_exact(P.PREFIX.size)
                except _Closed:
                    return
                try:
                    mlen, tlen = P.parse_prefix(prefix)
                except ProtocolError as e:
                    await conn.send(P.reply_err(0, e))  # cannot resync: answer, then close
                    return
                body = await conn.read_exact(mlen)
                req_id = 0
                try:
                    try:
                        req_id, op, args = P.parse_request(body)
                    except ProtocolError as e:
                        if tlen:
                            await conn.skip(tlen)
                        await conn.send(P.reply_err(0, e))  # id unknown: answer as 0
                        continue
                    refused = policy.refusal(right, OP_RIGHT.get(op, Right.READ), action_of(op), peer.who)
                    if refused is not None:  # (an unknown op goes on, to be answered as one)
                        if tlen:
                            await conn.skip(tlen)
                        if req_id:
                            await conn.send(P.reply_err(req_id, refused))
                        if right is None:
                            return  # not admitted at all: nothing more to say
                        continue
                    if op != P.PUT and tlen:
                        await conn.skip(tlen)
                        raise ProtocolError(f"op {op!r} takes no trailer")
                    started = time.perf_counter()
                    result: Any
                    try:
                        if op == P.PUT:
                            result = await self._put(conn, args, tlen)
                        elif op == P.HELLO:
                            result = dict(self._hello(), right=right.label if right is not None else None)
                        else:
                            result = await self._dispatch(conn, op, args)
                    finally:
                        if op in P.OPS:
                            self.requests.observe(op, time.perf_counter() - started)
                    reply = P.reply_ok(req_id, result)
                except KvfsError as e:
                    reply = P.reply_err(req_id, e)
                except (_Closed, trio.Cancelled):
                    raise
                except (TypeError, ValueError, OverflowError, AttributeError, IndexError) as e:
                    reply = P.reply_err(req_id, InvalidArgument(f"bad arguments: {e}"))
                except Exception as e:  # noqa: BLE001 - one request must not kill the daemon
                    log.exception("internal error serving a request")
                    reply = P.reply_err(req_id, KvfsError(f"internal error: {type(e).__name__}: {e}"))
                try:
                    if req_id:
                        await conn.send(reply)
                finally:
                    if conn.after_reply:
                        after, conn.after_reply = conn.after_reply, []
                        for fn in after:
                            fn()
        except (_Closed, trio.BrokenResourceError, ConnectionError, OSError) as e:
            if not isinstance(e, _Closed):
                log.debug("connection %d: %s", conn.id, e)
        finally:
            self.connections -= 1
            sock.close()
            with trio.CancelScope(shield=True):
                for plan in conn.pending.values():
                    await self._thread(self.engine.abort_put, plan)
                for rest, end in conn.reservations.values():
                    self.engine.release_arena(rest, end)
                await self._thread(self.engine.release_owner, conn.id)

    def _hello(self) -> dict[str, Any]:
        eng = self.engine
        t0 = eng.t0
        return {"version": P.PROTOCOL_VERSION, "stripes": eng.stripe_paths(),
                "generation": str(eng.generation.path),
                "instance": eng.instance,
                "directory": None if eng.dir is None else {"path": str(eng.dir.path), "slots": eng.dir.nslots},
                "arena": None if t0 is None else {"path": str(t0.arena.path), "size": t0.arena.size},
                "stripe_unit": eng.stripe_unit, "pid": os.getpid(), "durability": eng.cfg.durability,
                # the shared tier: clients then ask it for what they miss (remote lookups, read-through)
                "remote": None if eng.remote is None else {"presence": eng.remote.presence is not None}}

    async def _dispatch(self, conn: Conn, op: str, args: dict[str, Any]) -> Any:
        eng = self.engine
        if op == P.TOUCH:
            eng.touch(P.arg(args, "ns", str), P.arg(args, "keys", list))  # memory only
            return None
        if op == P.LOOKUP:
            ns = P.arg(args, "ns", str)
            keys = P.arg(args, "keys", list)
            want_lease = P.arg(args, "lease", bool, True)
            lid, items = eng.lookup(ns, keys, conn.id, lease=want_lease)  # memory only
            if eng.remote is not None and P.arg(args, "fetch", bool, False) and None in items:
                lid, items = await self._read_through(conn, ns, keys, lid, items, want_lease)
            if eng.promote_q:
                self._promote_wanted.set()
            return {"lease": lid, "items": items}
        if op == P.RELEASE:
            leases = P.arg(args, "leases", list)
            if not all(isinstance(l, int) for l in leases):
                raise ProtocolError("leases must be ints")
            freed = eng.release(leases, conn.id)  # memory only
            if freed:
                await self._thread(eng.reclaim, freed)
            return None
        if op == P.CONTAINS:
            return eng.contains(P.arg(args, "ns", str), P.arg(args, "keys", list))  # memory only
        if op == P.PREFIX_MATCH:
            return eng.prefix_match(P.arg(args, "ns", str), P.arg(args, "keys", list))  # memory only
        if op == P.REMOTE_HAS:
            if eng.remote is None:
                raise InvalidArgument("this daemon has no shared tier (kvfs daemon --remote)")
            ns, keys = normalize_ns(P.arg(args, "ns", str)), normalize_keys(P.arg(args, "keys", list))
            if P.arg(args, "prefix", bool, False):
                return await self._thread(eng.remote.prefix, ns, keys)
            return await self._thread(eng.remote.has, ns, keys)
        if op == P.GC_REMOTE:
            if eng.remote is None:
                raise InvalidArgument("this daemon has no shared tier (kvfs daemon --remote)")
            age = float(P.arg(args, "older_than", (int, float)))
            if age < 0:
                raise InvalidArgument("older_than must be >= 0 seconds")
            dry = P.arg(args, "dry_run", bool, False)
            job = self.jobs.new("gc-remote")
            assert self._nursery is not None
            remote = eng.remote
            self._nursery.start_soon(self._thread, self.jobs.run, job,
                                     lambda progress: remote.gc(age, progress, dry))
            return {"job": job.id}
        if op == P.ALLOC:
            plan = await self._prepare(P.arg(args, "ns", str), _items(args), P.arg(args, "t0", bool, False))
            pid = conn.next_put
            conn.next_put += 1
            conn.pending[pid] = plan
            # per item: [seq, T1 extents, arena offset or -1]; the client
            # fills the arena extent if there is one, else the T1 extents
            return {"put": pid, "items": [
                None if o is None else [o.seq, [[c.stripe, c.seg, c.payload_off, c.length] for c in o.chunks],
                                        o.t0]
                for o in plan.items]}
        if op == P.COMMIT:
            pending = conn.pending.pop(P.arg(args, "put", int), None)
            if pending is None:
                raise InvalidArgument("no such pending put on this connection")
            try:
                eng.set_client_sums(pending, P.arg(args, "sums", list))
            except BaseException:
                await self._thread(eng.abort_put, pending)
                raise
            sync = eng.effective_sync(P.arg(args, "sync", bool, False))
            if not any(o is not None and o.via_t0 for o in pending.items):
                return await self._publish(pending, sync, partial(eng.write_headers, pending))
            eng.publish_t0(pending)  # readable from T0 from here on
            if sync or not eng.t0_only(pending):
                # sync: acknowledged only once in T1 and the index; items the
                # client wrote to T1 itself are readable only once published
                return await self._thread(eng.write_back, pending, sync)
            eng.queue_write_back(pending)
            return [o is not None and o.t0_stored for o in pending.items]
        if op == P.RESERVE:
            # a client fills one reservation at a time and may hold one more,
            # asked ahead ("keep"); a reserve without "keep" ends all of them,
            # "release" ends those it names (kvfs.arena_puts)
            release = P.arg(args, "release", list, None)
            keep = P.arg(args, "keep", bool, False)
            if release is not None:
                for rid in release:
                    r = conn.reservations.pop(rid, None) if isinstance(rid, int) else None
                    if r is not None:
                        eng.release_arena(*r)
            elif not keep:
                for rest, end in conn.reservations.values():
                    eng.release_arena(rest, end)
                conn.reservations.clear()
            want = P.arg(args, "bytes", int)
            if want <= 0:
                return {"res": 0}  # only the giving back (a client ends a large batch)
            if len(conn.reservations) >= MAX_RESERVATIONS:
                raise InvalidArgument(f"a connection holds at most {MAX_RESERVATIONS} arena reservations")
            off, size = eng.reserve_arena(want)  # memory only
            if off < 0:
                return {"res": 0}
            rid = conn.next_res
            conn.next_res += 1
            conn.reservations[rid] = [off, off + size]
            return {"res": rid, "off": off, "size": size}
        if op == P.PUT_T0:
            return await self._put_t0(conn, args)
        if op == P.ABORT:
            aborted = conn.pending.pop(P.arg(args, "put", int), None)
            if aborted is not None:
                await self._thread(eng.abort_put, aborted)
            return None
        if op == P.VERIFY:
            deep, repair = P.arg(args, "deep", bool, False), P.arg(args, "repair", bool, False)
            await self.settle()  # T0 puts reach the index first
            job = self.jobs.new("verify")
            assert self._nursery is not None
            self._nursery.start_soon(self._thread, self.jobs.run, job,
                                     lambda progress: eng.verify_store(deep, repair, progress))
            return {"job": job.id}
        if op == P.COMPACT:
            threshold = P.arg(args, "threshold", (float, int, type(None)), None)
            stripe = P.arg(args, "stripe", (str, type(None)), None)
            eng.compaction_args(None if threshold is None else float(threshold), stripe)  # errors now, not in the job
            await self.settle()  # T0 write-backs land first: an open segment they write to can then be sealed
            return {"job": self._start_compaction(None if threshold is None else float(threshold), stripe).id}
        if op == P.JOB:
            return self.jobs.status(P.arg(args, "id", int))
        if op == P.EVICT:
            await self.settle()  # what is still being written back cannot be evicted
            ns = P.arg(args, "ns", (str, type(None)), None)
            return await self._thread(eng.evict, P.arg(args, "to", int), ns)
        if op == P.DELETE:
            return await self._thread(eng.delete, P.arg(args, "ns", str), P.arg(args, "keys", list))
        if op in (P.STAT, P.NAMESPACES, P.KEYS):
            await self.settle()  # these read LMDB: let T0 puts reach it first
        if op == P.STAT:
            return await self._thread(eng.stat, P.arg(args, "ns", str), P.arg(args, "key", (str, bytes)))
        if op == P.NAMESPACES:
            return await self._thread(eng.namespaces)
        if op == P.KEYS:
            limit = P.arg(args, "limit", int, 10000)
            if not 1 <= limit <= 100000:
                raise InvalidArgument("limit must be 1-100000")
            after = P.arg(args, "after", (str, type(None)), None)
            if P.arg(args, "long", bool, False):
                objs, more = await self._thread(eng.list_objects, P.arg(args, "ns", str), after, limit)
                return {"keys": [o[0] for o in objs], "objects": objs, "more": more}
            keys, more = await self._thread(eng.keys, P.arg(args, "ns", str), after, limit)
            return {"keys": keys, "more": more}
        if op == P.STATS:
            return await self._thread(self.snapshot)
        if op == P.REPORT:
            return self.connector_stats.add(P.arg(args, "ns", str), P.arg(args, "counters", dict))
        if op == P.FLUSH:
            timeout = float(P.arg(args, "timeout", (int, float), 60.0))
            start = time.monotonic()
            done = await self.settle(timeout)
            if done and eng.remote is not None and P.arg(args, "remote", bool, False):
                done = await self._thread(eng.remote.drain, max(0.0, timeout - (time.monotonic() - start)))
            return done
        if op == P.REPORT_BAD:
            return await self._thread(eng.verify_object, P.arg(args, "ns", str), P.arg(args, "key", str),
                                      P.arg(args, "seq", int, None))
        raise ProtocolError(f"unknown op {op!r}")

    async def _read_through(self, conn: Conn, ns: str, keys: list[Any], lid: int,
                            items: list[Any], want_lease: bool) -> tuple[int, list[Any]]:
        """A lookup's local misses fetched from the shared tier and
        installed, then looked up again (one lease for the whole answer).
        A remote failure leaves them misses (kvfsd.shared_tier)."""
        eng = self.engine
        assert eng.remote is not None
        missing = [i for i, it in enumerate(items) if it is None]
        installed = await self._thread(eng.remote.fetch, normalize_ns(ns),
                                       normalize_keys([keys[i] for i in missing]))
        if not installed:
            return lid, items
        if lid:
            freed = eng.release([lid], conn.id)
            if freed:
                await self._thread(eng.reclaim, freed)
        return eng.lookup(ns, keys, conn.id, lease=want_lease)

    async def settle(self, timeout: float = 30.0) -> bool:
        """Wait until no T0 write-back is pending (every T0 put acknowledged
        before is in T1 and the index). False on timeout."""
        t0 = self.engine.t0
        with trio.move_on_after(timeout):
            while t0 is not None and t0.backlog_objects:
                await trio.sleep(0.002)
            return True
        return False

    async def _prepare(self, ns: str, items: list[list[Any]], t0: bool = False) -> PutPlan:
        """Reserve space; on the loop unless eviction has to run first."""
        try:
            return self.engine.prepare_put(ns, [tuple(it) for it in items], may_evict=False, t0=t0)
        except NeedRoom:
            return await self._thread(partial(self.engine.prepare_put, ns, [tuple(it) for it in items], t0=t0))

    async def _put_t0(self, conn: Conn, args: dict[str, Any]) -> list[int]:
        """A batch the client placed in its arena reservation itself, with
        its checksums: carve, plan the write-back, publish in T0; one
        message for the whole batch (sync: answered once in T1 and the
        index, as any sync put)."""
        eng = self.engine
        r = conn.reservations.get(P.arg(args, "res", int))
        if r is None:
            raise InvalidArgument("no such arena reservation on this connection")
        raw = P.arg(args, "items", list)
        ns = P.arg(args, "ns", str)
        try:
            plan = eng.prepare_placed(ns, raw, r, may_evict=False)
        except NeedRoom:
            plan = await self._thread(partial(eng.prepare_placed, ns, raw, r))
        sync = eng.effective_sync(P.arg(args, "sync", bool, False))
        eng.publish_t0(plan)  # readable from T0 from here on
        if sync:
            stored = await self._thread(eng.write_back, plan, sync)
        else:
            # after the reply: the put is readable and journaled already
            # (a crash from here on leaves it to the journal's replay)
            conn.after_reply.append(partial(eng.queue_write_back, plan))
            stored = [o is not None and o.t0_stored for o in plan.items]
        # per item its sequence number (-1: not stored), which the client's location cache wants
        return [o.seq if ok and o is not None else -1 for o, ok in zip(plan.items, stored)]

    async def _put(self, conn: Conn, args: dict[str, Any], tlen: int) -> list[bool]:
        try:
            ns = P.arg(args, "ns", str)
            items = _items(args)
            sync = P.arg(args, "sync", bool, False)
            if sum(it[1] for it in items) != tlen:
                raise ProtocolError(f"trailer of {tlen} bytes but the items declare {sum(it[1] for it in items)}")
            plan = await self._prepare(ns, items)
        except BaseException:
            await conn.skip(tlen)
            raise
        self.engine.counters["inline_put_bytes"] += tlen  # payload that crossed the socket
        if tlen <= SMALL_PUT:
            return await self._small_put(conn, plan, tlen, sync)
        # One thread hop for the whole value stream: read, write, commit.
        return await self._thread(self._stream_put, conn, plan, tlen, sync)

    async def _small_put(self, conn: Conn, plan: PutPlan, tlen: int, sync: bool) -> list[bool]:
        """Read the (small) values on the loop, then one writer round trip
        writes and publishes them."""
        eng = self.engine
        buf = memoryview(bytearray(tlen))
        try:
            await conn.read_into(buf)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._thread(eng.abort_put, plan)
            raise
        pieces = []
        pos = 0
        for i, op in enumerate(plan.items):
            if op is not None:
                for ci, ch in enumerate(op.chunks):
                    pieces.append((i, ci, buf[pos:pos + ch.length]))
                    pos += ch.length
            else:
                pos += plan.sizes[i]
        return await self._publish(plan, sync, partial(eng.write_chunks, plan, pieces))

    async def _publish(self, plan: PutPlan, sync: bool, before: Callable[[], None]) -> list[bool]:
        """One writer job runs ``before`` (writes), syncs if asked, and
        publishes; the loop awaits it without a thread hop."""
        eng = self.engine
        sync = eng.effective_sync(sync)
        try:
            done = await wait_future(eng.writer.submit(eng.publish_job(plan, sync, before), sync=sync))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._thread(eng.abort_put, plan)
            raise
        result, cand = eng.finish_commit(plan, done)
        if cand:
            await self._thread(eng.reclaim, cand)
        return result

    def _stream_put(self, conn: Conn, plan: PutPlan, tlen: int, sync: bool) -> list[bool]:
        eng = self.engine
        consumed = 0
        try:
            if conn.staging is None:
                conn.staging = bytearray(max(8 << 20, 2 * eng.stripe_unit))
            stage = memoryview(conn.staging)
            pieces: list[tuple[int, int, memoryview]] = []
            pos = 0
            for i, op in enumerate(plan.items):
                if op is None:
                    conn.skip_blocking(plan.sizes[i])
                    consumed += plan.sizes[i]
                    continue
                for ci, ch in enumerate(op.chunks):
                    if pos + ch.length > len(stage):
                        eng.write_chunks(plan, pieces)
                        pieces, pos = [], 0
                    view = stage[pos:pos + ch.length]
                    conn.read_into_blocking(view)
                    consumed += ch.length
                    pieces.append((i, ci, view))
                    pos += ch.length
            if pieces:
                eng.write_chunks(plan, pieces)
            return eng.commit_put(plan, sync)
        except BaseException as e:
            eng.abort_put(plan)
            if isinstance(e, KvfsError) and consumed < tlen:
                conn.skip_blocking(tlen - consumed)  # keep the stream framed
            raise


SMALL_PUT = 1 << 20
REMOTE_GC_EVERY_S = float(os.environ.get("KVFS_REMOTE_GC_EVERY_S", "3600"))
COMPACT_CHECK_S = float(os.environ.get("KVFS_COMPACT_CHECK_S", "10"))  # how often the daemon looks at its dead bytes  # inline puts up to this many bytes are read on the loop


async def wait_future(fut: "Future[Any]") -> Any:
    """Await a concurrent.futures.Future (a writer job) without a thread."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    fut.add_done_callback(lambda _f: token.run_sync_soon(done.set))
    with trio.CancelScope(shield=True):  # the job runs to its end regardless
        await done.wait()
    return fut.result()


def _items(args: dict[str, Any]) -> list[list[Any]]:
    items = P.arg(args, "items", list)
    for it in items:
        if not (isinstance(it, list) and len(it) == 3 and isinstance(it[1], int)
                and not isinstance(it[1], bool) and it[1] >= 0):
            raise ProtocolError("put items are [key, size, meta]")
    return items


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse to steal a live one."""
    if not os.path.exists(path):
        return
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            os.unlink(path)
            return
        raise
    else:
        raise RuntimeError(f"another kvfs daemon is serving {path}")
    finally:
        probe.close()
