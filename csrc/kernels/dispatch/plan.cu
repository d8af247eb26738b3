// CUDA routing plan: per-expert counts, offsets and the stable permutation of the (token, slot) pairs. Same
// contract as make_plan_ref in csrc/ref/dispatch_ref.h, without a host synchronisation.
//
// The plan is a stable sort of the pair ids by expert id. CUB's radix sort is stable, so sorting
// (key = expert id, dropped pairs keyed num_experts so they sort last; value = pair id) gives the reference's
// order inside each expert. Offsets then fall out of the sorted keys by binary search, with no atomics, so every
// output is deterministic.
//
// A small plan (at most kOneBlockMaxPairs pairs and kOneBlockMaxExperts experts: a training layer's few thousand
// tokens) runs instead as one kernel of one block, a counting sort in shared memory: the sort above is a handful of
// launches (CUB's passes, the key, offset and position kernels), and at these sizes their host-side cost is what
// the step waits for. Its output is the same.
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <limits>

#include "kernels/common.cuh"
#include "kernels/dispatch/dispatch.h"

namespace fastmoe {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr size_t kWorkspaceAlign = 256;  // every buffer starts on a 256-byte boundary, as CUB prefers

using PlanKey = uint32_t;

constexpr int kOneBlockThreads = 256;
constexpr int64_t kOneBlockMaxPairs = 16384;  // 64 pairs per thread; every row index fits a uint16_t
constexpr int64_t kOneBlockMaxExperts = 64;   // (64 + 1) keys x 256 threads x 2 bytes = 32.5 KiB of shared memory
static_assert(kOneBlockMaxPairs <= 65535, "row indices of the one-block plan are uint16_t");

bool one_block_plan(int64_t num_pairs, int64_t num_experts) {
  return num_pairs <= kOneBlockMaxPairs && num_experts <= kOneBlockMaxExperts;
}

size_t one_block_shared_bytes(int64_t num_experts) {
  return static_cast<size_t>(num_experts + 1) * kOneBlockThreads * sizeof(uint16_t);
}

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

// The whole plan in one block: a stable counting sort. Thread t owns the contiguous pairs [t * chunk, (t + 1) *
// chunk), and bins[key * kOneBlockThreads + t] counts its pairs of each key (expert id, or num_experts when
// dropped). An exclusive scan of the bins in key-major order turns each into the first row of thread t's pairs of
// that key: the rows of a key go to threads in order, and a thread walks its pairs in order, so pairs keep their
// order inside each expert, as the reference's stable sort. Invalid ids are dropped and counted as in
// plan_keys_kernel.
__global__ void __launch_bounds__(kOneBlockThreads)
    plan_one_block_kernel(const int64_t* __restrict__ topk_idx, int64_t num_pairs, int64_t num_experts,
                          int64_t* __restrict__ expert_counts, int64_t* __restrict__ expert_offsets,
                          int64_t* __restrict__ sorted_pair, int64_t* __restrict__ pair_pos, int64_t* invalid_count) {
  using Scan = cub::BlockScan<int, kOneBlockThreads>;
  using Reduce = cub::BlockReduce<int64_t, kOneBlockThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } temp;
  extern __shared__ uint16_t bins[];
  const int t = static_cast<int>(threadIdx.x);
  const int64_t keys = num_experts + 1;
  const auto key_of = [&](int64_t id) { return id >= 0 && id < num_experts ? id : num_experts; };

  for (int64_t i = t; i < keys * kOneBlockThreads; i += kOneBlockThreads) bins[i] = 0;
  __syncthreads();
  const int64_t chunk = (num_pairs + kOneBlockThreads - 1) / kOneBlockThreads;
  const int64_t begin = t * chunk < num_pairs ? t * chunk : num_pairs;
  const int64_t end = begin + chunk < num_pairs ? begin + chunk : num_pairs;
  int64_t invalid = 0;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t id = topk_idx[p];
    invalid += (id < -1 || id >= num_experts) ? 1 : 0;
    ++bins[key_of(id) * kOneBlockThreads + t];
  }
  __syncthreads();

  // Thread t scans the entries [t * keys, (t + 1) * keys) of the key-major order.
  int total = 0;
  for (int64_t i = 0; i < keys; ++i) total += bins[t * keys + i];
  int running = 0;
  Scan(temp.scan).ExclusiveSum(total, running);
  for (int64_t i = 0; i < keys; ++i) {
    const int count = bins[t * keys + i];
    bins[t * keys + i] = static_cast<uint16_t>(running);
    running += count;
  }
  __syncthreads();

  // Key e's rows start at thread 0's first row of key e; the dropped key's start is the number of routed pairs.
  for (int64_t e = t; e <= num_experts; e += kOneBlockThreads) {
    const int64_t start = bins[e * kOneBlockThreads];
    expert_offsets[e] = start;
    if (e < num_experts) expert_counts[e] = static_cast<int64_t>(bins[(e + 1) * kOneBlockThreads]) - start;
  }
  __syncthreads();  // the walk below moves the starts that were just read

  for (int64_t p = begin; p < end; ++p) {
    const int64_t key = key_of(topk_idx[p]);
    const int64_t row = bins[key * kOneBlockThreads + t]++;
    const bool routed = key < num_experts;
    sorted_pair[row] = routed ? p : -1;
    pair_pos[p] = routed ? row : -1;
  }

  // The same count as the multi-block path adds (a block-wide sum, then one atomic).
  const int64_t block_invalid = Reduce(temp.reduce).Sum(invalid);
  if (t == 0 && invalid_count != nullptr && block_invalid != 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(invalid_count), static_cast<unsigned long long>(block_invalid));
  }
}

}  // namespace

size_t make_plan_cuda_workspace_bytes(int64_t num_pairs, int64_t num_experts) {
  check_plan_sizes(num_pairs, num_experts);
  if (one_block_plan(num_pairs, num_experts)) return 0;
  return plan_layout(num_pairs, num_experts).total;
}

void make_plan_cuda(const int64_t* topk_idx, int64_t num_pairs, int64_t num_experts, int64_t* expert_counts,
                    int64_t* expert_offsets, int64_t* sorted_pair, int64_t* pair_pos, int64_t* invalid_count,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // 1. No pairs: every expert gets 0 rows; write counts and offsets and stop. A small plan: one block, stop.
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
  if (one_block_plan(num_pairs, num_experts)) {
    plan_one_block_kernel<<<1, kOneBlockThreads, one_block_shared_bytes(num_experts), stream>>>(
        topk_idx, num_pairs, num_experts, expert_counts, expert_offsets, sorted_pair, pair_pos, invalid_count);
    FMOE_CHECK_LAUNCH();
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
