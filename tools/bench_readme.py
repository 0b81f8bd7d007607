"""`make bench-readme`: regenerate the README's benchmark output blocks.

A block is a fenced code block right after a marker line::

    <!-- bench: ARGS -->          run here (the CPU machine)
    <!-- bench: ARGS @gpu -->     run only where CUDA is (the GPU machine)
    <!-- bench: ARGS @gpu4 -->    run only where at least 4 GPUs are (a node)

ARGS are ``kvfs`` arguments (``bench --puts``, ``demo-ttft --tokens
32768``). The block becomes what that command prints on stdout, then one
line saying the commit (``+changes`` for a dirty tree), the machine and the
date it ran on. So every such figure in the README comes from one command,
names the commit it was measured at, and goes stale visibly.

    python -m kvfstools.bench_readme                 every block this machine can run
    python -m kvfstools.bench_readme --only puts     blocks whose ARGS contain "puts"
    python -m kvfstools.bench_readme --list          the blocks, and what each last ran at
    python -m kvfstools.bench_readme --merge OTHER   take the @gpu blocks from OTHER (a README
                                                     the GPU machine regenerated)
    ... --readme COPY, then --merge COPY --which cpu  the same for a run on a copy (the README
                                                     stays free to edit meanwhile)

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

from .bench_util import commit

MARK = re.compile(r"^<!-- bench: (?P<args>.+?)(?: @gpu(?P<gpus>\d*))? -->$")
STAMP = "# made by make bench-readme: "


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_readme", description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", default="README.md")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="only blocks whose arguments contain TEXT (repeatable)")
    p.add_argument("--list", action="store_true", help="list the blocks and what each last ran at")
    p.add_argument("--merge", metavar="README", help="take the @gpu blocks (or --which) from this README")
    p.add_argument("--which", choices=["gpu", "cpu", "all"], default="gpu", help="the blocks --merge takes")
    p.add_argument("--gpu-only", action="store_true", help="only the @gpu blocks (on the GPU machine)")
    a = p.parse_args(argv)
    path = Path(a.readme)
    lines = path.read_text().split("\n")
    blocks = find_blocks(lines)
    if a.list:
        for b in blocks:
            stamp = next((ln for ln in lines[b.start + 1:b.end] if ln.startswith(STAMP)), STAMP + "never")
            kind = "cpu" if not b.gpus else "gpu" if b.gpus == 1 else f"gpu{b.gpus}"
            print(f"{kind:5s} kvfs {b.args}\n      {stamp[len(STAMP):]}")
        return 0
    new: dict[int, str] = {}  # block index -> its new body
    if a.merge:
        other = Path(a.merge).read_text().split("\n")
        wanted = {"gpu": {True}, "cpu": {False}, "all": {True, False}}[a.which]
        theirs = {(b.args, b.gpus): "\n".join(other[b.start + 1:b.end]) for b in find_blocks(other)
                  if bool(b.gpus) in wanted}
        for i, b in enumerate(blocks):
            if (b.args, b.gpus) in theirs:
                new[i] = theirs[(b.args, b.gpus)]
    failed: list[str] = []
    if not a.merge:
        have = len(_gpus())
        for i, b in enumerate(blocks):
            if a.only and not any(t in b.args for t in a.only):
                continue
            if a.gpu_only and not b.gpus:
                continue
            if b.gpus > have:
                print(f"  skipped (needs {b.gpus} GPU(s), {have} here): kvfs {b.args}", file=sys.stderr)
                continue
            try:
                new[i] = run_block(b.args)
            except BlockFailed as e:  # the others' figures are still worth keeping (an hour's run)
                print(f"  {e}: its block is left as it was", file=sys.stderr)
                failed.append(b.args)
    for i in sorted(new, reverse=True):  # from the end: earlier line numbers stay right
        b = blocks[i]
        lines[b.start + 1:b.end] = new[i].split("\n")
    path.write_text("\n".join(lines))
    print(f"{len(new)} of {len(blocks)} blocks regenerated in {path}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} failed, left as they were: " + "; ".join(f"kvfs {x}" for x in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
