# fastmoe: every target sets up what it needs on a fresh machine (venv, pinned deps, build).
#   make test   build, then run the layering check, the C++ tests (ctest) and the Python tests (pytest)
#   make demo   train an MoE GPT and its dense baseline for the same time on the fortunes corpus, compare them
#   make lint   ruff and clang-format
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := $(CURDIR)/.venv
VPY := $(VENV)/bin/python
BUILD := $(CURDIR)/build
JOBS ?= 2
STAMP := $(VENV)/.fastmoe-deps
# make demo: each model trains DEMO_SECONDS (evaluation excluded), on the GPU when there is one. One CPU thread:
# fastmoe's CPU routing and permutation kernels are single-threaded, so with more threads the dense model would
# get more of the machine than the MoE model (docs/training.md).
DEMO_SECONDS ?= 150
DEMO_OUT ?= $(CURDIR)/runs/demo
DEMO_ARGS ?=
export TORCH_CUDA_ARCH_LIST ?= 9.0
export PATH := $(VENV)/bin:$(PATH)

.PHONY: venv system-deps configure build test test-cpp test-python check-layering demo lint format clean

$(STAMP): requirements-dev.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	@# The in-tree package is importable from the venv (the build puts _C next to the sources).
	$(VPY) -c "import site; open(site.getsitepackages()[0] + '/fastmoe-dev.pth', 'w').write('$(CURDIR)/python\n')"
	@touch $@

venv: $(STAMP)

system-deps:
	@bash tools/ensure_system_deps.sh

configure: $(STAMP) system-deps
	@if [ ! -f $(BUILD)/build.ninja ]; then \
	  cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	    -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	    -DPython_EXECUTABLE=$(VPY) -DFASTMOE_PYTHON_INPLACE=ON -DFASTMOE_REQUIRE_GTEST=ON; \
	fi

build: configure
	cmake --build $(BUILD) -j $(JOBS)

check-layering:
	@bash tools/check_layering.sh

test-cpp: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

test-python: build
	$(VPY) -m pytest tests -v -p no:cacheprovider

test: check-layering build
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory test-cpp; \
	$(MAKE) --no-print-directory test-python; \
	echo "fastmoe: all tests passed in $$(( $$(date +%s) - start )) s (after the build)"

demo: build
	$(VPY) -m fastmoe.train --time-budget $(DEMO_SECONDS) --threads 1 --out $(DEMO_OUT) $(DEMO_ARGS)

lint: $(STAMP)
	$(VPY) -m ruff check python tests benchmarks examples
	$(VPY) -m ruff format --check python tests benchmarks examples
	@bash tools/clang_format.sh --check

format: $(STAMP)
	$(VPY) -m ruff check --fix python tests benchmarks examples
	$(VPY) -m ruff format python tests benchmarks examples
	@bash tools/clang_format.sh

clean:
	rm -rf $(BUILD) python/fastmoe/_C*.so python/fastmoe/libfastmoe_torch.so*
