// Device helpers that zero what a grouped GEMM leaves unwritten: the tail rows past the last expert's, and the
// weight gradient of an expert without rows. Shared by the epilogue kernels (epilogue.cu) and the CUTLASS setup
// kernel (cutlass_grouped.cu), which zeroes them before its GEMMs instead of in launches after. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/expert/group_rows.cuh"

namespace fastmoe {
namespace cuda {

// Zeroes bytes [0, bytes) of base; this thread is worker `worker` of `workers` striding over them. Stores 16 bytes
// at a time when base and bytes allow it. All-zero bits are +0 in every float type.
__device__ __forceinline__ void zero_bytes(char* base, int64_t bytes, int64_t worker, int64_t workers) {
  if (reinterpret_cast<uintptr_t>(base) % 16 == 0 && bytes % 16 == 0) {
    uint4* words = reinterpret_cast<uint4*>(base);
    for (int64_t i = worker; i < bytes / 16; i += workers) words[i] = make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t i = worker; i < bytes; i += workers) base[i] = 0;
  }
}

// Zeroes the tail rows [offsets[num_experts], num_rows) of rows [num_rows, row_bytes] (group_rows' tail group).
__device__ __forceinline__ void zero_tail_rows(char* rows, int64_t num_rows, int64_t row_bytes, const int64_t* offsets,
                                               int64_t num_experts, int64_t worker, int64_t workers) {
  int64_t begin, end;
  group_rows(offsets, num_experts, num_rows, num_experts, &begin, &end);
  zero_bytes(rows + begin * row_bytes, (end - begin) * row_bytes, worker, workers);
}

// Zeroes group g of groups [num_groups, group_bytes] when its expert has no rows as group_rows clamps them into
// [0, num_rows], as the GEMMs do (so malformed offsets leave no group that neither writes). A caller without a row
// count passes INT64_MAX.
__device__ __forceinline__ void zero_group_if_empty(char* groups, int64_t num_groups, int64_t g, int64_t group_bytes,
                                                    const int64_t* offsets, int64_t num_rows, int64_t worker,
                                                    int64_t workers) {
  int64_t begin, end;
  group_rows(offsets, num_groups, num_rows, g, &begin, &end);
  if (end == begin) zero_bytes(groups + g * group_bytes, group_bytes, worker, workers);
}

}  // namespace cuda
}  // namespace fastmoe
