"""The health of a remote dependency (an S3 bucket, a Redis master): after
a failure it is not asked until a back-off passes (0.25 s, doubling to
10 s); a success ends the outage. An outage is logged once when it starts
and once when it ends, not once a retry."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("kvfsd")


class Backoff:
    def __init__(self, name: str, meanwhile: str):
        self.name = name  # what does not answer, for the log
        self.meanwhile = meanwhile  # what that means until it answers again
        self.until = 0.0
        self.step = 0.0
        self.error = ""
        self.failures = 0

    def down(self) -> bool:
        """Within the back-off: nobody asks."""
        return time.monotonic() < self.until

    def usable(self) -> bool:
        """Answered last time. Once it failed, whoever retries (an uploader,
        a probe) finds out when it is back, so that a client's call waits on
        a timeout once an outage, not once a back-off."""
        return not self.step

    def failed(self, e: BaseException) -> None:
        if not self.step:
            log.warning("%s does not answer (%s: %s); %s", self.name, type(e).__name__, e, self.meanwhile)
        self.step = min(max(self.step * 2, 0.25), 10.0)
        self.until = time.monotonic() + self.step
        self.error = f"{type(e).__name__}: {e}"
        self.failures += 1

    def ok(self) -> None:
        if self.step:
            log.warning("%s answers again", self.name)
        self.step = self.until = 0.0

    def state(self) -> str:
        """Down from a failure until the next success (``down()`` only says
        whether the back-off still keeps callers away)."""
        return f"down: {self.error}" if self.step else "up"
