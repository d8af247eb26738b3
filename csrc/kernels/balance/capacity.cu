// CUDA capacity limiting: keep each expert's highest-scored assignments. Same contract as capacity_limit_ref.
//
// Two stable radix sorts give the reference's order without comparisons between threads: first the pair ids by
// score key (larger score first, NaN last; stability keeps equal scores in pair order), then that order by
// expert id. Inside each expert's segment a pair's rank is its position minus the segment start (a binary
// search in the sorted expert keys), and ranks at or past the capacity are dropped. No atomics decide anything;
// the dropped count is an integer sum, so every output is deterministic.
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <limits>

#include "kernels/balance/balance.h"
#include "kernels/common.cuh"

namespace fastmoe {
namespace {

constexpr int kThreads = 256;
constexpr size_t kAlign = 256;

size_t align_up(size_t bytes) {
  return (bytes + kAlign - 1) / kAlign * kAlign;
}

int expert_key_bits(int64_t num_experts) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) <= num_experts) ++bits;
  return bits;
}

struct Layout {
  size_t score_in = 0, score_out = 0, pairs = 0, by_score = 0, expert_in = 0, expert_out = 0, order = 0;
  size_t temp = 0, temp_bytes = 0, total = 0;
};

Layout layout_for(int64_t num_pairs, int64_t num_experts) {
  Layout layout;
  if (num_pairs == 0) return layout;
  const size_t n = static_cast<size_t>(num_pairs);
  size_t offset = 0;
  for (size_t* slot : {&layout.score_in, &layout.score_out, &layout.pairs, &layout.by_score}) {
    *slot = offset;
    offset += align_up(n * sizeof(uint64_t));
  }
  for (size_t* slot : {&layout.expert_in, &layout.expert_out}) {
    *slot = offset;
    offset += align_up(n * sizeof(uint32_t));
  }
  layout.order = offset;
  offset += align_up(n * sizeof(int64_t));
  size_t score_sort = 0, expert_sort = 0;
  FMOE_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(nullptr, score_sort, static_cast<uint64_t*>(nullptr),
                                                  static_cast<uint64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                                  static_cast<int64_t*>(nullptr), num_pairs));
  FMOE_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(
      nullptr, expert_sort, static_cast<uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<int64_t*>(nullptr), static_cast<int64_t*>(nullptr), num_pairs, 0, expert_key_bits(num_experts)));
  layout.temp = offset;
  layout.temp_bytes = std::max(score_sort, expert_sort);
  layout.total = offset + align_up(layout.temp_bytes) + kAlign;  // slack to align an unaligned base
  return layout;
}

// An unsigned key that sorts ascending in the order "larger score first, NaN last", with -0 equal to +0.
__device__ __forceinline__ uint64_t score_key(double score) {
  if (isnan(score)) return std::numeric_limits<uint64_t>::max();
  if (score == 0.0) score = 0.0;
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(score));
  const uint64_t ascending = (bits >> 63) ? ~bits : (bits | (uint64_t{1} << 63));  // order-preserving
  return ~ascending;
}

// topk_idx, topk_score: [num_pairs] -> score keys, identity pair ids, and kept_idx initialised to the ids (ids
// outside [-1, num_experts) become -1 and are counted as dropped).
template <typename S>
__global__ void __launch_bounds__(kThreads)
    capacity_keys_kernel(const int64_t* __restrict__ topk_idx, const S* __restrict__ topk_score, int64_t num_pairs,
                         int64_t num_experts, uint64_t* __restrict__ score_in, int64_t* __restrict__ pairs,
                         int64_t* __restrict__ kept_idx, int64_t* num_dropped) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t invalid = 0;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < num_pairs; p += stride) {
    const int64_t id = topk_idx[p];
    const bool bad = id < -1 || id >= num_experts;
    invalid += bad ? 1 : 0;
    kept_idx[p] = bad ? -1 : id;
    score_in[p] = score_key(static_cast<double>(cuda::to_acc(topk_score[p])));
    pairs[p] = p;
  }
  invalid = cuda::warp_sum(invalid);
  if (invalid != 0 && threadIdx.x % 32 == 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(num_dropped), static_cast<unsigned long long>(invalid));
  }
}

// by_score: [num_pairs] pair ids in score order -> expert_in: their expert ids (num_experts when not routed).
__global__ void __launch_bounds__(kThreads)
    capacity_expert_keys_kernel(const int64_t* __restrict__ kept_idx, const int64_t* __restrict__ by_score,
                                int64_t num_pairs, int64_t num_experts, uint32_t* __restrict__ expert_in) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_pairs; i += stride) {
    const int64_t id = kept_idx[by_score[i]];
    expert_in[i] = static_cast<uint32_t>(id >= 0 ? id : num_experts);
  }
}

