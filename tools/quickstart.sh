#!/usr/bin/env bash
# Quickstart main job: start the daemon on its embedded defaults
# (root $KVFS_ROOT or ~/.kvfs, socket <root>/kvfs.sock), run the demo that
# stores and reloads KV blocks, print stats, then stop the daemon cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
ROOT="${KVFS_ROOT:-$HOME/.kvfs}"
SOCK="${KVFS_SOCKET:-$ROOT/kvfs.sock}"
LOG="$ROOT.daemon.log"
mkdir -p "$ROOT"
MNT="$ROOT/mnt"
MOUNT=()
if [ -e /dev/fuse ] && { "$BIN/python" -c "import kvfsd._cfuse" 2>/dev/null || "$BIN/python" -c "import pyfuse3" 2>/dev/null; }; then
  MOUNT=(--mount "$MNT")  # the store as files too (/dev/fuse and a mount, C or pyfuse3, are here)
fi
"$BIN/kvfs" daemon "${MOUNT[@]}" >"$LOG" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
# A first start on a fresh machine compiles every module and allocates the
# arena (up to 4 GiB) while the page cache is full of what the install
# wrote: it took more than 10 s here once. Wait up to 2 minutes, and say so
# if the daemon never answers.
ready=0
for _ in $(seq 1200); do
  if "$BIN/python" -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$SOCK" 2>/dev/null; then
    ready=1
    break
  fi
  kill -0 $pid 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.1
done
[ $ready = 1 ] || { echo "kvfs daemon did not answer on $SOCK within 120 s; its log:"; cat "$LOG"; exit 1; }
echo "kvfs daemon pid $pid, store $ROOT, socket $SOCK (log: $LOG)"
"$BIN/kvfs" demo
if [ ${#MOUNT[@]} -gt 0 ]; then
  echo
  echo "The same store mounted at $MNT:"
  ls -l "$MNT" | sed 's/^/  /'
  ns=$(ls "$MNT" | head -1)
  echo "  $ns: $(ls "$MNT/$ns" | wc -l) files, $(du -sh "$MNT/$ns" | cut -f1); e.g. $(ls -l "$MNT/$ns" | sed -n 2p)"
fi
echo
echo "Stopping the daemon (run it yourself with: $BIN/kvfs daemon)."
