"""The on-disk record format: the one place that knows the bytes.

Segment files
-------------
Each stripe directory holds append-only segment files named
``seg-<id:010d>.kvs``. Segment ids are global across stripes and never
reused. A segment is *open* (the daemon appends to it) until it reaches the
size limit, then *sealed*: a sealed segment never changes again until
compaction retires it whole.

Records
-------
A segment is a sequence of records, each starting at an 8-byte boundary,
with zero padding between them::

    [zero pad][header HEADER_SIZE][namespace][key][payload]

Header (little-endian, ``HEADER_STRUCT``):

    magic      4s   b"KVr1"
    version    u8   FORMAT_VERSION
    kind       u8   KIND_CHUNK
    ns_len     u16
    key_len    u16
    reserved   u16  0
    chunk_idx  u32  index of this chunk within the object
    chunk_cnt  u32  number of chunks of the object
    reserved2  u32  0
    length     u64  payload bytes in this record
    obj_size   u64  size of the whole object
    chunk_off  u64  offset of this chunk within the object
    seq        u64  object sequence number (unique per put, a generation)
    checksum   16s  xxh3-128 of the payload
    hdr_sum    u64  xxh3-64 of the header bytes before this field + ns + key

A payload of ``ALIGN_PAYLOAD_MIN`` (64 KiB) or more starts on a 4 KiB
boundary (O_DIRECT and GPUDirect Storage need it): the header is placed at
the last 8-byte boundary that fits before the aligned payload, so the
padding goes in front of it and under 8 zero bytes lie between the names
and the payload (``payload_offset``).

Commit rule
-----------
A record is *published* only by the LMDB index commit that maps the object to
its extents. The payload is written first (and in ``sync`` mode
fdatasync'd), then the index is committed. Bytes in a segment that no index
entry points to are dead; readers never find them.

Recovery rule
-------------
On start, every record the index points into an open segment is re-verified
(header fields, header checksum, payload checksum); objects with any chunk
that fails are dropped from the index, and the file is truncated to the end
of the last verified record. Because several writers may fill reserved
ranges concurrently, an unfinished reservation can leave a hole of zeros (or
garbage) between valid records: holes are dead bytes, and a full scan
(``scan_records``) steps over them by searching for the next header at an
8-byte boundary whose header checksum verifies.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

import xxhash

MAGIC = b"KVr1"
FORMAT_VERSION = 1
KIND_CHUNK = 0

HEADER_STRUCT = struct.Struct("<4sBBHHHIIIQQQQ16sQ")
HEADER_SIZE = HEADER_STRUCT.size
assert HEADER_SIZE == 80, HEADER_SIZE
_HDR_SUM_OFFSET = HEADER_SIZE - 8

RECORD_ALIGN = 8
PAGE = 4096
ALIGN_PAYLOAD_MIN = 64 * 1024
_RA1, _PG1 = RECORD_ALIGN - 1, PAGE - 1
assert not RECORD_ALIGN & _RA1 and not PAGE & _PG1

# Arena (T0) extents: values of ARENA_LARGE_MIN bytes and more start on a
# page (DMA from the arena to a GPU), smaller ones on a cache line; sizes are
# rounded up to the alignment. The daemon's allocator and a client placing
# values in its own reservation (put_t0) both follow ``arena_rounded``.
ARENA_SMALL_ALIGN = 64
ARENA_LARGE_ALIGN = PAGE
ARENA_LARGE_MIN = 64 * 1024


def arena_rounded(n: int) -> tuple[int, int]:
    """(bytes taken, alignment) of an arena extent for a value of ``n`` bytes."""
    a = ARENA_LARGE_ALIGN if n >= ARENA_LARGE_MIN else ARENA_SMALL_ALIGN
    return (max(n, 1) + a - 1) & ~(a - 1), a

DEFAULT_STRIPE_UNIT = 4 * 1024 * 1024
DEFAULT_SEGMENT_SIZE = 1024 * 1024 * 1024


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def segment_name(seg_id: int) -> str:
    return f"seg-{seg_id:010d}.kvs"


def parse_segment_name(name: str) -> int | None:
    if name.startswith("seg-") and name.endswith(".kvs"):
        try:
            return int(name[4:-4])
        except ValueError:
            return None
    return None


def checksum(data: object) -> bytes:
    """xxh3-128 digest (16 bytes) of a bytes-like object."""
    return xxhash.xxh3_128_digest(data)  # type: ignore[arg-type]


def place_record(end: int, ns_len: int, key_len: int, length: int) -> tuple[int, int, int]:
    """Where a record goes when the segment currently ends at ``end``.

    Returns ``(header_offset, payload_offset, new_end)``. Pure arithmetic so
    the reservation and the scanner agree by construction.
    """
    # bit arithmetic (RECORD_ALIGN and PAGE are powers of two): this runs
    # once per chunk put, on the daemon's hot path
    head = HEADER_SIZE + ns_len + key_len
    start = (end + _RA1) & ~_RA1
    if length >= ALIGN_PAYLOAD_MIN:
        hdr = (((start + head + _PG1) & ~_PG1) - head) & ~_RA1
        payload = (hdr + head + _PG1) & ~_PG1  # payload_offset
    else:
        hdr = start
        payload = hdr + head
    return hdr, payload, (payload + length + _RA1) & ~_RA1


def payload_offset(header_offset: int, header_len: int, length: int) -> int:
    """Where a record's payload starts, given where its header starts: right
    after the names, or at the next 4 KiB boundary for large payloads (the
    gap, under 8 bytes, is zeros)."""
    end = header_offset + header_len
    return align_up(end, PAGE) if length >= ALIGN_PAYLOAD_MIN else end


def record_span(ns_len: int, key_len: int, length: int) -> int:
    """Upper bound of the bytes a record may take, padding included."""
    return HEADER_SIZE + ns_len + key_len + length + PAGE + 2 * RECORD_ALIGN


@dataclass(frozen=True)
class RecordHeader:
    ns: str
    key: str
    chunk_idx: int
    chunk_cnt: int
    length: int
    obj_size: int
    chunk_off: int
    seq: int
    checksum: bytes
    kind: int = KIND_CHUNK

    def encode(self) -> bytes:
        """Header + namespace + key, with the header checksum filled in."""
        return encode_header(self.ns.encode() + self.key.encode(), len(self.ns.encode()), self.chunk_idx,
                             self.chunk_cnt, self.length, self.obj_size, self.chunk_off, self.seq, self.checksum,
                             self.kind)


_BODY_STRUCT = struct.Struct(HEADER_STRUCT.format[:-1])  # the header up to its own checksum
_SUM = struct.Struct("<Q")
assert _BODY_STRUCT.size == _HDR_SUM_OFFSET


def encode_header(names: bytes, ns_len: int, chunk_idx: int, chunk_cnt: int, length: int, obj_size: int,
                  chunk_off: int, seq: int, checksum: bytes, kind: int = KIND_CHUNK) -> bytes:
    """``RecordHeader.encode`` without the object: ``names`` is the utf-8
    namespace followed by the key, ``ns_len`` the namespace's part (the
    write-back encodes one header per chunk, so the names are encoded once
    per object)."""
    body = _BODY_STRUCT.pack(MAGIC, FORMAT_VERSION, kind, ns_len, len(names) - ns_len, 0, chunk_idx, chunk_cnt, 0,
                             length, obj_size, chunk_off, seq, checksum)
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body + names)) + names


class BadRecord(ValueError):
    """Bytes that are not a valid record header."""


def decode_header(buf: bytes | memoryview) -> tuple[RecordHeader, int]:
    """Decode a header (+ns+key) at the start of ``buf``.

    Returns the header and its full length (HEADER_SIZE + ns + key). Raises
    BadRecord if the magic, version or header checksum do not match, or if
    ``buf`` is too short.
    """
    if len(buf) < HEADER_SIZE:
        raise BadRecord("short header")
    (magic, version, kind, ns_len, key_len, _r, cidx, ccnt, _r2, length, osize,
     coff, seq, csum, hsum) = HEADER_STRUCT.unpack_from(buf, 0)
    if magic != MAGIC:
        raise BadRecord("bad magic")
    if version != FORMAT_VERSION:
        raise BadRecord(f"unknown format version {version}")
    total = HEADER_SIZE + ns_len + key_len
    if len(buf) < total:
        raise BadRecord("short header")
    names = bytes(buf[HEADER_SIZE:total])
    if xxhash.xxh3_64_intdigest(bytes(buf[:_HDR_SUM_OFFSET]) + names) != hsum:
        raise BadRecord("header checksum mismatch")
    try:
        ns = names[:ns_len].decode()
        key = names[ns_len:].decode()
    except UnicodeDecodeError as e:
        raise BadRecord("undecodable names") from e
    return RecordHeader(ns, key, cidx, ccnt, length, osize, coff, seq, csum, kind), total


MAX_HEADER_READ = HEADER_SIZE + 400 + 800  # ns (<=100 chars) + key (<=200 chars), utf-8


@dataclass(frozen=True)
class ScannedRecord:
    header: RecordHeader
    header_offset: int
    payload_offset: int
    end: int
    payload_ok: bool | None  # None: payload not checked


def scan_records(fd: int, size: int, start: int = 0, *, verify_payload: bool = True) -> Iterator[ScannedRecord]:
    """Walk the records of a segment file, stepping over holes and garbage.

    Used by recovery, verify and index rebuild. A candidate header is
    accepted only if its header checksum verifies and its payload fits in
    the file; otherwise the scan moves on by RECORD_ALIGN bytes. Payload
    bytes of an accepted record are never searched for headers.
    """
    import os

    window = 1 << 20
    pos = align_up(start, RECORD_ALIGN)
    while pos + HEADER_SIZE <= size:
        buf = os.pread(fd, min(window, size - pos), pos)
        final = pos + len(buf) >= size
        i = 0
        resume: int | None = None
        while True:
            j = buf.find(MAGIC, i)
            if j < 0:
                break
            if j % RECORD_ALIGN:
                i = align_up(j, RECORD_ALIGN)
                continue
            if not final and j + MAX_HEADER_READ > len(buf):
                resume = pos + j  # header may straddle the window
                break
            try:
                hdr, hlen = decode_header(buf[j:j + MAX_HEADER_READ])
            except BadRecord:
                i = j + RECORD_ALIGN
                continue
            payload_off = payload_offset(pos + j, hlen, hdr.length)
            end = payload_off + hdr.length
            if end > size:
                i = j + RECORD_ALIGN
                continue
            ok: bool | None = None
            if verify_payload:
                ok = checksum(os.pread(fd, hdr.length, payload_off)) == hdr.checksum
            nxt = align_up(end, RECORD_ALIGN)
            yield ScannedRecord(hdr, pos + j, payload_off, nxt, ok)
            if nxt - pos + HEADER_SIZE <= len(buf):
                i = nxt - pos
                continue
            resume = nxt
            break
        if resume is None:
            if final:
                return
            resume = pos + max(RECORD_ALIGN, (len(buf) - MAX_HEADER_READ) // RECORD_ALIGN * RECORD_ALIGN)
        pos = resume
