"""The T0 journal's records (pure file format): pending = published and not done."""
from kvfsd.t0journal import Journal, Pending, read_pending


def pend(key, seq):
    return Pending("ns", key, seq, 10, 4096 * seq, b"s" * 16, [b"c" * 16], None)


def p(key, seq):
    return pend(key, seq).row()


def test_pending_is_published_minus_done(tmp_path):
    j = Journal(tmp_path / "j")
    j.published([p("a", 1), p("b", 2), p("c", 3)])
    j.done("ns", "b", 2)
    j.done("ns", "zz", 9)  # unknown: ignored
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


def test_older_per_put_records_are_read(tmp_path):
    """A journal an older daemon left (one record per put) still gives its pending puts."""
    j = Journal(tmp_path / "j")
    j._append(["P"] + p("a", 1))
    j._append(["P"] + p("b", 2))
    j._append(["D", "ns", "a", 1])
    j.close(remove=False)
    assert read_pending(tmp_path / "j") == [pend("b", 2)]
