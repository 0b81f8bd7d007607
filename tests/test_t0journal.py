"""The T0 journal's records (pure file format): pending = published and not done."""
import pytest

from kvfsd import t0journal
from kvfsd.t0journal import Journal, Pending, read_pending


def pend(key, seq):
    return Pending("ns", key, seq, 10, 4096 * seq, b"s" * 16, [b"c" * 16], None)


def p(key, seq):
    return pend(key, seq).row()


def records_end(path):
    """Where the records end (each whole; then the file is zeros)."""
    raw = path.read_bytes()
    pos = 0
    while pos + t0journal._HEAD.size <= len(raw):
        n, _digest = t0journal._HEAD.unpack_from(raw, pos)
        if not n:
            break
        pos += t0journal._HEAD.size + n
    assert not raw[pos:].strip(b"\0")
    return pos


def test_pending_is_published_minus_done(tmp_path):
    j = Journal(tmp_path / "j")
    j.published([p("a", 1), p("b", 2), p("c", 3)])
    j.done(2)
    j.done(9)  # unknown: ignored
    # "done" is buffered until a flush: unflushed, a crash only writes b to T1 again
    assert sorted(x.key for x in read_pending(tmp_path / "j")) == ["a", "b", "c"]
    j.flush()
    assert sorted(x.key for x in read_pending(tmp_path / "j")) == ["a", "c"]
    j.empty()
    assert read_pending(tmp_path / "j") == []
    j.published([p("d", 4)])
    got = read_pending(tmp_path / "j")
    assert got == [pend("d", 4)]
    j.close()
    assert not (tmp_path / "j").exists()


def test_torn_or_garbled_tail_is_ignored(tmp_path):
    j = Journal(tmp_path / "j")
    j.published([p("a", 1)])
    j.published([p("b", 2)])
    j.close(remove=False)
    raw = (tmp_path / "j").read_bytes()
    (tmp_path / "j").write_bytes(raw[:-3])  # torn last record
    assert [x.key for x in read_pending(tmp_path / "j")] == ["a"]
    (tmp_path / "j").write_bytes(raw[:10] + b"\xff" + raw[11:])  # garbled first record
    assert read_pending(tmp_path / "j") == []
    assert read_pending(tmp_path / "missing") == []


def rows(*ps):
    from kvfs._native_py import journal_row
    return b"".join(journal_row(x.seq, x.size, x.off, x.checksum, x.chunk_sums, x.key, x.meta) for x in ps)


def test_compact_rows_are_pending_until_their_seqs_are_done(tmp_path):
    """The records a daemon writes per batch: "PX" rows made by the
    publication (C or its twin), "DX" seqs made by the write-back; read
    alongside the "PB"/"DB" rows of a rewrite or an older daemon."""
    from kvfs import native
    a = Pending("ns", "a", 1, 10, 4096, b"s" * 16, [b"c" * 16], b'{"m":1}')
    b = Pending("ns", "b\u00e9", 2, 3 << 20, 8192, b"t" * 16, [b"d" * 16, b"e" * 16, b"f" * 16], None)
    c = Pending("other", "c", 3, 0, 0, b"u" * 16, [b"g" * 16], None)
    j = Journal(tmp_path / "j")
    j.published_rows("ns", rows(a, b))
    j.published_rows("other", rows(c))
    j.published([p("d", 4)])
    assert sorted(read_pending(tmp_path / "j"), key=lambda x: x.seq) == [a, b, c, pend("d", 4)]
    j.done_seqs(native.backend.t0_written_back("ns", [], {}, native.backend.T0List(),
                                               native.backend.T0List())[2])  # nothing done: no record
    j.flush()
    j.done_seqs((2).to_bytes(8, "little") + (4).to_bytes(8, "little"))
    j.done(3)
    j.flush()
    assert sorted(read_pending(tmp_path / "j"), key=lambda x: x.seq) == [a]
    j.close()
    # a record whose rows do not parse is skipped whole; the others are read
    bad = Journal(tmp_path / "k")
    bad.published_rows("ns", rows(a)[:-3])
    bad.published_rows("ns", rows(b))
    bad.close(remove=False)
    assert read_pending(tmp_path / "k") == [b]


def test_older_per_put_records_are_read(tmp_path):
    """A journal an older daemon left (one record per put) still gives its pending puts."""
    j = Journal(tmp_path / "j")
    j._append(["P"] + p("a", 1))
    j._append(["P"] + p("b", 2))
    j._append(["D", "ns", "a", 1])
    j.close(remove=False)
    assert read_pending(tmp_path / "j") == [pend("b", 2)]


