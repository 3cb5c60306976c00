# Every target bootstraps .venv and the native build first, so that a fresh
# machine with only python3 needs nothing else. A second run reuses the venv
# and ninja rebuilds only what changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
EDIT   := $(VENV)/.editable-installed
PKGS   := torch numpy pybind11 ninja setuptools wheel pytest pytest-benchmark matplotlib tqdm scikit-learn
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: all venv build demo test test-fast test-peers wheel-check bench scale gpu-check gpu-smoke clean

all: build

$(DEPS): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PKGS)
	touch $@

venv: $(DEPS)

EXT    := $(VENV)/.extension-built

# The first run installs the package in editable mode, which builds the
# extension; later runs rebuild it in place only when a source changed
# (ninja recompiles just the changed files once build/ holds the objects).
$(EDIT): $(DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@ $(EXT)

build: $(EDIT)
	@if [ ! -e $(EXT) ] || [ -n "$$(find csrc setup.py -newer $(EXT) 2>/dev/null | head -n 1)" ]; then \
		echo "rebuilding the extension in place"; \
		$(PY) setup.py -q build_ext --inplace && touch $(EXT); \
	fi

demo: build
	$(PY) -m neuralmem_fast demo $(ARGS)

# TorchRL (with tensordict) for the TorchRL sampler's equivalence tests: an
# optional extra, installed only when pip would keep the installed torch and
# numpy (scripts/install_optional.py asks pip first); without it those tests
# skip. TEST_PEERS=0 skips the attempt.
TEST_PEERS ?= 1
PEERS_TRIED := $(VENV)/.test-peers-tried
$(PEERS_TRIED): $(DEPS)
	@if [ "$(TEST_PEERS)" = "1" ]; then \
		$(PY) scripts/install_optional.py torchrl tensordict && touch $@; \
	fi

# faiss-cpu for the sparse-access index's tests (nn/sparse_index.py): the same
# optional extra, in its own call and stamp so that a venv that already tried
# the replay peers tries it too; without it those tests skip.
FAISS_TRIED := $(VENV)/.test-faiss-tried
$(FAISS_TRIED): $(DEPS)
	@if [ "$(TEST_PEERS)" = "1" ]; then \
		$(PY) scripts/install_optional.py faiss-cpu && touch $@; \
	fi

test-peers: $(PEERS_TRIED) $(FAISS_TRIED)

# The wheel builds, installs into a fresh virtual environment (torch from this
# one, the package only from the wheel) and runs there. CI checks a CPU-only
# wheel (NEURALMEM_NO_CUDA=1): the CUDA sources are compiled by `make build`.
# pip builds in build/ like `make build`, so ninja reuses its objects when the
# flags match (a CPU-only build); after a CUDA build it recompiles the C++
# sources, and the next `make build` recompiles them back.
WHEEL_NO_CUDA ?= 1
wheel-check: $(DEPS)
	NEURALMEM_NO_CUDA=$(WHEEL_NO_CUDA) bash scripts/wheel_check.sh $(PY)

test: build test-peers
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# The replay peers (TorchRL, cpprb) are an optional extra: installed here when
# the registry has them, skipped by the suites otherwise.
PEERS ?= 1
bench: build
	@if [ "$(PEERS)" = "1" ]; then $(PY) -m pip install -q torchrl cpprb || echo "replay peers not installed: their rows will be skipped"; fi
	$(PY) -m neuralmem_fast bench $(if $(QUICK),--quick,) $(ARGS)

scale: build
	$(PY) -m neuralmem_fast scale $(ARGS)

# On a GPU machine that already has torch, triton, ninja and pytest (and no
# network): builds in place with the system python, runs the whole suite on
# CUDA and the GPU benchmarks, and writes logs and the report to $(OUT_DIR).
OUT_DIR ?= gpu-results
gpu-check:
	bash scripts/gpu_check.sh $(OUT_DIR)

# About two minutes on one card, after a build with the CUDA kernels (make
# build or make gpu-check): compute-sanitizer over tiny odd shapes, split-path
# parity and repeatability, indices past 2^31, and a content_read bandwidth
# probe; fails at once without a card or without the CUDA kernels.
# DRY_RUN=1 prints what it would run.
SMOKE_DIR ?= gpu-smoke
gpu-smoke:
	bash scripts/gpu_smoke.sh $(SMOKE_DIR) $(if $(DRY_RUN),--dry-run,)

clean:
	rm -rf build neuralmem_fast/*.so *.egg-info
