// Epilogue kernels for library grouped GEMMs (torch's CUTLASS grouped GEMM writes only the routed rows, takes no
// per-expert bias, and may leave the weight gradient of an expert with no rows unwritten). The expert bounds are
// read on the device: no host sync.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/expert/expert.h"
#include "kernels/expert/zero_fill.cuh"

namespace fastmoe {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kEmptyGroupGrid = 1024;  // blocks of zero_empty_groups_kernel over all groups

// Expert owning row r: the last e with offsets[e] <= r (offsets[E] <= r means the tail: returns num_experts).
__device__ __forceinline__ int64_t expert_of_row(const int64_t* offsets, int64_t num_experts, int64_t r) {
  int64_t lo = 0, hi = num_experts;  // invariant: offsets[lo] <= r, answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// y: [num_rows, out_features]; one block-row of threads per row, grid-strided, each thread kN elements at a time
// (cuda::with_chunk's width: 16 bytes when the rows allow it). Each element gets the same add as with kN = 1.
template <typename T, int kN>
__global__ void grouped_bias_epilogue_kernel(T* __restrict__ y, int64_t num_rows, int64_t out_features,
                                             const int64_t* __restrict__ offsets, int64_t num_experts,
                                             const T* __restrict__ bias) {
  using A = cuda::dacc_t<T>;
  const int64_t chunks = out_features / kN;
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t e = expert_of_row(offsets, num_experts, r);
    T* row = y + r * out_features;
    if (e >= num_experts) {
      T zero[kN];
#pragma unroll
      for (int i = 0; i < kN; ++i) zero[i] = cuda::from_acc<T>(A(0));
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) cuda::store_chunk<T, kN>(row + c * kN, zero);
    } else if (bias != nullptr) {
      const T* b = bias + e * out_features;
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        T value[kN], add[kN];
        cuda::load_chunk<T, kN>(row + c * kN, value);
        cuda::load_chunk<T, kN>(b + c * kN, add);
#pragma unroll
        for (int i = 0; i < kN; ++i) {
          value[i] = cuda::from_acc<T>(cuda::add_rn(cuda::to_acc(value[i]), cuda::to_acc(add[i])));
        }
        cuda::store_chunk<T, kN>(row + c * kN, value);
      }
    }
  }
}

// Without a bias only the tail rows [offsets[E], num_rows) change, and in training the tail is usually empty: a
// small grid strides over the tail's bytes alone instead of giving every row a block and a binary search.
__global__ void zero_tail_rows_kernel(char* __restrict__ y, int64_t num_rows, int64_t row_bytes,
                                      const int64_t* __restrict__ offsets, int64_t num_experts) {
  cuda::zero_tail_rows(y, num_rows, row_bytes, offsets, num_experts,
                       static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                       static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// groups: [num_groups, group_bytes]; blockIdx.y is the group, which is zeroed only when it has no rows.
__global__ void zero_empty_groups_kernel(char* groups, int64_t group_bytes, const int64_t* expert_offsets) {
  cuda::zero_group_if_empty(groups, gridDim.y, blockIdx.y, group_bytes, expert_offsets, INT64_MAX,
                            static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                            static_cast<int64_t>(gridDim.x) * blockDim.x);
}

}  // namespace

void grouped_bias_epilogue_cuda(DType dtype, void* y, int64_t num_rows, int64_t out_features,
                                const int64_t* expert_offsets, int64_t num_experts, const void* bias,
                                cudaStream_t stream) {
  FMOE_CHECK(num_rows >= 0 && out_features >= 0 && num_experts >= 1,
             "grouped_bias_epilogue_cuda: bad sizes num_rows=", num_rows, " out_features=", out_features,
             " num_experts=", num_experts);
  if (num_rows == 0 || out_features == 0) return;
  if (bias == nullptr) {
    const int64_t elements = num_rows * out_features;
    const unsigned int blocks =
        static_cast<unsigned int>(std::min<int64_t>((elements + kThreads - 1) / kThreads, 1024));
    const int64_t element_bytes = static_cast<int64_t>(dtype_size(dtype));
    FMOE_CHECK(element_bytes > 0, "grouped_bias_epilogue_cuda: unknown dtype ", static_cast<int>(dtype));
    zero_tail_rows_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<char*>(y), num_rows,
                                                           out_features * element_bytes, expert_offsets, num_experts);
    FMOE_CHECK_LAUNCH();
    return;
  }
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(num_rows, 65535 * 4));
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "grouped_bias_epilogue_cuda", scalar_t, [&] {
    // 16-byte accesses where the rows allow them: one 2-byte access per thread and element ran at less than half
    // the memory's rate.
    cuda::with_chunk<scalar_t>(out_features, {y, bias}, [&](auto chunk) {
      constexpr int kN = decltype(chunk)::value;
      const int threads = static_cast<int>(std::min<int64_t>(kThreads, ((out_features / kN + 31) / 32) * 32));
      grouped_bias_epilogue_kernel<scalar_t, kN>
          <<<blocks, threads, 0, stream>>>(static_cast<scalar_t*>(y), num_rows, out_features, expert_offsets,
                                           num_experts, static_cast<const scalar_t*>(bias));
    });
  });
  FMOE_CHECK_LAUNCH();
}

void zero_empty_groups_cuda(void* groups, int64_t num_groups, int64_t group_bytes, const int64_t* expert_offsets,
                            cudaStream_t stream) {
  FMOE_CHECK(num_groups >= 0 && num_groups <= 65535 && group_bytes >= 0,
             "zero_empty_groups_cuda: num_groups must be in [0, 65535] and group_bytes >= 0, got ", num_groups, " and ",
             group_bytes);
  if (num_groups == 0 || group_bytes == 0) return;
  // About kEmptyGroupGrid blocks in all, shared by the groups: every block of a group with rows only reads two
  // offsets and exits, and in training nearly every group has rows, so a grid sized to each group's bytes
  // (thousands of blocks per expert) cost more than the rare zeroing it serves. A few large groups (8 experts of
  // a wide FFN) still get a hundred blocks each for the one that may be empty; many groups are small.
  const int64_t per_group = std::max<int64_t>(1, kEmptyGroupGrid / num_groups);
  const int64_t blocks =
      std::min<int64_t>(per_group, std::max<int64_t>(1, (group_bytes / 16 + kThreads - 1) / kThreads));
  const dim3 grid(static_cast<unsigned int>(blocks), static_cast<unsigned int>(num_groups));
  zero_empty_groups_kernel<<<grid, kThreads, 0, stream>>>(static_cast<char*>(groups), group_bytes, expert_offsets);
  FMOE_CHECK_LAUNCH();
}

}  // namespace fastmoe
