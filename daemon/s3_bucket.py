"""The shared tier's bytes: one S3 bucket (AWS S3, MinIO, Ceph RGW,
SeaweedFS), through obstore.

Why obstore: its requests run in Rust with the GIL released, a ranged GET
of several parts runs them concurrently in one call, and a PUT takes
``If-None-Match: *`` (``mode="create"``). ``kvfs bench --remote`` measures
it against boto3 on the same objects.

Credentials come from the usual AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``) or from a
credentials file (``--remote-credentials``, the AWS INI format); with
neither, requests go unsigned (a bucket open to this node). They are never
logged: ``describe()`` names where they came from, not what they are.

Invariants:
- a PUT never replaces an object (``If-None-Match: *``): a second node
  writing the same key is a no-op, answered ``False``;
- every failure other than "not found" or "already there" raises
  ``RemoteError`` with a reason; a read's timeout and retries are short,
  so an outage costs a caller at most about ``timeout`` (uploads, in the
  background, get longer).
"""
from __future__ import annotations

import configparser
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from kvfs.errors import InvalidArgument, KvfsError


UPLOAD_TIMEOUT = 120.0  # seconds for one PUT (a whole object)


class RemoteError(KvfsError):
    """The shared tier did not answer as it should (outage, timeout, 5xx)."""


@dataclass(frozen=True)
class RemoteListing:
    name: str
    size: int
    modified: float  # unix seconds


def parse_remote_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at its ends)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise InvalidArgument(f"--remote takes s3://bucket[/prefix], not {url!r}")
    return parts.netloc, parts.path.strip("/")


def _credentials(path: Path | None) -> tuple[dict[str, str], str]:
    """The signing config and where it came from (never the secrets)."""
    if path is not None:
        ini = configparser.ConfigParser()
        if not ini.read(path):
            raise InvalidArgument(f"--remote-credentials: cannot read {path}")
        profile = os.environ.get("AWS_PROFILE", "default")
        if profile not in ini:
            raise InvalidArgument(f"--remote-credentials: {path} has no [{profile}] section")
        sec = ini[profile]
        if "aws_access_key_id" not in sec or "aws_secret_access_key" not in sec:
            raise InvalidArgument(f"--remote-credentials: [{profile}] in {path} lacks the key id or secret")
        cfg = {"access_key_id": sec["aws_access_key_id"], "secret_access_key": sec["aws_secret_access_key"]}
        if "aws_session_token" in sec:
            cfg["token"] = sec["aws_session_token"]
        return cfg, f"file {path} [{profile}]"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return {}, "environment"  # obstore reads the AWS_* variables itself
    return {"skip_signature": "true"}, "none (unsigned requests)"


class Bucket:
    def __init__(self, url: str, *, endpoint: str | None = None, credentials: Path | None = None,
                 timeout: float = 5.0, region: str | None = None):
        import obstore
        from obstore.store import S3Store

        self._ob = obstore
        self.url = url
        self.bucket, self.prefix = parse_remote_url(url)
        self.endpoint = endpoint
        cfg, self.credential_source = _credentials(credentials)
        if endpoint:
            cfg["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                cfg["virtual_hosted_style_request"] = "false"
        cfg.setdefault("region", region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or "us-east-1")
        def store(seconds: float) -> Any:
            client: dict[str, Any] = {"timeout": datetime.timedelta(seconds=seconds),
                                      "connect_timeout": datetime.timedelta(seconds=min(timeout, 1.0)),
                                      "allow_http": bool(endpoint and endpoint.startswith("http://"))}
            retry: Any = {"max_retries": 1, "retry_timeout": datetime.timedelta(seconds=seconds),
                          "backoff": {"init_backoff": datetime.timedelta(milliseconds=50),
                                      "max_backoff": datetime.timedelta(milliseconds=500)}}
            return S3Store(self.bucket, config=cfg, client_options=client, retry_config=retry)  # type: ignore[arg-type]
        # reads (a client may wait on them) get ``timeout``; uploads run in the
        # background and send whole objects (an LMCache chunk is 32 MiB, S3
        # takes 5 GiB in one PUT), so they get UPLOAD_TIMEOUT
        self.store = store(timeout)
        self.upload_store = store(max(timeout, UPLOAD_TIMEOUT))
        from obstore.exceptions import AlreadyExistsError
        self._exists_error = AlreadyExistsError

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "endpoint": self.endpoint, "credentials": self.credential_source}

    def _fail(self, what: str, name: str, e: BaseException) -> RemoteError:
        return RemoteError(f"S3 {what} of {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")

    def put_new(self, name: str, data: Any) -> bool:
        """Upload ``data`` (a buffer) as one object unless ``name`` exists.
        True: uploaded; False: it was there (another node wrote it)."""
        try:
            self._ob.put(self.upload_store, name, data, mode="create", use_multipart=False)
            return True
        except self._exists_error:
            return False
        except Exception as e:  # noqa: BLE001 - every other failure is an outage to the caller
            raise self._fail("PUT", name, e) from None

    def get(self, name: str, length: int | None, part: int) -> memoryview | None:
        """The object's bytes (None: not there). With its ``length`` known,
        parts of ``part`` bytes are fetched concurrently (ranged GETs)."""
        try:
            if length is None or length <= part:
                return memoryview(self._ob.get(self.store, name).bytes())  # no copy: obstore's own buffer
            n = -(-length // part)  # equal ranges, so no small tail request
            starts = [length * i // n for i in range(n)]
            ends = starts[1:] + [length]
            pieces = self._ob.get_ranges(self.store, name, starts=starts, ends=ends, coalesce=0)
            if sum(len(p) for p in pieces) != length:
                raise RemoteError(f"S3 GET of {name}: ranges came back short")
            return memoryview(b"".join(pieces))
        except FileNotFoundError:
            return None
        except RemoteError:
            raise
        except Exception as e:  # noqa: BLE001
            if "416" in str(e) or "Range Not Satisfiable" in str(e):
                raise RemoteError(f"S3 GET of {name}: shorter than the presence index says") from None
            raise self._fail("GET", name, e) from None

    def head(self, name: str) -> int | None:
        """The object's length, None if it is not there."""
        try:
            return int(self._ob.head(self.store, name)["size"])
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise self._fail("HEAD", name, e) from None

    def delete(self, name: str) -> None:
        try:
            self._ob.delete(self.store, name)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise self._fail("DELETE", name, e) from None

    def listing(self) -> Iterator[list[RemoteListing]]:
        """Every object under the prefix, a page at a time."""
        try:
            for page in self._ob.list(self.store, prefix=self.prefix or None):
                yield [RemoteListing(m["path"], int(m["size"]), m["last_modified"].timestamp()) for m in page]
        except Exception as e:  # noqa: BLE001
            raise self._fail("LIST", self.prefix or "/", e) from None
