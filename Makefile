# fastmoe: every target sets up what it needs on a fresh machine (venv, pinned deps, build).
#   make test   build, then run the layering check, the C++ tests (ctest) and the Python tests (pytest)
#   make demo   train an MoE GPT and its dense baseline for the same time on the fortunes corpus, compare them
#   make lint   ruff and clang-format
#   make test-sanitize   the torch-free C++ kernel tests under AddressSanitizer + UndefinedBehaviorSanitizer
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := $(CURDIR)/.venv
VPY := $(VENV)/bin/python
BUILD := $(CURDIR)/build
SANITIZE_BUILD := $(CURDIR)/build-asan
# GoogleTest binaries of make test-sanitize; SANITIZE_TESTS="test_kernels test_nn" adds the C++ modules (libtorch
# itself is not instrumented), which costs a sanitized build of libfastmoe_torch (docs/reliability.md).
SANITIZE_TESTS ?= test_kernels
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

.PHONY: venv system-deps configure build test test-cpp test-python test-sanitize check-layering demo lint format clean

$(STAMP): requirements-dev.txt requirements-cutlass.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	$(VPY) -m pip install -q --no-deps -r requirements-cutlass.txt
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

# A second, CPU-only build of the torch-free kernels and their GoogleTest binary with ASan + UBSan (-O1, so it
# compiles in about a minute on two cores); every finding, a leak included, fails the run.
test-sanitize: $(STAMP) system-deps
	@start=$$(date +%s); \
	if [ ! -f $(SANITIZE_BUILD)/build.ninja ]; then \
	  cmake -S . -B $(SANITIZE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
	    -DCMAKE_PREFIX_PATH="$$($(VPY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	    -DFASTMOE_SANITIZE=ON -DFASTMOE_CUDA=OFF -DFASTMOE_BUILD_PYTHON=OFF -DFASTMOE_REQUIRE_GTEST=ON >/dev/null; \
	fi; \
	cmake --build $(SANITIZE_BUILD) -j $(JOBS) --target $(SANITIZE_TESTS); \
	for test in $(SANITIZE_TESTS); do \
	  ASAN_OPTIONS=detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_string_checks=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    $(SANITIZE_BUILD)/tests/cpp/$$test --gtest_brief=1; \
	done; \
	echo "fastmoe: $(SANITIZE_TESTS) clean under ASan+UBSan in $$(( $$(date +%s) - start )) s (build included)"

test: check-layering build
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory test-cpp; \
	$(MAKE) --no-print-directory test-python; \
	$(MAKE) --no-print-directory test-sanitize; \
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
	rm -rf $(BUILD) $(SANITIZE_BUILD) python/fastmoe/_C*.so python/fastmoe/libfastmoe_torch.so*
