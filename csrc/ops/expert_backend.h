// Which grouped-GEMM backend runs grouped_linear on CUDA, and why. Every backend reads the expert offsets on
// the device, so none needs a host synchronisation.
//
//   kTorchGroupedMm  at::_grouped_mm (torch's CUTLASS grouped GEMM on sm_90+: tensor cores, fp32 accumulation,
//                    one launch for all experts). Taken for bf16 when every row is 16-byte aligned (in and out
//                    features multiples of 8) on a GPU of compute capability >= 9.0, with at least one row. It writes
//                    only the routed rows and takes no per-expert bias, so fastmoe's epilogue kernel adds the bias and
//                    zeroes the tail rows, and zeroes the weight gradient of experts with no rows.
//   kTiledKernel     fastmoe's portable tiled kernel (csrc/kernels/expert/grouped_linear.cu): every dtype
//                    (fp32, fp64, fp16, bf16) and any width, fp32 accumulation (fp64 for fp64).
//
// Not used: cuBLAS's grouped GEMM (cublasGemmGroupedBatchedEx) and a per-expert cuBLASLt loop both take the
// per-expert row counts on the host, which costs a device-to-host copy and a sync every call. torch's
// _grouped_mm for dtypes other than bf16 falls back to a per-group loop that also reads the offsets on the host.
//
// FASTMOE_GROUPED_GEMM=tiled|grouped_mm forces a backend (grouped_mm is still refused where it cannot run);
// the tests use it to cover both backends on one machine.
//
// Deterministic mode (fastmoe::deterministic(): fastmoe.use_deterministic(True) or
// torch.use_deterministic_algorithms(True)) always takes kTiledKernel: every output element of it has one writer
// that sums in a fixed order, while torch does not document _grouped_mm as run-to-run reproducible.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

#include "fastmoe/determinism.h"

namespace fastmoe::ops_detail {

enum class GroupedGemmBackend { kTorchGroupedMm, kTiledKernel };

inline const char* backend_name(GroupedGemmBackend backend) {
  return backend == GroupedGemmBackend::kTorchGroupedMm ? "grouped_mm" : "tiled";
}

inline bool is_16_byte_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// x [N, in] and weight [E, out, in] are contiguous CUDA tensors; device_major is the GPU's compute capability.
inline GroupedGemmBackend choose_grouped_gemm_backend(const at::Tensor& x, const at::Tensor& weight, int device_major) {
  static const std::string forced = [] {
    const char* value = std::getenv("FASTMOE_GROUPED_GEMM");
    return std::string(value == nullptr ? "" : value);
  }();
  const bool grouped_mm_ok = x.scalar_type() == at::kBFloat16 && device_major >= 9 && x.size(0) > 0 &&
                             x.size(1) % 8 == 0 && weight.size(1) % 8 == 0 && is_16_byte_aligned(x) &&
                             is_16_byte_aligned(weight);
  if (forced == "tiled" || fastmoe::deterministic()) return GroupedGemmBackend::kTiledKernel;
  return grouped_mm_ok ? GroupedGemmBackend::kTorchGroupedMm : GroupedGemmBackend::kTiledKernel;
}

}  // namespace fastmoe::ops_detail
