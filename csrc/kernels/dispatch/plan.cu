// CUDA routing plan: per-expert counts, offsets and the stable permutation of the (token, slot) pairs. Same
// contract as make_plan_ref in csrc/ref/dispatch_ref.h, without a host synchronisation.
//
// The plan is a stable sort of the pair ids by expert id. CUB's radix sort is stable, so sorting
// (key = expert id, dropped pairs keyed num_experts so they sort last; value = pair id) gives the reference's
// order inside each expert. Offsets then fall out of the sorted keys by binary search, with no atomics, so every
// output is deterministic.
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <limits>

#include "kernels/common.cuh"
#include "kernels/dispatch/dispatch.h"

namespace fastmoe {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr size_t kWorkspaceAlign = 256;  // every buffer starts on a 256-byte boundary, as CUB prefers

using PlanKey = uint32_t;

size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

// Bits the radix sort must look at: keys run over [0, num_experts], num_experts being "dropped".
int plan_key_bits(int64_t num_experts) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) <= num_experts) ++bits;
  return bits;
}

// Byte offsets of the scratch buffers inside the workspace (after aligning its base).
struct PlanLayout {
  size_t keys_in = 0;    // PlanKey [num_pairs]
  size_t keys_out = 0;   // PlanKey [num_pairs]
  size_t pairs_in = 0;   // int64 [num_pairs], the identity 0..num_pairs-1
  size_t sort_temp = 0;  // CUB's temporary storage
  size_t sort_temp_bytes = 0;
  size_t total = 0;  // including the slack for aligning an unaligned base pointer
};

PlanLayout plan_layout(int64_t num_pairs, int64_t num_experts) {
  PlanLayout layout;
  if (num_pairs == 0) return layout;
  const size_t pairs = static_cast<size_t>(num_pairs);
  size_t offset = 0;
  layout.keys_in = offset;
  offset += align_up(pairs * sizeof(PlanKey));
  layout.keys_out = offset;
  offset += align_up(pairs * sizeof(PlanKey));
  layout.pairs_in = offset;
  offset += align_up(pairs * sizeof(int64_t));
  layout.sort_temp = offset;
  // A query (null storage) only computes the size; it launches nothing.
  FMOE_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(
      nullptr, layout.sort_temp_bytes, static_cast<PlanKey*>(nullptr), static_cast<PlanKey*>(nullptr),
      static_cast<int64_t*>(nullptr), static_cast<int64_t*>(nullptr), num_pairs, 0, plan_key_bits(num_experts)));
  offset += align_up(layout.sort_temp_bytes);
  layout.total = offset + kWorkspaceAlign;
  return layout;
}

void check_plan_sizes(int64_t num_pairs, int64_t num_experts) {
  FMOE_CHECK(num_pairs >= 0, "num_pairs must be >= 0, got ", num_pairs);
  FMOE_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  FMOE_CHECK(num_experts < std::numeric_limits<int32_t>::max(), "num_experts must be < 2^31 - 1, got ", num_experts);
}

// topk_idx: [num_pairs] -> keys_in: [num_pairs] (expert id, or num_experts when dropped), pairs_in: [num_pairs]
// Ids outside [-1, num_experts) are dropped and counted into *invalid_count (when given).
__global__ void __launch_bounds__(kThreadsPerBlock)
    plan_keys_kernel(const int64_t* __restrict__ topk_idx, int64_t num_pairs, int64_t num_experts,
                     PlanKey* __restrict__ keys_in, int64_t* __restrict__ pairs_in, int64_t* invalid_count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t invalid = 0;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < num_pairs; p += stride) {
    const int64_t id = topk_idx[p];
    const bool routed = id >= 0 && id < num_experts;
    invalid += (id < -1 || id >= num_experts) ? 1 : 0;
    keys_in[p] = static_cast<PlanKey>(routed ? id : num_experts);
    pairs_in[p] = p;
  }
  // One atomic per warp that saw invalid ids; every lane reaches this point, so the full mask is valid.
  invalid = cuda::warp_sum(invalid);
  if (invalid_count != nullptr && invalid != 0 && threadIdx.x % 32 == 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(invalid_count), static_cast<unsigned long long>(invalid));
  }
}

// keys_out: [num_pairs] sorted -> expert_counts: [num_experts], expert_offsets: [num_experts + 1]
__global__ void __launch_bounds__(kThreadsPerBlock)
    plan_offsets_kernel(const PlanKey* __restrict__ keys_out, int64_t num_pairs, int64_t num_experts,
                        int64_t* __restrict__ expert_counts, int64_t* __restrict__ expert_offsets) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e <= num_experts; e += stride) {
    const int64_t begin = cuda::lower_bound(keys_out, num_pairs, static_cast<PlanKey>(e));
    expert_offsets[e] = begin;
    if (e < num_experts) {
      expert_counts[e] = cuda::lower_bound(keys_out, num_pairs, static_cast<PlanKey>(e + 1)) - begin;
    }
  }
}