// expert_out, order: [num_pairs] sorted by (expert, score order) -> kept_idx[pair] = -1 past the capacity.
__global__ void __launch_bounds__(kThreads)
    capacity_drop_kernel(const uint32_t* __restrict__ expert_out, const int64_t* __restrict__ order, int64_t num_pairs,
                         int64_t num_experts, const int64_t* __restrict__ expert_capacity,
                         int64_t* __restrict__ kept_idx, int64_t* num_dropped) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t dropped = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_pairs; i += stride) {
    const uint32_t e = expert_out[i];
    if (e >= static_cast<uint32_t>(num_experts)) continue;
    const int64_t rank = i - cuda::lower_bound(expert_out, num_pairs, e);
    if (rank >= max(expert_capacity[e], int64_t{0})) {
      kept_idx[order[i]] = -1;
      ++dropped;
    }
  }
  dropped = cuda::warp_sum(dropped);
  if (dropped != 0 && threadIdx.x % 32 == 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(num_dropped), static_cast<unsigned long long>(dropped));
  }
}

void check_sizes(int64_t num_pairs, int64_t num_experts) {
  FMOE_CHECK(num_pairs >= 0, "num_pairs must be >= 0, got ", num_pairs);
  FMOE_CHECK(num_experts >= 1 && num_experts < std::numeric_limits<int32_t>::max(),
             "num_experts must be in [1, 2^31 - 1), got ", num_experts);
}

}  // namespace

size_t capacity_limit_cuda_workspace_bytes(int64_t num_pairs, int64_t num_experts) {
  check_sizes(num_pairs, num_experts);
  return layout_for(num_pairs, num_experts).total;
}

void capacity_limit_cuda(const int64_t* topk_idx, const void* topk_score, DType score_dtype, int64_t num_pairs,
                         const int64_t* expert_capacity, int64_t num_experts, int64_t* kept_idx, int64_t* num_dropped,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // 1. Zero the dropped count; stop when there are no pairs.  2. Score keys, identity ids, kept_idx = ids.
  // 3. Stable sort of the ids by score key.  4. Expert key of each id in that order; stable sort by it.
  // 5. Drop every pair ranked at or past its expert's capacity.
  check_sizes(num_pairs, num_experts);
  FMOE_CHECK_CUDA(cudaMemsetAsync(num_dropped, 0, sizeof(int64_t), stream));
  if (num_pairs == 0) return;
  const Layout layout = layout_for(num_pairs, num_experts);
  FMOE_CHECK(workspace != nullptr && workspace_bytes >= layout.total, "capacity_limit_cuda needs a workspace of ",
             layout.total, " bytes for num_pairs=", num_pairs, ", got ", workspace_bytes);
  const uintptr_t base = (reinterpret_cast<uintptr_t>(workspace) + kAlign - 1) / kAlign * kAlign;
  auto* score_in = reinterpret_cast<uint64_t*>(base + layout.score_in);
  auto* score_out = reinterpret_cast<uint64_t*>(base + layout.score_out);
  auto* pairs = reinterpret_cast<int64_t*>(base + layout.pairs);
  auto* by_score = reinterpret_cast<int64_t*>(base + layout.by_score);
  auto* expert_in = reinterpret_cast<uint32_t*>(base + layout.expert_in);
  auto* expert_out = reinterpret_cast<uint32_t*>(base + layout.expert_out);
  auto* order = reinterpret_cast<int64_t*>(base + layout.order);
  void* temp = reinterpret_cast<void*>(base + layout.temp);
  const unsigned int grid = cuda::grid_for(num_pairs, kThreads);

  FMOE_CUDA_DISPATCH_FLOAT_TYPES(score_dtype, "capacity_limit_cuda", score_t, [&] {
    capacity_keys_kernel<score_t><<<grid, kThreads, 0, stream>>>(topk_idx, static_cast<const score_t*>(topk_score),
                                                                 num_pairs, num_experts, score_in, pairs, kept_idx,
                                                                 num_dropped);
  });
  FMOE_CHECK_LAUNCH();
  size_t temp_bytes = layout.temp_bytes;
  FMOE_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, score_in, score_out, pairs, by_score, num_pairs, 0,
                                                  64, stream));
  capacity_expert_keys_kernel<<<grid, kThreads, 0, stream>>>(kept_idx, by_score, num_pairs, num_experts, expert_in);
  FMOE_CHECK_LAUNCH();
  temp_bytes = layout.temp_bytes;
  FMOE_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, expert_in, expert_out, by_score, order, num_pairs,
                                                  0, expert_key_bits(num_experts), stream));
  capacity_drop_kernel<<<grid, kThreads, 0, stream>>>(expert_out, order, num_pairs, num_experts, expert_capacity,
                                                      kept_idx, num_dropped);
  FMOE_CHECK_LAUNCH();
}

}  // namespace fastmoe
