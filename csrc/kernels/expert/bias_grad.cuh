// The per-expert bias gradient as a block's work, shared by the tiled backend's kernel (grouped_linear.cu) and the
// CUTLASS setup kernel (cutlass_grouped.cu), which computes it in the same launch that prepares the GEMMs.
// Torch-free.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/expert/group_rows.cuh"

namespace fastmoe {
namespace cuda {

// grad_bias[e, o] = sum over the rows of e of grad_y[r, o]. Block `block` (of num_experts * bias_grad_blocks_per
// expert) covers kBiasColumns columns of one expert with kBiasLanes lanes of rows: lane l (ty) sums rows l, l + 8, ...
// and the 8 partial sums are added in lane order, so the result does not depend on scheduling. A warp (tx = 0..31
// at one ty) reads 32 consecutive columns of one row. Every thread of the block must call this (it synchronises).
// grad_y: [num_rows, out_features]; grad_bias: [num_experts, out_features], written (zero for an expert without rows)
constexpr int kBiasColumns = 32;
constexpr int kBiasLanes = 8;
constexpr int kBiasThreads = kBiasColumns * kBiasLanes;

inline int64_t bias_grad_blocks(int64_t num_experts, int64_t out_features) {
  return num_experts * ((out_features + kBiasColumns - 1) / kBiasColumns);
}

template <typename T>
__device__ __forceinline__ void bias_grad_block(const T* __restrict__ grad_y, int64_t num_rows,
                                                const int64_t* __restrict__ offsets, int64_t num_experts,
                                                int64_t out_features, T* __restrict__ grad_bias, int64_t block, int tx,
                                                int ty) {
  // fp64 partial sums for fp32: a lane adds up to rows/8 terms in sequence, which in fp32 drifts past the error
  // of a tree-shaped PyTorch sum; the kernel is bound by reading grad_y, so the wider adds cost nothing.
  using A = std::conditional_t<std::is_same_v<T, float>, double, dacc_t<T>>;
  __shared__ A partials[kBiasLanes][kBiasColumns];
  const int64_t blocks_per_expert = (out_features + kBiasColumns - 1) / kBiasColumns;
  const int64_t expert = block / blocks_per_expert;
  const int64_t o = block % blocks_per_expert * kBiasColumns + tx;
  int64_t row_begin, row_end;
  group_rows(offsets, num_experts, num_rows, expert, &row_begin, &row_end);
  A sum = 0;
  if (o < out_features) {
    for (int64_t r = row_begin + ty; r < row_end; r += kBiasLanes) sum += to_acc(grad_y[r * out_features + o]);
  }
  partials[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && o < out_features) {
    A total = partials[0][tx];
#pragma unroll
    for (int lane = 1; lane < kBiasLanes; ++lane) total += partials[lane][tx];
    grad_bias[expert * out_features + o] = from_acc<T>(static_cast<dacc_t<T>>(total));
  }
}

}  // namespace cuda
}  // namespace fastmoe