// keys_out, sorted_pair: [num_pairs] in sorted order -> pair_pos: [num_pairs]; the dropped tail of sorted_pair
// becomes -1. Each position is owned by one thread and every pair id appears once, so nothing races.
__global__ void __launch_bounds__(kThreadsPerBlock)
    plan_positions_kernel(const PlanKey* __restrict__ keys_out, int64_t num_pairs, int64_t num_experts,
                          int64_t* __restrict__ sorted_pair, int64_t* __restrict__ pair_pos) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < num_pairs; r += stride) {
    const int64_t pair = sorted_pair[r];
    if (static_cast<int64_t>(keys_out[r]) < num_experts) {
      pair_pos[pair] = r;
    } else {
      pair_pos[pair] = -1;
      sorted_pair[r] = -1;
    }
  }
}

}  // namespace

size_t make_plan_cuda_workspace_bytes(int64_t num_pairs, int64_t num_experts) {
  check_plan_sizes(num_pairs, num_experts);
  return plan_layout(num_pairs, num_experts).total;
}

void make_plan_cuda(const int64_t* topk_idx, int64_t num_pairs, int64_t num_experts, int64_t* expert_counts,
                    int64_t* expert_offsets, int64_t* sorted_pair, int64_t* pair_pos, int64_t* invalid_count,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // 1. No pairs: every expert gets 0 rows; write counts and offsets and stop.
  // 2. Carve the workspace: keys in/out, the identity pair ids, CUB's temporary storage.
  // 3. Keys: expert id per pair, dropped and invalid ids keyed num_experts (invalid ones also counted).
  // 4. Stable radix sort of (key, pair id) straight into sorted_pair.
  // 5. Offsets and counts by binary search in the sorted keys; pair_pos by inverting the permutation, with the
  //    dropped tail of sorted_pair set to -1.
  check_plan_sizes(num_pairs, num_experts);
  if (num_pairs == 0) {
    FMOE_CHECK_CUDA(cudaMemsetAsync(expert_counts, 0, static_cast<size_t>(num_experts) * sizeof(int64_t), stream));
    FMOE_CHECK_CUDA(cudaMemsetAsync(expert_offsets, 0, static_cast<size_t>(num_experts + 1) * sizeof(int64_t), stream));
    return;
  }

  const PlanLayout layout = plan_layout(num_pairs, num_experts);
  FMOE_CHECK(workspace != nullptr && workspace_bytes >= layout.total, "make_plan_cuda needs a workspace of ",
             layout.total, " bytes for num_pairs=", num_pairs, ", num_experts=", num_experts, ", got ", workspace_bytes,
             " bytes at ", workspace);
  const uintptr_t base =
      (reinterpret_cast<uintptr_t>(workspace) + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
  auto* keys_in = reinterpret_cast<PlanKey*>(base + layout.keys_in);
  auto* keys_out = reinterpret_cast<PlanKey*>(base + layout.keys_out);
  auto* pairs_in = reinterpret_cast<int64_t*>(base + layout.pairs_in);
  void* sort_temp = reinterpret_cast<void*>(base + layout.sort_temp);

  plan_keys_kernel<<<cuda::grid_for(num_pairs, kThreadsPerBlock), kThreadsPerBlock, 0, stream>>>(
      topk_idx, num_pairs, num_experts, keys_in, pairs_in, invalid_count);
  FMOE_CHECK_LAUNCH();

  size_t sort_temp_bytes = layout.sort_temp_bytes;
  FMOE_CHECK_CUDA(cub::DeviceRadixSort::SortPairs(sort_temp, sort_temp_bytes, keys_in, keys_out, pairs_in, sorted_pair,
                                                  num_pairs, 0, plan_key_bits(num_experts), stream));

  plan_offsets_kernel<<<cuda::grid_for(num_experts + 1, kThreadsPerBlock), kThreadsPerBlock, 0, stream>>>(
      keys_out, num_pairs, num_experts, expert_counts, expert_offsets);
  FMOE_CHECK_LAUNCH();
  plan_positions_kernel<<<cuda::grid_for(num_pairs, kThreadsPerBlock), kThreadsPerBlock, 0, stream>>>(
      keys_out, num_pairs, num_experts, sorted_pair, pair_pos);
  FMOE_CHECK_LAUNCH();
}

}  // namespace fastmoe
