#!/usr/bin/env bash
# The GPU verification run: build on a CUDA machine against its own torch, then run the stages named on the
# command line (default: all), logging each to $OUT/<stage>.log and a summary to $OUT/summary.log.
#   build     CMake + Ninja build with the C++ tests (GoogleTest from FASTMOE_GTEST_SOURCE_DIR if not installed),
#             with the CUTLASS grouped GEMM: its headers come from the nvidia-cutlass wheel of this Python or, on a
#             machine without network, from a wheel copied to .deps/ (pip download --no-deps nvidia-cutlass==4.2.0.0)
#   test      ctest (kernels vs references on the GPU, C++ modules, find_package consumer) and the full pytest
#             suite (cuda parameters run), then the grouped_linear and layer tests again on the tiled backend
#   sanitize  compute-sanitizer memcheck, then racecheck, on the CUDA kernel tests and on the CUDA op tests
#   pip       pip install --no-build-isolation --no-deps . and an import from outside the tree
#   bench     benchmarks/bench_moe_layer.py (all configurations; the layer with its activation kept and recomputed)
#   configs   benchmarks/cutlass_configs: every candidate CUTLASS configuration on every layer shape (needs a build
#             with CMAKE_EXTRA_ARGS=-DFASTMOE_BUILD_CUTLASS_BENCH=ON; results in $OUT/cutlass_configs.jsonl)
#   host      tools/host_issue_time.py --profile 20: host time of fastmoe-train's MoE layer against its dense FFN
#   hf        benchmarks/bench_hf_moe.py (the HF training steps, fastmoe against grouped_mm; needs transformers),
#             then tools/profile_hf_step.py: per-kernel GPU time of the Qwen3-MoE step
#   ncu       tools/ncu_layer.py on the train and paper layers: each kernel's share of the step and its placement
#             against the compute and memory roofs (Nsight Compute's speed of light; CSVs in $OUT/ncu-*.csv)
#   memory    tools/memory_at_peak.py on the mixtral and E = 128 layers: what fastmoe and grouped_mm_ref hold at
#             their peaks
#   dist      the multi-process tests (tests/distributed) on gloo and on NCCL with the local GPUs
#   bench_ep  benchmarks/run_ep_scaling.sh: expert-parallel weak scaling at W = 1, 2, 4, 8 up to the GPU count
#             (EP_SIZES="1 2" picks the W, EP_ARGS="--config fine --profile $OUT/prof" passes flags to bench_ep.py)
# Usage: OUT=/tmp/out tools/gpu_check.sh [stage ...]   (CMAKE_EXTRA_ARGS: more -D options for the build stage)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastmoe-gpu}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUILD=build-gpu
stages=("$@")
((${#stages[@]})) || stages=(build test sanitize pip bench host hf dist bench_ep)
status=0

run_stage() {
  local name=$1
  shift
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$OUT/summary.log"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "=== $name: OK in $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
  else
    echo "=== $name: FAILED (rc=$?) in $((SECONDS - start)) s; last lines:" | tee -a "$OUT/summary.log"
    tail -40 "$OUT/$name.log" | tee -a "$OUT/summary.log"
    status=1
  fi
}

build() {
  local gtest_args=() cutlass_args=() wheels=(.deps/nvidia_cutlass-*.whl)
  [[ -d .deps/googletest ]] && gtest_args=(-DFASTMOE_GTEST_SOURCE_DIR="$PWD/.deps/googletest")
  if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" &&
    [[ -f ${wheels[0]} ]]; then
    "$PY" -m pip install -q --no-deps --target .deps/cutlass-site "${wheels[0]}" || return 1
    cutlass_args=(-DFASTMOE_CUTLASS=ON -DFASTMOE_CUTLASS_DIR="$PWD/.deps/cutlass-site/cutlass_library/source")
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTMOE_CUDA=ON -DFASTMOE_PYTHON_INPLACE=ON \
    -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
    -DPython_EXECUTABLE="$(command -v "$PY")" -DFASTMOE_REQUIRE_GTEST=ON "${gtest_args[@]}" "${cutlass_args[@]}" \
    ${CMAKE_EXTRA_ARGS:-} &&
    cmake --build "$BUILD" -j "$MAX_JOBS"
}

pytest_all() {
  PYTHONPATH=python "$PY" -m pytest tests -v -p no:cacheprovider -rs &&
    FASTMOE_GROUPED_GEMM=tiled PYTHONPATH=python "$PY" -m pytest tests/ops/test_grouped_linear.py tests/nn -q \
      -p no:cacheprovider -k cuda
}

# memcheck (out-of-bounds and misaligned accesses, leaks of device allocations) and racecheck (shared-memory
# hazards between the threads of a block) over the CUDA kernel tests, the CUDA op tests and a short op fuzz run
# (malformed ids, pair ids and offsets must be skipped or clamped on the device, never read out of bounds).
sanitize() {
  local tool
  for tool in memcheck racecheck; do
    echo "--- compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$BUILD/tests/cpp/test_kernels" --gtest_brief=1 &&
      PYTHONPATH=python compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" -m pytest tests/ops \
        tests/fuzz/test_fuzz_ops.py --fuzz-cases 40 -q -p no:cacheprovider \
        -k "cuda and not bad_input and not registration" || return 1
  done
}

pip_install() {
  "$PY" -m pip install --no-build-isolation --no-deps --target /tmp/fastmoe-site . &&
    (cd /tmp && PYTHONPATH=/tmp/fastmoe-site "$PY" -c "import fastmoe, torch; \
x = torch.randn(64, 32, device='cuda', dtype=torch.bfloat16); \
m = fastmoe.FMoETransformerMLP(4, 32, 64).cuda().bfloat16(); y = m(x); y.float().sum().backward(); \
print('installed fastmoe', fastmoe.__file__, 'with_cuda', fastmoe.with_cuda, 'out', tuple(y.shape))")
}

bench() { PYTHONPATH=python "$PY" benchmarks/bench_moe_layer.py --recompute --json "$OUT/bench.jsonl"; }

host() { PYTHONPATH=python "$PY" tools/host_issue_time.py --device cuda --precision bf16 --profile 20; }

# The Hugging Face training steps against transformers' grouped_mm, then where the Qwen3-MoE step's time goes.
hf() {
  PYTHONPATH=python "$PY" benchmarks/bench_hf_moe.py --impls grouped_mm,fastmoe --iters 6 --warmup 2 \
    --json "$OUT/hf.jsonl" &&
    PYTHONPATH=python "$PY" tools/profile_hf_step.py --config qwen3_moe --impls fastmoe,grouped_mm --rows 40
}

ncu_layers() {
  local config
  for config in train paper; do
    PYTHONPATH=python "$PY" tools/ncu_layer.py --config "$config" --csv "$OUT/ncu-$config.csv" || return 1
  done
}

memory_at_peaks() {
  PYTHONPATH=python "$PY" tools/memory_at_peak.py --config mixtral &&
    PYTHONPATH=python "$PY" tools/memory_at_peak.py --config escan --index 3
}

dist_tests() {
  nvidia-smi topo -m
  PYTHONPATH=python "$PY" -m pytest tests/distributed -v -p no:cacheprovider -rs
}

# EP_SIZES: the W to run (default 1 2 4 8 up to the GPU count); EP_ARGS: flags for bench_ep.py (e.g. --profile DIR)
bench_ep() {
  # shellcheck disable=SC2086
  OUT="$OUT" PYTHON="$PY" bash benchmarks/run_ep_scaling.sh ${EP_SIZES:-} ${EP_ARGS:+-- $EP_ARGS}
}

for stage in "${stages[@]}"; do
  case $stage in
    build) run_stage build build ;;
    test) run_stage ctest ctest --test-dir "$BUILD" --output-on-failure -j 8 && run_stage pytest pytest_all ;;
    sanitize) run_stage sanitize sanitize ;;
    pip) run_stage pip pip_install ;;
    bench) run_stage bench bench ;;
    configs) run_stage configs "$BUILD/benchmarks/bench_cutlass_configs" --json "$OUT/cutlass_configs.jsonl" ;;
    host) run_stage host host ;;
    hf) run_stage hf hf ;;
    ncu) run_stage ncu ncu_layers ;;
    memory) run_stage memory memory_at_peaks ;;
    dist) run_stage dist dist_tests ;;
    bench_ep) run_stage bench_ep bench_ep ;;
    *) echo "unknown stage $stage" >&2; status=2 ;;
  esac
done
exit $status
