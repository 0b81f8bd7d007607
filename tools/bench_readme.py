"""`make bench-readme`: regenerate the benchmark output blocks of README.md
and docs/*.md, then the README's headline tables and the charts in docs/.

A block is a fenced code block right after a marker line::

    <!-- bench: ARGS -->          run here (the CPU machine)
    <!-- bench: ARGS @gpu -->     run only where CUDA is (the GPU machine)
    <!-- bench: ARGS @gpu4 -->    run only where at least 4 GPUs are (a node)

ARGS are ``kvfs`` arguments (``bench --puts``, ``demo-ttft --tokens
32768``). The block becomes what that command prints on stdout, then one
line saying the commit (``+changes`` for a dirty tree), the machine and the
date it ran on. So every such figure comes from one command, names the
commit it was measured at, and goes stale visibly.

Then the README's headline (between its ``<!-- headline ... -->`` and
``<!-- /headline -->`` lines) is rewritten from those blocks
(``kvfstools.bench_headline``: one short table per use, each naming its
block's command and stamp), and the charts in docs/ are drawn from them
(``kvfstools.bench_charts``). Neither holds a figure of its own.

    python -m kvfstools.bench_readme                 every block this machine can run
    python -m kvfstools.bench_readme --only puts     blocks whose ARGS contain "puts"
    python -m kvfstools.bench_readme --list          the blocks, and what each last ran at
    python -m kvfstools.bench_readme --headline      no block: the headline and charts only
    python -m kvfstools.bench_readme --merge DIR     take the @gpu blocks from DIR, a copy of the
                                                     pages the GPU machine regenerated
                                                     (tools/gpu_machine.sh readme)

Blocks of a machine not present are left as they are and listed as
skipped (``--list`` shows each block's commit: a block older than the data
path is stale until such a machine reruns it).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvfs.errors import MissingDependency

from .bench_charts import draw
from .bench_headline import STAMPS, Source, headline
from .bench_util import commit
from .text_tables import TableError

MARK = re.compile(r"^<!-- bench: (?P<args>.+?)(?: @gpu(?P<gpus>\d*))? -->$")
STAMP = STAMPS[0]  # a block's last line: what made it
HEAD_BEGIN = "<!-- headline: made by make bench-readme from the blocks in docs/; edits here are overwritten -->"
HEAD_END = "<!-- /headline -->"


@dataclass
class Block:
    args: str
    gpus: int  # GPUs the machine needs: 0 a CPU block, 1 an @gpu one, N an @gpuN one
    start: int  # the line index of the opening fence
    end: int  # the line index of the closing fence


def find_blocks(lines: list[str]) -> list[Block]:
    out = []
    for i, line in enumerate(lines):
        m = MARK.match(line.strip())
        if not m:
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            raise SystemExit(f"README line {i + 1}: a bench marker must be followed by a fenced block")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise SystemExit(f"README line {i + 2}: unclosed fenced block")
        gpus = 0 if m.group("gpus") is None else int(m.group("gpus") or 1)
        out.append(Block(m.group("args"), gpus, i + 1, end))
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = _gpu_name()
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB" + (f", {gpu}" if gpu else "")


def _gpus() -> list[str]:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [n.strip() for n in r.stdout.splitlines() if n.strip()] if r.returncode == 0 else []


def _gpu_name() -> str | None:
    names = _gpus()
    return f"{len(names)} x {names[0]}" if names else None


class BlockFailed(Exception):
    """A block's command failed: its figures stay as they were."""


def run_block(args: str) -> str:
    """What ``kvfs ARGS`` prints on stdout (its progress goes to stderr, shown)."""
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kvfstools.cli", *shlex.split(args)], stdout=subprocess.PIPE,
                       text=True)
    if r.returncode != 0:
        raise BlockFailed(f"kvfs {args} failed (exit {r.returncode})")
    print(f"  kvfs {args}: {time.monotonic() - t:.0f} s", file=sys.stderr)
    body = [line.rstrip() for line in r.stdout.rstrip().splitlines()]
    return "\n".join(body + [f"{STAMP}commit {commit()}, {machine()}, {time.strftime('%Y-%m-%d')}"])


def default_pages() -> list[Path]:
    """README.md and every page under docs/ (the blocks live in docs/benchmarks.md and docs/faults.md)."""
    return [Path("README.md")] + sorted(Path("docs").glob("*.md"))


def _body(lines: list[str], b: Block) -> str:
    return "\n".join(lines[b.start + 1:b.end])


def sources(pages: list[list[str]]) -> list[Source]:
    """Every block of the pages, as the headline and the charts read them."""
    return [Source(b.args, b.gpus, _body(lines, b)) for lines in pages for b in find_blocks(lines)]


