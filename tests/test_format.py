"""The record format: encoding, placement arithmetic and the scanner."""
import os

import pytest

from kvfs import format as fmt


def _hdr(ns="ns", key="k", length=10, seq=7, idx=0, cnt=1):
    return fmt.RecordHeader(ns, key, idx, cnt, length, length, 0, seq, fmt.checksum(b"x" * length))


def test_header_round_trip():
    h = _hdr(key="ключ", length=123)
    raw = h.encode()
    got, n = fmt.decode_header(raw)
    assert got == h and n == len(raw) == fmt.HEADER_SIZE + 2 + len("ключ".encode())


@pytest.mark.parametrize("pos", [0, 5, 20, fmt.HEADER_SIZE + 1])
def test_header_detects_any_flipped_byte(pos):
    raw = bytearray(_hdr().encode())
    raw[pos] ^= 0x40
    with pytest.raises(fmt.BadRecord):
        fmt.decode_header(bytes(raw))


@pytest.mark.parametrize("length", [0, 1, 4095, 65535, 65536, 1 << 22])
def test_place_record_alignment(length):
    for end in (0, 8, 100, 4088, 4089, 4096, 70000, (1 << 33) + 4095):
        hdr, pay, new_end = fmt.place_record(end, 3, 40, length)
        assert hdr >= end and hdr % fmt.RECORD_ALIGN == 0
        if length >= fmt.ALIGN_PAYLOAD_MIN:
            assert pay % fmt.PAGE == 0 and 0 <= pay - (hdr + fmt.HEADER_SIZE + 43) < fmt.RECORD_ALIGN
        else:
            assert pay == hdr + fmt.HEADER_SIZE + 43
        assert pay == fmt.payload_offset(hdr, fmt.HEADER_SIZE + 43, length)  # where the scanner looks
        assert new_end >= pay + length and new_end % fmt.RECORD_ALIGN == 0
        assert new_end - end <= fmt.record_span(3, 40, length)


def _write_records(path, specs, holes=()):
    """Write records like the daemon does; return their placements."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    end, out = 0, []
    for i, (key, data) in enumerate(specs):
        if i in holes:
            end += 4096 + 13  # a reservation that was never written
        hdr, pay, new = fmt.place_record(end, 2, len(key), len(data))
        h = fmt.RecordHeader("ns", key, 0, 1, len(data), len(data), 0, i, fmt.checksum(data))
        os.pwrite(fd, h.encode(), hdr)
        os.pwrite(fd, data, pay)
        out.append((hdr, pay, new))
        end = new
    os.ftruncate(fd, end)
    return fd, end, out


def test_scan_steps_over_holes_and_garbage(tmp_path):
    specs = [(f"key{i}", os.urandom(n)) for i, n in enumerate([10, 70000, 0, 300, 1 << 20, 5])]
    fd, size, placed = _write_records(tmp_path / "seg", specs, holes={1, 4})
    # garbage that contains the magic inside a hole must not be taken for a record
    os.pwrite(fd, fmt.MAGIC + os.urandom(200), placed[0][2])
    recs = list(fmt.scan_records(fd, size))
    assert [r.header.key for r in recs] == [k for k, _ in specs]
    assert all(r.payload_ok for r in recs)
    assert [r.payload_offset for r in recs] == [p[1] for p in placed]


def test_scan_reports_payload_corruption(tmp_path):
    specs = [("a", os.urandom(100)), ("b", os.urandom(100))]
    fd, size, placed = _write_records(tmp_path / "seg", specs)
    at = placed[0][1] + 3  # flipped, not overwritten: a constant byte matches random data 1 time in 256
    os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
    recs = list(fmt.scan_records(fd, size))
    assert [(r.header.key, r.payload_ok) for r in recs] == [("a", False), ("b", True)]


def test_scan_many_small_records_crosses_windows(tmp_path):
    specs = [(f"k{i}", os.urandom(3000)) for i in range(800)]  # > 2 MiB: several scan windows
    fd, size, _ = _write_records(tmp_path / "seg", specs)
    assert [r.header.key for r in fmt.scan_records(fd, size, verify_payload=False)] == [k for k, _ in specs]


def test_truncated_tail_is_not_a_record(tmp_path):
    specs = [("a", os.urandom(100)), ("b", os.urandom(5000))]
    fd, size, placed = _write_records(tmp_path / "seg", specs)
    os.ftruncate(fd, placed[1][1] + 100)  # cut b's payload
    assert [r.header.key for r in fmt.scan_records(fd, placed[1][1] + 100)] == ["a"]
