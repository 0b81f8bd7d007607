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
"$BIN/kvfs" daemon >"$LOG" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 200); do
  if "$BIN/python" -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$SOCK" 2>/dev/null; then
    break
  fi
  kill -0 $pid 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.05
done
echo "kvfs daemon pid $pid, store $ROOT, socket $SOCK (log: $LOG)"
"$BIN/kvfs" demo
echo
echo "Stopping the daemon (run it yourself with: $BIN/kvfs daemon)."