def write_headline(pages: dict[Path, list[str]]) -> list[str]:
    """The headline tables between the markers of the page that has them,
    and the charts into the docs/ folder beside it, from every page's blocks.
    Returns what could not be made (each a line for the user)."""
    blocks = sources(list(pages.values()))
    problems = []
    for path, lines in pages.items():
        if HEAD_BEGIN not in lines:
            continue
        try:
            begin, end = lines.index(HEAD_BEGIN), lines.index(HEAD_END)
        except ValueError:
            raise SystemExit(f"{path}: {HEAD_BEGIN} without {HEAD_END}") from None
        try:
            lines[begin + 1:end] = ["", headline(blocks), ""]
        except TableError as e:
            problems.append(f"the headline of {path} was left as it was: {e}")
        try:
            for png in draw(blocks, path.parent / "docs"):
                print(f"  drew {png}", file=sys.stderr)
        except (TableError, MissingDependency) as e:
            problems.append(f"the charts were not drawn: {e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_readme", description=__doc__.split("\n\n")[0])
    p.add_argument("--page", "--readme", dest="pages", action="append", type=Path, default=[], metavar="FILE",
                   help="a page with bench blocks (repeatable; default README.md and docs/*.md)")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="only blocks whose arguments contain TEXT (repeatable)")
    p.add_argument("--list", action="store_true", help="list the blocks and what each last ran at")
    p.add_argument("--merge", metavar="PATH", type=Path,
                   help="take the @gpu blocks (or --which) from this copy of the tree (a folder), or of the one page")
    p.add_argument("--which", choices=["gpu", "cpu", "all"], default="gpu", help="the blocks --merge takes")
    p.add_argument("--gpu-only", action="store_true",
                   help="only the @gpu blocks (on the GPU machine; no headline or charts there)")
    p.add_argument("--headline", action="store_true",
                   help="run no block: only the README's headline tables and the charts, from the blocks as they are")
    a = p.parse_args(argv)
    paths = a.pages or default_pages()
    pages = {path: path.read_text().split("\n") for path in paths}
    blocks = {path: find_blocks(lines) for path, lines in pages.items()}
    if a.list:
        for path, lines in pages.items():
            for b in blocks[path]:
                kind = "cpu" if not b.gpus else "gpu" if b.gpus == 1 else f"gpu{b.gpus}"
                print(f"{kind:5s} kvfs {b.args}  ({path})\n      {Source(b.args, b.gpus, _body(lines, b)).stamp}")
        return 0
    new: dict[tuple[Path, int], str] = {}  # (page, block index) -> its new body
    if a.merge:
        wanted = {"gpu": {True}, "cpu": {False}, "all": {True, False}}[a.which]
        if not a.merge.is_dir() and len(paths) != 1:
            raise SystemExit("--merge FILE takes the blocks of one page: name it with --page (or merge a folder)")
        for path in paths:
            other = a.merge / path if a.merge.is_dir() else a.merge
            if not other.is_file():
                continue
            theirs_lines = other.read_text().split("\n")
            theirs = {(b.args, b.gpus): _body(theirs_lines, b) for b in find_blocks(theirs_lines)
                      if bool(b.gpus) in wanted}
            for i, b in enumerate(blocks[path]):
                if (b.args, b.gpus) in theirs:
                    new[(path, i)] = theirs[(b.args, b.gpus)]
    failed: list[str] = []
    if not a.merge and not a.headline:
        have = len(_gpus())
        for path in paths:
            for i, b in enumerate(blocks[path]):
                if a.only and not any(t in b.args for t in a.only):
                    continue
                if a.gpu_only and not b.gpus:
                    continue
                if b.gpus > have:
                    print(f"  skipped (needs {b.gpus} GPU(s), {have} here): kvfs {b.args}", file=sys.stderr)
                    continue
                try:
                    new[(path, i)] = run_block(b.args)
                except BlockFailed as e:  # the others' figures are still worth keeping (an hour's run)
                    print(f"  {e}: its block is left as it was", file=sys.stderr)
                    failed.append(b.args)
    for path, i in sorted(new, reverse=True):  # from the end: earlier line numbers stay right
        b = blocks[path][i]
        pages[path][b.start + 1:b.end] = new[(path, i)].split("\n")
    problems = [] if a.gpu_only else write_headline(pages)
    for path, lines in pages.items():
        path.write_text("\n".join(lines))
    print(f"{len(new)} of {sum(map(len, blocks.values()))} blocks regenerated in "
          + ", ".join(str(pth) for pth in paths), file=sys.stderr)
    if failed:
        print(f"{len(failed)} failed, left as they were: " + "; ".join(f"kvfs {x}" for x in failed), file=sys.stderr)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
