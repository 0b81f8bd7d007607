"""The shared tier's (T2) object format and names: the one place that knows them.

One kvfs object is one S3 object, self-describing::

    [header][namespace][key][meta][payload]

Header (little-endian, ``HEADER``):

    magic       8s   b"KVFS-T2\\n"
    version     u16  OBJECT_VERSION (this layout)
    records     u16  kvfs.format.FORMAT_VERSION of the node that wrote it
    head_len    u32  bytes before the payload (header + names + meta + head sum)
    size        u64  payload bytes
    checksum    16s  xxh3-128 of the payload: the object's kvfs checksum
    ns_len      u16
    key_len     u16
    meta_len    u32
  then the namespace, the key and the meta (JSON, may be empty), then
    head_sum    u64  xxh3-64 of everything before it

Names. An object's name in the bucket and its presence key both come from
one digest, ``xxh3-128("kvfs-t2\\0" + ns + "\\0" + key)``:

- S3 name ``<prefix>/<d[0:2]>/<d>``: the first two hex digits spread the
  objects over 256 key prefixes, so S3's per-prefix request limits scale
  with them;
- presence key ``kvfs:<tier>:<d>``, where ``tier`` names the bucket and
  prefix (two deployments that share a Redis never see each other's keys).

A digest can collide (xxh3 is not a cryptographic hash); a reader checks
the namespace and key in the header, so a collision is a miss, never wrong
bytes. The payload's checksum is checked on every read-through before the
bytes are installed.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from .format import FORMAT_VERSION
from .format import checksum as payload_checksum

MAGIC = b"KVFS-T2\n"
OBJECT_VERSION = 1
HEADER = struct.Struct("<8sHHIQ16sHHI")
_SUM = struct.Struct("<Q")


class BadObject(ValueError):
    """A remote object that is not a kvfs object, or not the one asked for."""


@dataclass(frozen=True)
class ObjectHead:
    ns: str
    key: str
    size: int
    checksum: bytes
    meta: bytes | None
    head_len: int
    records: int


def digest(ns: str, key: str) -> str:
    return xxhash.xxh3_128_hexdigest(b"kvfs-t2\x00" + ns.encode() + b"\x00" + key.encode())


def object_name(prefix: str, ns: str, key: str) -> str:
    d = digest(ns, key)
    return f"{prefix}/{d[:2]}/{d}" if prefix else f"{d[:2]}/{d}"


def tier_tag(bucket: str, prefix: str) -> str:
    """Eight hex digits that name one shared tier (bucket and prefix)."""
    return xxhash.xxh64_hexdigest(f"{bucket}/{prefix}".encode())[:8]


def presence_key(tag: str, ns: str, key: str) -> bytes:
    return f"kvfs:{tag}:{digest(ns, key)}".encode()


def presence_keys(tag: str, ns: str, keys: list[str]) -> list[bytes]:
    """``presence_key`` of each key (a batch: the namespace's part once)."""
    pre = b"kvfs-t2\x00" + ns.encode() + b"\x00"
    head = f"kvfs:{tag}:".encode()
    h = xxhash.xxh3_128_hexdigest
    return [head + h(pre + k.encode()).encode() for k in keys]


def encode_head(ns: str, key: str, size: int, checksum: bytes, meta: bytes | None) -> bytes:
    """The bytes in front of the payload."""
    nsb, kb, mb = ns.encode(), key.encode(), meta or b""
    if len(checksum) != 16:
        raise ValueError("checksum must be 16 bytes")
    head_len = HEADER.size + len(nsb) + len(kb) + len(mb) + _SUM.size
    body = HEADER.pack(MAGIC, OBJECT_VERSION, FORMAT_VERSION, head_len, size, checksum,
                       len(nsb), len(kb), len(mb)) + nsb + kb + mb
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def head_length(ns: str, key: str, meta: bytes | None) -> int:
    return HEADER.size + len(ns.encode()) + len(key.encode()) + len(meta or b"") + _SUM.size


def decode_head(buf: bytes | memoryview, ns: str, key: str) -> ObjectHead:
    """The head at the start of ``buf``, checked: its own sum, and that it
    is ``ns``/``key``'s. Raises BadObject (also when ``buf`` is too short
    to hold the whole head)."""
    if len(buf) < HEADER.size:
        raise BadObject("shorter than a header")
    magic, version, records, head_len, size, csum, nl, kl, ml = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise BadObject("not a kvfs object (magic)")
    if version != OBJECT_VERSION:
        raise BadObject(f"object format {version}, this kvfs reads {OBJECT_VERSION}")
    if head_len != HEADER.size + nl + kl + ml + _SUM.size or len(buf) < head_len:
        raise BadObject("header length does not add up")
    body = bytes(buf[:head_len - _SUM.size])
    if _SUM.unpack_from(buf, head_len - _SUM.size)[0] != xxhash.xxh3_64_intdigest(body):
        raise BadObject("header checksum mismatch")
    at = HEADER.size
    got_ns, got_key = body[at:at + nl].decode(errors="replace"), body[at + nl:at + nl + kl].decode(errors="replace")
    if got_ns != ns or got_key != key:
        raise BadObject("the object is another key's (digest collision)")
    meta = body[at + nl + kl:at + nl + kl + ml] or None
    return ObjectHead(got_ns, got_key, size, csum, meta, head_len, records)


def check_payload(head: ObjectHead, payload: bytes | memoryview) -> None:
    """Raises BadObject unless ``payload`` is the head's object."""
    if len(payload) != head.size:
        raise BadObject(f"payload of {len(payload)} bytes, the header says {head.size}")
    if payload_checksum(payload) != head.checksum:
        raise BadObject("payload checksum mismatch")
