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

// grad_bias[e, o] = sum over the rows of e of grad_y[r, o]. Block `block` (of bias_grad_blocks) covers kBiasColumns
// columns of one expert. Its kBiasThreads threads split those columns into groups of V (16 bytes of grad_y when the
// rows are 16-byte aligned, one column otherwise) and the rows into lanes: lane l sums rows l, l + lanes, ... in that
// order, kBiasRowsInFlight rows loaded before they are added, and the lanes' partial sums are added in lane order,
// so the result does not depend on scheduling (it depends on V, i.e. on the dtype and the alignment of grad_y's
// rows). A bias gradient is a read of grad_y and little else: the vector loads and the rows in flight keep it near
// the memory's rate, where one 2-byte load per thread and row kept it bound by the latency of each load.
// grad_y: [num_rows, out_features]; grad_bias: [num_experts, out_features], written (zero for an expert without rows)
constexpr int kBiasColumns = 64;
constexpr int kBiasThreads = 256;
constexpr int kBiasRowsInFlight = 8;

inline int64_t bias_grad_blocks(int64_t num_experts, int64_t out_features) {
  return num_experts * ((out_features + kBiasColumns - 1) / kBiasColumns);
}

// fp64 partial sums for fp32: a lane adds up to rows/lanes terms in sequence, which in fp32 drifts past the error
// of a tree-shaped PyTorch sum; the kernel is bound by reading grad_y, so the wider adds cost nothing.
template <typename T>
using bias_acc_t = std::conditional_t<std::is_same_v<T, float>, double, dacc_t<T>>;

// The rows summed are grad_y's as they are in memory (ReadRows), or made by the caller as it goes: a row maker has
//   template <int V, int N> void rows(int64_t first, int64_t step, int64_t column, T (&out)[N][V]) const
// writing chunk (first + i * step, column ...) of each of N rows into out[i], and may store them elsewhere too. A
// kernel that produces grad_y so sums its bias gradient without reading it back, in the same order as this, so with
// the same bits. The N rows come in one call so that a maker issues all N rows' loads before its first store (which
// the compiler may not move loads past).
template <typename T>
struct ReadRows {
  const T* __restrict__ grad_y;
  int64_t out_features;
  template <int V, int N>
  __device__ __forceinline__ void rows(int64_t first, int64_t step, int64_t column, T (&out)[N][V]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) load_chunk<T, V>(grad_y + (first + i * step) * out_features + column, out[i]);
  }
};

template <typename T, int V, typename Rows>
__device__ __forceinline__ void bias_grad_columns(const Rows& rows_of, int64_t row_begin, int64_t row_end,
                                                  int64_t out_features, int64_t first_column, int thread,
                                                  bias_acc_t<T> (*partials)[kBiasColumns]) {
  using A = bias_acc_t<T>;
  constexpr int kThreadsPerRow = kBiasColumns / V;
  constexpr int kLanes = kBiasThreads / kThreadsPerRow;
  const int group = thread % kThreadsPerRow, lane = thread / kThreadsPerRow;
  const int64_t column = first_column + group * V;  // V divides out_features when V > 1: all V columns or none
  A sum[V];
#pragma unroll
  for (int j = 0; j < V; ++j) sum[j] = A(0);
  if (column < out_features) {
    int64_t r = row_begin + lane;
    for (; r + (kBiasRowsInFlight - 1) * kLanes < row_end; r += kBiasRowsInFlight * kLanes) {
      T rows[kBiasRowsInFlight][V];
      rows_of.template rows<V, kBiasRowsInFlight>(r, kLanes, column, rows);
#pragma unroll
      for (int i = 0; i < kBiasRowsInFlight; ++i) {
#pragma unroll
        for (int j = 0; j < V; ++j) sum[j] += to_acc(rows[i][j]);
      }
    }
    for (; r < row_end; r += kLanes) {
      T row[1][V];
      rows_of.template rows<V, 1>(r, kLanes, column, row);
#pragma unroll
      for (int j = 0; j < V; ++j) sum[j] += to_acc(row[0][j]);
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) partials[lane][group * V + j] = sum[j];
  __syncthreads();
  if (thread < kBiasColumns) {
    A total = partials[0][thread];
    for (int l = 1; l < kLanes; ++l) total += partials[l][thread];
    partials[0][thread] = total;  // read back by the caller's writer thread (the same thread)
  }
}

// Every thread of the block (kBiasThreads of them, `thread` its index) must call this: it synchronises. `vectors`:
// the rows move as 16-byte chunks (row_is_vec16, which the CUTLASS setup kernel evaluates on the device); the sums'
// order depends on it. Group num_experts (the tail past expert_offsets[E]) makes its rows and writes no bias gradient.
template <typename T, typename Rows>
__device__ __forceinline__ void bias_grad_block_of(const Rows& rows_of, bool vectors, int64_t num_rows,
                                                   const int64_t* __restrict__ offsets, int64_t num_experts,
                                                   int64_t out_features, T* __restrict__ grad_bias, int64_t block,
                                                   int thread) {
  using A = bias_acc_t<T>;
  constexpr int kVec = kVec16<T>;
  // The lanes of the narrowest split (one column per thread) are the fewest: kBiasThreads / kBiasColumns.
  __shared__ A partials[kBiasThreads * kVec / kBiasColumns][kBiasColumns];
  const int64_t blocks_per_expert = (out_features + kBiasColumns - 1) / kBiasColumns;
  const int64_t expert = block / blocks_per_expert;
  const int64_t first_column = block % blocks_per_expert * kBiasColumns;
  int64_t row_begin, row_end;
  group_rows(offsets, num_experts, num_rows, expert, &row_begin, &row_end);
  if (vectors) {
    bias_grad_columns<T, kVec>(rows_of, row_begin, row_end, out_features, first_column, thread, partials);
  } else {
    bias_grad_columns<T, 1>(rows_of, row_begin, row_end, out_features, first_column, thread, partials);
  }
  const int64_t o = first_column + thread;
  if (expert < num_experts && thread < kBiasColumns && o < out_features) {
    grad_bias[expert * out_features + o] = from_acc<T>(static_cast<dacc_t<T>>(partials[0][thread]));
  }
}

// The bias gradient of grad_y as it is in memory.
template <typename T>
__device__ __forceinline__ void bias_grad_block(const T* __restrict__ grad_y, int64_t num_rows,
                                                const int64_t* __restrict__ offsets, int64_t num_experts,
                                                int64_t out_features, T* __restrict__ grad_bias, int64_t block,
                                                int thread) {
  bias_grad_block_of(ReadRows<T>{grad_y, out_features}, row_is_vec16<T>(out_features, grad_y), num_rows, offsets,
                     num_experts, out_features, grad_bias, block, thread);
}

}  // namespace cuda
}  // namespace fastmoe
