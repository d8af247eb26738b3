// Which grouped-GEMM backend runs grouped_linear on CUDA, and why. Every backend reads the expert offsets on
// the device, so none needs a host synchronisation.
//
//   kCutlass         fastmoe's CUTLASS SM90 grouped GEMM (csrc/kernels/expert/cutlass_grouped.cu: TMA loads, WGMMA
//                    tensor cores, fp32 accumulation, one launch per GEMM for all experts, whose problem sizes a
//                    small kernel writes on the device from the offsets). Built when CMake finds the CUTLASS headers
//                    (the nvidia-cutlass wheel, or FASTMOE_CUTLASS_DIR) and compiles for sm_90. Runs fp16 and bf16
//                    on GPUs of compute capability 9.0 exactly (its code is sm_90a) when in and out features are
//                    positive multiples of 8 and x, weight and grad_y are 16-byte aligned, with at least one row:
//                    TMA needs 16-byte aligned rows and base addresses, and expert e's rows start at
//                    x + offsets[e] * in_features, 16-byte aligned for 2-byte elements when in_features % 8 == 0
//                    (the same for out_features and y, grad_y). Taken for fp16 and bf16 wherever it can run: in bf16 it
//                    ran the layer 2% to 9% faster than kTorchGroupedMm on every configuration of
//                    benchmarks/bench_moe_layer.py that was compared (docs/benchmarks.md), with a lower peak memory.
//                    Its forward with a bias adds the bias in the GEMM's epilogue; its setup launch zeroes the tail
//                    rows and the weight gradient of experts with no rows, and sums the bias gradient as the tiled
//                    kernel does.
//   kTorchGroupedMm  at::_grouped_mm (torch's CUTLASS grouped GEMM on sm_90+: tensor cores, fp32 accumulation,
//                    one launch for all experts). Taken for bf16 when every row is 16-byte aligned (in and out
//                    features multiples of 8) on a GPU of compute capability >= 9.0, with at least one row. It writes
//                    only the routed rows and takes no per-expert bias, so fastmoe's epilogue kernel adds the bias and
//                    zeroes the tail rows, and zeroes the weight gradient of experts with no rows. Taken for bf16 where
//                    kCutlass cannot run (a build without it, a GPU of compute capability above 9.0).
//   kTiledKernel     fastmoe's portable tiled kernel (csrc/kernels/expert/grouped_linear.cu): every dtype
//                    (fp32, fp64, fp16, bf16) and any width, fp32 accumulation (fp64 for fp64).
//
// Not used: cuBLAS's grouped GEMM (cublasGemmGroupedBatchedEx) and a per-expert cuBLASLt loop both take the
// per-expert row counts on the host, which costs a device-to-host copy and a sync every call. torch's
// _grouped_mm for dtypes other than bf16 falls back to a per-group loop that also reads the offsets on the host.
//
// FASTMOE_GROUPED_GEMM=tiled|grouped_mm|cutlass, read once per process, forces a backend where it can run (the
// tiled kernel elsewhere); the tests use it to cover every backend on one machine. Any other value is an error,
// and so is cutlass in a build without the CUTLASS backend.
//
// Deterministic mode (fastmoe::deterministic(): fastmoe.use_deterministic(True) or
// torch.use_deterministic_algorithms(True)) always takes kTiledKernel: every output element of it has one writer
// that sums in a fixed order, while torch does not document _grouped_mm as run-to-run reproducible, and fastmoe
// does not promise it of the CUTLASS kernels' configuration.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "fastmoe/determinism.h"

namespace fastmoe::ops_detail {

enum class GroupedGemmBackend { kTorchGroupedMm, kCutlass, kTiledKernel };

inline const char* backend_name(GroupedGemmBackend backend) {
  switch (backend) {
    case GroupedGemmBackend::kTorchGroupedMm: return "grouped_mm";
    case GroupedGemmBackend::kCutlass: return "cutlass";
    case GroupedGemmBackend::kTiledKernel: return "tiled";
  }
  return "unknown";
}

inline bool is_16_byte_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The value of FASTMOE_GROUPED_GEMM when the process first asked (empty when unset), checked on every call so that
// a bad value is reported wherever grouped_linear runs.
inline const std::string& forced_grouped_gemm_backend() {
  static const std::string forced = [] {
    const char* value = std::getenv("FASTMOE_GROUPED_GEMM");
    return std::string(value == nullptr ? "" : value);
  }();
  TORCH_CHECK(forced.empty() || forced == "tiled" || forced == "grouped_mm" || forced == "cutlass",
              "FASTMOE_GROUPED_GEMM must be tiled, grouped_mm or cutlass (or unset), got '", forced, "'");
#ifndef FASTMOE_WITH_CUTLASS
  TORCH_CHECK(forced != "cutlass",
              "FASTMOE_GROUPED_GEMM=cutlass, but fastmoe was built without the CUTLASS backend (CMake found no CUTLASS "
              "headers or no sm_90 architecture: install nvidia-cutlass==4.2.0.0 or set FASTMOE_CUTLASS_DIR, and "
              "rebuild)");
#endif
  return forced;
}

// x [N, in] and weight [E, out, in] are contiguous CUDA tensors, grad_y [N, out] the backward's (nullptr in the
// forward); device_major.device_minor is the GPU's compute capability.
inline GroupedGemmBackend choose_grouped_gemm_backend(const at::Tensor& x, const at::Tensor& weight,
                                                      const at::Tensor* grad_y, int device_major, int device_minor) {
  const std::string& forced = forced_grouped_gemm_backend();
  if (forced == "tiled" || fastmoe::deterministic()) return GroupedGemmBackend::kTiledKernel;
  const bool rows_aligned = x.size(0) > 0 && x.size(1) > 0 && weight.size(1) > 0 && x.size(1) % 8 == 0 &&
                            weight.size(1) % 8 == 0 && is_16_byte_aligned(x) && is_16_byte_aligned(weight) &&
                            (grad_y == nullptr || is_16_byte_aligned(*grad_y));
  // torch._grouped_mm of no groups stops the process (an integer division by zero), so no experts take the tiled
  // kernel, which writes the zero rows.
  const bool grouped_mm_ok =
      x.scalar_type() == at::kBFloat16 && device_major >= 9 && rows_aligned && weight.size(0) >= 1;
  bool cutlass_ok = false;
#ifdef FASTMOE_WITH_CUTLASS
  // int32 problem sizes; zero_empty_groups_cuda's grid takes at most 65535 experts.
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  cutlass_ok = (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) && device_major == 9 &&
               device_minor == 0 && rows_aligned && x.size(0) <= kIntMax && x.size(1) <= kIntMax &&
               weight.size(1) <= kIntMax && weight.size(0) >= 1 && weight.size(0) <= 65535;
#endif
  if (forced == "cutlass") return cutlass_ok ? GroupedGemmBackend::kCutlass : GroupedGemmBackend::kTiledKernel;
  if (forced == "grouped_mm") {
    return grouped_mm_ok ? GroupedGemmBackend::kTorchGroupedMm : GroupedGemmBackend::kTiledKernel;
  }
  if (cutlass_ok) return GroupedGemmBackend::kCutlass;
  return grouped_mm_ok ? GroupedGemmBackend::kTorchGroupedMm : GroupedGemmBackend::kTiledKernel;
}

}  // namespace fastmoe::ops_detail
