"""The control-plane wire protocol (sans-I/O: bytes in, values out).

Every frame is::

    prefix (16 bytes, PREFIX): magic b"KVP1" | u32 message length | u64 trailer length
    message: msgpack
    trailer: raw bytes (only on ``put``: the values, concatenated)

A request message is ``[request_id, op, args]`` with ``args`` a map; a reply
is ``[request_id, STATUS_OK, result]`` or ``[request_id, STATUS_ERR, [code,
text, extra]]``. Request id 0 means "no reply wanted" (used for lease
releases, which are fire-and-forget). Requests on one connection are
answered in order; clients that want concurrency open more connections.

Large puts use ``alloc`` -> the client writes the payloads into the
reserved extents of the segment files itself -> ``commit`` with the
checksums it computed (the daemon then writes the record headers and
publishes). Small puts send the values inline as the trailer of ``put``.

The trailer is streamed: the daemon reads it in stripe-unit pieces and never
holds a whole large value in memory. Its length must equal the sum of the
declared item sizes. Messages are capped at MAX_MESSAGE; a prefix with a bad
magic or an oversized message closes the connection (the stream cannot be
re-synchronised), while a well-framed message with bad contents gets an error
reply and the connection carries on.
"""
from __future__ import annotations

import struct
from typing import Any

import msgpack

from .errors import KvfsError, ProtocolError, from_wire

PROTOCOL_VERSION = 1
MAGIC = b"KVP1"
PREFIX = struct.Struct("<4sIQ")
assert PREFIX.size == 16
MAX_MESSAGE = 16 * 1024 * 1024

STATUS_OK = 0
STATUS_ERR = 1

# ops
HELLO = "hello"
PUT = "put"
LOOKUP = "lookup"
RELEASE = "release"
CONTAINS = "contains"
PREFIX_MATCH = "prefix_match"
DELETE = "delete"
STAT = "stat"
NAMESPACES = "namespaces"
KEYS = "keys"
STATS = "stats"
REPORT_BAD = "report_bad"
ALLOC = "alloc"
COMMIT = "commit"
ABORT = "abort"
TOUCH = "touch"
FLUSH = "flush"
EVICT = "evict"
VERIFY = "verify"  # starts a job
JOB = "job"  # a job's progress, then its result
COMPACT = "compact"  # starts a job
REPORT = "report"  # an engine adapter's counters, shown per namespace in stats
RESERVE = "reserve"  # arena space a client places its own puts in
PUT_T0 = "put_t0"  # a batch of values the client placed in its reservation: one message, one commit
REMOTE_HAS = "remote_has"  # which keys the shared tier (T2) holds: its presence index, one pipelined call
GC_REMOTE = "gc_remote"  # starts a job: remove shared-tier objects by last access

OPS = frozenset({HELLO, PUT, LOOKUP, RELEASE, CONTAINS, PREFIX_MATCH, DELETE,
                 STAT, NAMESPACES, KEYS, STATS, REPORT_BAD, ALLOC, COMMIT, ABORT, TOUCH, FLUSH, EVICT,
                 VERIFY, JOB, COMPACT, REPORT, RESERVE, PUT_T0, REMOTE_HAS, GC_REMOTE})

# ops a client may send again on a new connection when the one it was sent
# on is cut before the reply (a daemon restart): they only read, or do
# nothing the second time that the first did not (put: objects are
# immutable, so a second put of what the first stored is a no-op)
RESENDABLE = frozenset({LOOKUP, CONTAINS, PREFIX_MATCH, STAT, NAMESPACES, KEYS, STATS, JOB, FLUSH, PUT, REMOTE_HAS})


def pack_frame(message: Any, trailer_len: int = 0) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_MESSAGE}-byte limit; send fewer keys per call")
    return PREFIX.pack(MAGIC, len(body), trailer_len) + body


def request(req_id: int, op: str, args: dict[str, Any], trailer_len: int = 0) -> bytes:
    return pack_frame([req_id, op, args], trailer_len)


def reply_ok(req_id: int, result: Any) -> bytes:
    return pack_frame([req_id, STATUS_OK, result])


def reply_err(req_id: int, err: KvfsError) -> bytes:
    return pack_frame([req_id, STATUS_ERR, list(err.to_wire())])


def parse_prefix(prefix: bytes) -> tuple[int, int]:
    """Return (message length, trailer length) or raise ProtocolError."""
    if len(prefix) != PREFIX.size:
        raise ProtocolError("short frame prefix")
    magic, mlen, tlen = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}")
    if mlen > MAX_MESSAGE:
        raise ProtocolError(f"message length {mlen} exceeds {MAX_MESSAGE}")
    return mlen, tlen


def unpack_message(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable message: {e}") from None


def parse_request(body: bytes) -> tuple[int, str, dict[str, Any]]:
    msg = unpack_message(body)
    if not (isinstance(msg, list) and len(msg) == 3):
        raise ProtocolError("a request is [id, op, args]")
    req_id, op, args = msg
    if not isinstance(req_id, int) or isinstance(req_id, bool) or not 0 <= req_id < 2**63:
        raise ProtocolError("request id must be a non-negative integer")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    if not isinstance(args, dict):
        raise ProtocolError("request args must be a map")
    return req_id, op, args


def parse_reply(body: bytes) -> tuple[int, Any]:
    """Return (request id, result), raising the daemon's error if it failed."""
    msg = unpack_message(body)
    if not (isinstance(msg, list) and len(msg) == 3):
        raise ProtocolError("a reply is [id, status, body]")
    req_id, status, payload = msg
    if status == STATUS_OK:
        return req_id, payload
    if status == STATUS_ERR and isinstance(payload, list) and len(payload) == 3:
        raise from_wire(str(payload[0]), str(payload[1]), payload[2] if isinstance(payload[2], dict) else {})
    raise ProtocolError(f"bad reply status {status!r}")


# -- argument checking helpers shared by the daemon's handlers ------------------

def arg(args: dict[str, Any], name: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in args:
        if default is ...:
            raise ProtocolError(f"missing argument {name!r}")
        return default
    v = args[name]
    if isinstance(v, bool) and typ is int:
        raise ProtocolError(f"argument {name!r} must be int")
    if not isinstance(v, typ):
        raise ProtocolError(f"argument {name!r} must be {getattr(typ, '__name__', typ)}, got {type(v).__name__}")
    return v
