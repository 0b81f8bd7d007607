"""make bench-readme: every README block behind a bench marker is rerun by
its command and stamped with the commit and machine; blocks of a machine
not present are left alone; the GPU machine's blocks merge back."""
from pathlib import Path

import pytest

from kvfstools import bench_headline, bench_readme, text_tables
from kvfstools.table import render

REPO = Path(__file__).resolve().parent.parent

README = """# title

<!-- bench: --help -->
```
an old figure
```

text between

<!-- bench: --help @gpu -->
```
the GPU machine's old figure
```

<!-- bench: --version @gpu4 -->
```
a 4-GPU node's old figure
```
"""


def test_blocks_are_rerun_stamped_and_gpu_ones_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_readme, "_gpus", lambda: [])  # a machine without a GPU
    monkeypatch.setenv("KVFS_COMMIT", "abc1234")
    p = tmp_path / "README.md"
    p.write_text(README)
    assert bench_readme.main(["--readme", str(p)]) == 0
    text = p.read_text()
    first = text.split("<!-- bench: --help -->\n```\n")[1].split("```")[0]
    assert "an old figure" not in first and "usage: kvfs" in first  # what `kvfs --help` prints
    assert first.rstrip().splitlines()[-1].startswith(bench_readme.STAMP + "commit abc1234, ")
    assert "the GPU machine's old figure" in text and "text between" in text
    assert "a 4-GPU node's old figure" in text
    assert text.count("```") == README.count("```")


def test_a_node_block_runs_only_where_enough_gpus_are(tmp_path, monkeypatch):
    """@gpu blocks run on a one-GPU machine, @gpu4 ones only on a node of 4 or more."""
    runs = []
    monkeypatch.setattr(bench_readme, "run_block", lambda args: runs.append(args) or f"ran {args}")
    p = tmp_path / "README.md"
    for gpus, want in (([], ["--help"]), (["H200"], ["--help", "--help"]),
                       (["H200"] * 4, ["--help", "--help", "--version"])):
        monkeypatch.setattr(bench_readme, "_gpus", lambda g=gpus: g)
        p.write_text(README)
        runs.clear()
        assert bench_readme.main(["--readme", str(p)]) == 0
        assert runs == want
    assert "ran --version" in p.read_text()


def test_a_failing_block_keeps_its_figures_and_the_others_are_written(tmp_path, monkeypatch):
    """A block whose command fails (a missing extra, say) is left as it was,
    the exit status says so, and the blocks that ran are still written."""
    monkeypatch.setattr(bench_readme, "_gpus", lambda: ["H200"])

    def run(args):
        if args == "--help":
            raise bench_readme.BlockFailed("kvfs --help failed (exit 2)")
        return f"ran {args}"
    monkeypatch.setattr(bench_readme, "run_block", run)
    p = tmp_path / "README.md"
    p.write_text(README.replace("<!-- bench: --help @gpu -->", "<!-- bench: --version @gpu -->"))
    assert bench_readme.main(["--readme", str(p)]) == 1
    text = p.read_text()
    assert "an old figure" in text and "ran --version" in text and "the GPU machine's old figure" not in text


def test_the_gpu_machines_blocks_merge_back(tmp_path, monkeypatch):
    ours, theirs = tmp_path / "README.md", tmp_path / "gpu.md"
    ours.write_text(README)
    theirs.write_text(README.replace("the GPU machine's old figure", "new H200 figure\nsecond line")
                      .replace("an old figure", "not to be taken"))
    assert bench_readme.main(["--readme", str(ours), "--merge", str(theirs)]) == 0
    text = ours.read_text()
    assert "new H200 figure\nsecond line" in text and "an old figure" in text and "not to be taken" not in text
    # a folder: each page takes the blocks of its own copy there (what tools/gpu_machine.sh readme sends back)
    (tmp_path / "gpu" / "docs").mkdir(parents=True)
    page = tmp_path / "docs.md"
    page.write_text(README)
    (tmp_path / "gpu" / "docs.md").write_text(README.replace("the GPU machine's old figure", "from the folder"))
    monkeypatch.chdir(tmp_path)
    assert bench_readme.main(["--page", "docs.md", "--page", "README.md", "--merge", "gpu"]) == 0
    assert "from the folder" in page.read_text() and "new H200 figure" in ours.read_text()
    with pytest.raises(SystemExit, match="one page"):  # a file is the copy of one page, never of several
        bench_readme.main(["--page", "docs.md", "--page", "README.md", "--merge", "gpu/docs.md"])


