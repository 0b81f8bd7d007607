"""make bench-readme: every README block behind a bench marker is rerun by
its command and stamped with the commit and machine; blocks of a machine
not present are left alone; the GPU machine's blocks merge back."""
import pytest

from kvfstools import bench_readme

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


def test_the_gpu_machines_blocks_merge_back(tmp_path):
    ours, theirs = tmp_path / "README.md", tmp_path / "gpu.md"
    ours.write_text(README)
    theirs.write_text(README.replace("the GPU machine's old figure", "new H200 figure\nsecond line")
                      .replace("an old figure", "not to be taken"))
    assert bench_readme.main(["--readme", str(ours), "--merge", str(theirs)]) == 0
    text = ours.read_text()
    assert "new H200 figure\nsecond line" in text and "an old figure" in text and "not to be taken" not in text


def test_a_marker_without_a_block_is_an_error(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("<!-- bench: --help -->\nno block\n")
    with pytest.raises(SystemExit, match="fenced block"):
        bench_readme.main(["--readme", str(p)])