def test_a_rewrite_keeps_only_what_is_still_owed(tmp_path, monkeypatch):
    monkeypatch.setattr(t0journal, "REWRITE_MIN", 1000)
    monkeypatch.setattr(t0journal, "REWRITE_ROWS", 3)  # several records
    j = Journal(tmp_path / "j")
    for i in range(40):
        j.published([p(f"k{i}", i)])
        j.done(i)
    j.flush()
    assert j.too_long() and records_end(tmp_path / "j") == j.size
    j.done(99)  # buffered: gone with the rewrite, which holds only what it is given
    j.rewrite([p("a", 1), p("b", 2), p("c", 3), p("d", 4)])
    assert not (tmp_path / "j.new").exists()
    assert sorted(x.key for x in read_pending(tmp_path / "j")) == ["a", "b", "c", "d"]
    assert not j.too_long() and j.rewrites == 1 and j.base == j.size == records_end(tmp_path / "j")
    j.published([p("e", 5)])  # appends go to the new file
    j.done(1)
    j.flush()
    assert sorted(x.key for x in read_pending(tmp_path / "j")) == ["b", "c", "d", "e"]
    j.close()
    assert not (tmp_path / "j").exists()


def test_a_rewrite_that_fails_leaves_the_old_journal(tmp_path, monkeypatch):
    j = Journal(tmp_path / "j")
    j.published([p("a", 1), p("b", 2)])

    def full(*_a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(t0journal.os, "rename", full)
    with pytest.raises(OSError):
        j.rewrite([p("b", 2)])
    monkeypatch.undo()
    assert not (tmp_path / "j.new").exists()
    j.published([p("c", 3)])  # still appending to the old file
    assert sorted(x.key for x in read_pending(tmp_path / "j")) == ["a", "b", "c"]
    j.close()


def test_the_engine_rewrites_exactly_the_puts_it_still_owes(tmp_path):
    """A rewrite is made from the mirror's dirty entries: each row must be
    the one its put's publication journaled (sums, arena offset, meta),
    less the puts written back since and those deleted (their "done" was
    written by the delete)."""
    import os

    from kvfs import format as fmt
    from kvfsd.config import Config
    from kvfsd.engine import Engine
    eng = Engine(Config(root=tmp_path / "e", capacity=1 << 30, shm_size=64 << 20).resolve())
    try:
        assert eng.wb_pool is not None and eng.t0 is not None and eng.journal is not None
        eng.wb_pool.stop()  # nothing is written back but what this test writes back
        eng.wb_pool = None
        su = eng.stripe_unit
        plans = []
        for b in range(3):
            vals = [os.urandom(n) for n in (10, 4096, 65536, su + 5)]
            metas = [None, {"layer": b}, None, {"x": "y"}]
            plan = eng.prepare_put("n", [(f"k{b}-{i}", len(v), m) for i, (v, m) in enumerate(zip(vals, metas))],
                                   t0=True)
            arena = eng.t0.arena.view
            for op, v in zip(plan.items, vals):
                arena[op.t0:op.t0 + len(v)] = v
            eng.set_client_sums(plan, [[fmt.checksum(v), [fmt.checksum(v[i:i + su]) for i in range(0, len(v), su)]]
                                       for v in vals])
            eng.publish_t0(plan)
            plans.append(plan)
        published = {(p.ns, p.key): p for p in read_pending(eng.journal.path)}
        assert len(published) == 12 and any(p.meta for p in published.values())
        eng.write_back(plans[0], False)  # done rows, buffered
        assert eng.delete("n", ["k1-2"]) == 1
        with eng._lock:
            eng._rewrite_journal()
        after = {(p.ns, p.key): p for p in read_pending(eng.journal.path)}
        want = {k: v for k, v in published.items() if not k[1].startswith("k0-") and k[1] != "k1-2"}
        assert after == want and eng.journal.rewrites == 1
    finally:
        eng.close()


def test_a_put_after_a_delete_stays_owed_when_the_deleted_one_is_written_back(tmp_path):
    """put k, delete k, put k again, all before any write-back: when the
    first write-back ends it drops its own T0 copy, not the second put's
    dirty entry (it did, and a journal rewrite then left the second put,
    acknowledged, out of what a crash replays)."""
    import os

    from kvfs import format as fmt
    from kvfsd.config import Config
    from kvfsd.engine import Engine
    from kvfsd.index import obj_key
    eng = Engine(Config(root=tmp_path / "e", capacity=1 << 30, shm_size=64 << 20).resolve())
    try:
        assert eng.wb_pool is not None and eng.t0 is not None and eng.journal is not None
        eng.wb_pool.stop()
        eng.wb_pool = None
        plans = []
        for _ in range(2):
            v = os.urandom(5000)
            plan = eng.prepare_put("n", [("k", len(v), None)], t0=True)
            op = plan.items[0]
            eng.t0.arena.view[op.t0:op.t0 + len(v)] = v
            eng.set_client_sums(plan, [[fmt.checksum(v), [fmt.checksum(v)]]])
            eng.publish_t0(plan)
            plans.append(plan)
            if len(plans) == 1:
                assert eng.delete("n", ["k"]) == 1
        second = plans[1].items[0].mem
        eng.write_back(plans[0], False)  # the deleted put: dropped, not published
        ok = obj_key("n", "k")
        assert eng.t0.dirty.items() == [(ok, second)] and eng.lru.get(ok) is second
        with eng._lock:
            eng._rewrite_journal()
        assert [(p.key, p.seq) for p in read_pending(eng.journal.path)] == [("k", second.seq)]
        assert eng.write_back(plans[1], False) == [True]
        assert eng.t0.bytes == 5000 and len(eng.t0.dirty) == 0
    finally:
        eng.close()


def test_records_are_in_the_file_as_soon_as_appended_and_the_mapping_grows(tmp_path, monkeypatch):
    """Appends are stores into a mapping of the file: another process (the
    next daemon, after a kill) reads them at once, with no close or flush;
    the file is allocated ahead in GROW steps and the zeros after the
    records read as their end. ``empty`` zeroes the records of a small
    file and gives a grown one back."""
    monkeypatch.setattr(t0journal, "GROW", 4096)
    j = Journal(tmp_path / "j")
    assert (tmp_path / "j").stat().st_size == 4096 and read_pending(tmp_path / "j") == []
    j.published([p("a", 1)])
    assert [x.key for x in read_pending(tmp_path / "j")] == ["a"]  # no flush, no close
    for i in range(2, 200):  # past several GROW steps
        j.published([p(f"k{i}", i)])
    assert j.cap > 4096 and (tmp_path / "j").stat().st_size == j.cap >= j.size
    assert len(read_pending(tmp_path / "j")) == 199
    j.empty()
    assert read_pending(tmp_path / "j") == [] and (tmp_path / "j").stat().st_size == 4096 == j.cap
    j.published([p("b", 2)])
    j.empty()  # a small file: zeroed in place
    assert (tmp_path / "j").read_bytes() == bytes(4096)
    j.published([p("c", 3)])
    assert [x.key for x in read_pending(tmp_path / "j")] == ["c"]
    j.close()


def test_a_journal_that_cannot_grow_is_an_error_not_a_crash(tmp_path, monkeypatch):
    """/dev/shm full: the allocation ahead of the mapping fails with ENOSPC
    (a store into an unallocated tmpfs page would kill the daemon with
    SIGBUS); what was appended before stays readable."""
    monkeypatch.setattr(t0journal, "GROW", 4096)
    j = Journal(tmp_path / "j")
    j.published([p("a", 1)])

    def full(*_a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(t0journal.os, "posix_fallocate", full)
    with pytest.raises(OSError) as e:
        for i in range(2, 200):
            j.published([p(f"k{i}", i)])
    assert e.value.errno == 28
    monkeypatch.undo()
    got = read_pending(tmp_path / "j")
    assert [x.key for x in got][:1] == ["a"] and len(got) < 199
    j.close()


def test_without_fallocate_the_journal_grows_by_writing_zeros_and_a_rewrite_keeps_its_records(
        tmp_path, monkeypatch):
    """Where the file system has no fallocate the journal allocates by
    writing zeros, and only past what the file already holds: a rewrite's
    records, written before its new file is mapped, stay."""
    import errno as errno_

    def unsupported(*_a):
        raise OSError(errno_.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(t0journal, "GROW", 4096)
    monkeypatch.setattr(t0journal.os, "posix_fallocate", unsupported)
    j = Journal(tmp_path / "j")
    for i in range(100):  # past several GROW steps
        j.published([p(f"k{i}", i)])
    assert len(read_pending(tmp_path / "j")) == 100 and (tmp_path / "j").stat().st_size == j.cap
    j.rewrite([p("a", 1), p("b", 2)])
    assert sorted(x.key for x in read_pending(tmp_path / "j")) == ["a", "b"]
    j.published([p("c", 3)])
    assert sorted(x.key for x in read_pending(tmp_path / "j")) == ["a", "b", "c"]
    j.close()
