#!/usr/bin/env bash
# The GPU tests on a machine with no package index (the lent H200s):
#   tools/gpu_machine.sh fetch   here: the wheels kvfs needs there, into .wheels/ (git-ignored; carry it)
#   tools/gpu_machine.sh test    there: install them, build kvfs._native, run pytest -m gpu
#   tools/gpu_machine.sh bench ARGS   there (after test): kvfs bench ARGS without an install
#   KVFS_COMMIT=<the commit> tools/gpu_machine.sh readme [--only TEXT]   there (after test): the
#       @gpu blocks of README.md and docs/*.md regenerated (tools/bench_readme.py), the pages copied
#       to $OUT; merge them here with python -m kvfstools.bench_readme --merge <that folder>
# The wheels come to about 65 MB (nixl-cu13 alone is 59 MB): with the tree they just fit a
# device call's 64 MiB; carry .wheels and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
fetch)
    mkdir -p .wheels
    for p in lmdb trio outcome sniffio idna kvikio-cu13 libkvikio-cu13 rapids-logger nixl-cu13==1.5.1 nixl==1.5.1; do
        pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .wheels "$p"
    done ;;
test)
    python3 -m pip install -q --no-deps --no-index .wheels/*.whl
    python3 setup.py -q build_ext --inplace
    # the import names of pyproject's package-dir, without an install
    pp=$(mktemp -d); ln -s "$PWD/daemon" "$pp/kvfsd"; ln -s "$PWD/tools" "$pp/kvfstools"; ln -s "$PWD/kvfs" "$pp/kvfs"
    PYTHONPATH="$pp" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_nixl.py "${@:2}" ;;
bench)
    pp=$(mktemp -d); ln -s "$PWD/daemon" "$pp/kvfsd"; ln -s "$PWD/tools" "$pp/kvfstools"; ln -s "$PWD/kvfs" "$pp/kvfs"
    PYTHONPATH="$pp" python3 -m kvfstools.cli bench "${@:2}" ;;
readme)
    pp=$(mktemp -d); ln -s "$PWD/daemon" "$pp/kvfsd"; ln -s "$PWD/tools" "$pp/kvfstools"; ln -s "$PWD/kvfs" "$pp/kvfs"
    PYTHONPATH="$pp" python3 -m kvfstools.bench_readme --gpu-only "${@:2}"
    mkdir -p "${OUT:-.}/docs" && cp README.md "${OUT:-.}/" && cp $(grep -l "^<!-- bench: " docs/*.md) "${OUT:-.}/docs/" ;;
*)
    echo "usage: $0 fetch | test [pytest args] | bench [kvfs bench args] | readme [bench_readme args]" >&2; exit 2 ;;
esac