def test_a_marker_without_a_block_is_an_error(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("<!-- bench: --help -->\nno block\n")
    with pytest.raises(SystemExit, match="fenced block"):
        bench_readme.main(["--readme", str(p)])


# --- the headline tables and the charts, read back from the blocks ---------------------------------


def test_a_rendered_table_reads_back_cell_for_cell():
    rows = [["kvfs T0 get_into", "8192 KiB", "15.91 (0.91)"], ["raw preadv", "64 KiB", "7.97 (1.00)"]]
    text = "a title line\n" + render(["system", "block", "GB/s (x baseline)"], rows) + "\n\nprose after it"
    (t,) = text_tables.tables(text)
    assert t.headers == ["system", "block", "GB/s (x baseline)"] and t.rows == rows
    assert text_tables.number(text, "GB/s (x baseline)", {"system": "raw preadv", "block": "64 KiB"}) == 7.97
    with pytest.raises(text_tables.TableError, match="diskcache"):
        text_tables.cell(text, "GB/s (x baseline)", {"system": "diskcache"})


def _repo_pages():
    return [p.read_text().split("\n") for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]]


def test_the_headline_is_the_blocks_figures_with_their_commits():
    """Every headline table names its block's command and stamp, and its
    figures are that block's cells (here: the host read row, found by hand)."""
    sources = bench_readme.sources(_repo_pages())
    text = bench_headline.headline(sources)
    compare = next(s for s in sources if s.args == "bench --compare")
    # "8192 KiB  1  kvfs T0 get_into  15.91  0.91 x memcpy  1.6 2.8 35.4" in the table by block and threads
    words = next(ln.split() for ln in compare.text.split("\n")
                 if ln.split()[:6] == ["8192", "KiB", "1", "kvfs", "T0", "get_into"])
    gbs, ratio = words[6], words[7]
    assert f"| T0 read (shared memory), verified | {gbs} | {ratio} x memcpy |" in text
    for s in sources:
        if f"`kvfs {s.args}`" in text:
            assert bench_headline._short(s.stamp) in text
    # one table per use, each with its caption
    assert text.count("**") // 2 == len(bench_headline.USES)


def test_the_readme_headline_is_rewritten_and_a_changed_block_stops_the_run(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"# kvfs\n\n{bench_readme.HEAD_BEGIN}\nan old headline\n{bench_readme.HEAD_END}\n")
    (tmp_path / "docs").mkdir()
    bench = tmp_path / "docs" / "benchmarks.md"
    real = (REPO / "docs" / "benchmarks.md").read_text()
    faults = tmp_path / "docs" / "faults.md"
    faults.write_text((REPO / "docs" / "faults.md").read_text())
    # a benchmark whose output lost the row the headline reads
    bench.write_text(real.replace("write: cp into  ", "write: cp onto  "))
    args = ["--page", str(readme), "--page", str(bench), "--page", str(faults), "--headline"]
    assert bench_readme.main(args) == 1
    assert "an old headline" in readme.read_text()
    bench.write_text(real)
    assert bench_readme.main(args) == 0
    text = readme.read_text()
    assert "an old headline" not in text and "| T0 read (shared memory), verified |" in text
    assert text.index(bench_readme.HEAD_BEGIN) < text.index("**Faults**") < text.index(bench_readme.HEAD_END)
    for png in ("throughput.png", "ttft.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
