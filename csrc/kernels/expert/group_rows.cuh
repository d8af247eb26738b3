// The rows of one expert (or of the tail past the last expert) from expert_offsets, as every grouped-GEMM kernel
// and its helpers read them. Torch-free.
#pragma once

#include <cstdint>

namespace fastmoe {
namespace cuda {

__device__ __forceinline__ int64_t clamp64(int64_t value, int64_t lo, int64_t hi) {
  return value < lo ? lo : (value > hi ? hi : value);
}

// Rows [begin, end) of group `group`: an expert when group < num_experts, else the tail past offsets[E].
// Offsets are clamped into [0, num_rows] so that malformed offsets (which the reference rejects) cannot make a
// block read or write outside the buffers.
__device__ __forceinline__ void group_rows(const int64_t* offsets, int64_t num_experts, int64_t num_rows, int64_t group,
                                           int64_t* begin, int64_t* end) {
  *begin = clamp64(offsets[group], 0, num_rows);
  *end = group < num_experts ? clamp64(offsets[group + 1], *begin, num_rows) : num_rows;
}

}  // namespace cuda
}  // namespace fastmoe
