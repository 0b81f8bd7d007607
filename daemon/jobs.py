"""Long admin work (verify, compaction) run by the daemon in a worker
thread while it goes on serving: a request starts a job and gets its id;
the client polls the job for progress and, at the end, its result. Jobs
outlive the connection that started them (a disconnected ``kvfs verify``
does not stop a repair half-way). A status request is answered the same
however often it is sent (a client resends it on a new connection when
one is cut), and a finished job is kept until its result has been fetched
or UNFETCHED_S have passed: the daemon's own compactions, which nobody
fetches, come every few seconds under churn and must not push out a
verify whose client is about to poll it (the power-cut campaign's deep
verify was lost so). Past that, the last KEEP finished jobs are kept."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from kvfs.errors import InvalidArgument, KvfsError

KEEP = 32
UNFETCHED_S = 600.0
log = logging.getLogger("kvfsd")


@dataclass
class Job:
    id: int
    kind: str
    state: str = "running"  # running, done, failed
    phase: str = ""
    done: int = 0
    total: int = 0
    result: Any = None
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0
    fetched: bool = False

    def progress(self, phase: str, done: int, total: int) -> None:
        # called from the worker thread; the loop only reads these fields
        self.phase, self.done, self.total = phase, done, total

    def status(self) -> dict[str, Any]:
        out = {"id": self.id, "kind": self.kind, "state": self.state, "phase": self.phase, "done": self.done,
               "total": self.total, "seconds": time.monotonic() - self.started}
        if self.state == "done":
            out["result"] = self.result
        elif self.state == "failed":
            out["error"] = self.error
        return out


class Jobs:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.jobs: dict[int, Job] = {}

    def running(self, kind: str) -> bool:
        return any(j.kind == kind and j.state == "running" for j in self.jobs.values())

    def new(self, kind: str) -> Job:
        if self.running(kind):
            raise InvalidArgument(f"a {kind} job is already running")
        now = time.monotonic()
        finished = [j for j in self.jobs.values() if j.state != "running"]
        for j in finished[:max(0, len(finished) - KEEP + 1)]:
            if j.fetched or now - j.ended > UNFETCHED_S:
                del self.jobs[j.id]
        jid = next(self._ids)
        job = self.jobs[jid] = Job(jid, kind)
        return job

    def run(self, job: Job, fn: Callable[[Callable[[str, int, int], None]], Any]) -> None:
        """Run ``fn(progress)`` to the job's end (in a worker thread)."""
        try:
            job.result = fn(job.progress)
            job.ended = time.monotonic()
            job.state = "done"
        except Exception as e:  # noqa: BLE001 - reported to the client, the daemon goes on
            if not isinstance(e, KvfsError):
                log.exception("%s job %d failed", job.kind, job.id)
            job.ended = time.monotonic()
            job.error, job.state = f"{type(e).__name__}: {e}", "failed"

    def status(self, jid: int) -> dict[str, Any]:
        job = self.jobs.get(jid)
        if job is None:
            raise InvalidArgument(f"no job {jid}")
        if job.state != "running":
            job.fetched = True
        return job.status()
