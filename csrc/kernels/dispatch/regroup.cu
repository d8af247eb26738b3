// regroup_index_cuda: the gather index between the rank-major layout an expert-parallel exchange delivers and
// the expert-major layout the experts need (see regroup_index_ref). Each block scans the [ranks, local experts]
// counts in both orders into shared memory (two CUB block scans), then maps its share of the output rows to
// their sources by binary search over the block starts. The scans are tiny (at most kRegroupMaxBlocks entries),
// so every block redoing them costs less than a second launch would.
#include <climits>
#include <cub/block/block_scan.cuh>

#include "kernels/common.cuh"
#include "kernels/dispatch/dispatch.h"

namespace fastmoe {
namespace {

constexpr int kThreads = 1024;
constexpr int kItems = static_cast<int>(kRegroupMaxBlocks / kThreads);
static_assert(kItems * kThreads == kRegroupMaxBlocks, "kRegroupMaxBlocks must be a multiple of the block size");

__device__ __forceinline__ int64_t clamp_count(int64_t count, int64_t num_rows) {
  return count < 0 ? 0 : (count > num_rows ? num_rows : count);
}

// Last index b in [0, n) with table[b] <= value (table is non-decreasing and table[0] == 0 <= value).
__device__ __forceinline__ int64_t last_at_most(const int* table, int64_t n, int64_t value) {
  int64_t lo = 0, hi = n;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (table[mid] <= value) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads)
    regroup_index_kernel(const int64_t* counts, int64_t num_ranks, int64_t num_local, bool inverse, int64_t num_rows,
                         int64_t* src_row) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ int rank_major[kRegroupMaxBlocks];    // start of block j = s * num_local + e, rank-major layout
  __shared__ int expert_major[kRegroupMaxBlocks];  // start of block q = e * num_ranks + s, expert-major layout
  const int64_t n = num_ranks * num_local;

  int64_t values[kItems];
  for (int i = 0; i < kItems; ++i) {
    const int64_t j = static_cast<int64_t>(threadIdx.x) * kItems + i;
    values[i] = j < n ? clamp_count(counts[j], num_rows) : 0;
  }
  int64_t total = 0;
  Scan(temp).ExclusiveSum(values, values, total);
  for (int i = 0; i < kItems; ++i) {
    const int64_t j = static_cast<int64_t>(threadIdx.x) * kItems + i;
    if (j < n) rank_major[j] = static_cast<int>(values[i] < num_rows ? values[i] : num_rows);
  }
  __syncthreads();  // the scan storage is reused
  for (int i = 0; i < kItems; ++i) {
    const int64_t q = static_cast<int64_t>(threadIdx.x) * kItems + i;
    values[i] = q < n ? clamp_count(counts[(q % num_ranks) * num_local + q / num_ranks], num_rows) : 0;
  }
  Scan(temp).ExclusiveSum(values, values);
  for (int i = 0; i < kItems; ++i) {
    const int64_t q = static_cast<int64_t>(threadIdx.x) * kItems + i;
    if (q < n) expert_major[q] = static_cast<int>(values[i] < num_rows ? values[i] : num_rows);
  }
  __syncthreads();

  if (total > num_rows) total = num_rows;
  const int* out_start = inverse ? rank_major : expert_major;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < num_rows;
       r += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (r >= total) {
      src_row[r] = -1;
      continue;
    }
    const int64_t b = last_at_most(out_start, n, r);
    // The same block's start in the input layout.
    const int64_t in_start = inverse ? expert_major[(b % num_local) * num_ranks + b / num_local]
                                     : rank_major[(b % num_ranks) * num_local + b / num_ranks];
    const int64_t src = in_start + (r - out_start[b]);
    src_row[r] = src < num_rows ? src : -1;
  }
}

}  // namespace

void regroup_index_cuda(const int64_t* counts, int64_t num_ranks, int64_t num_local, bool inverse, int64_t num_rows,
                        int64_t* src_row, cudaStream_t stream) {
  FMOE_CHECK(num_ranks >= 1, "num_ranks must be >= 1, got ", num_ranks);
  FMOE_CHECK(num_local >= 1, "num_local must be >= 1, got ", num_local);
  FMOE_CHECK(num_ranks * num_local <= kRegroupMaxBlocks, "regroup_index_cuda handles at most ", kRegroupMaxBlocks,
             " (rank, expert) blocks, got num_ranks * num_local = ", num_ranks * num_local);
  FMOE_CHECK(num_rows >= 0 && num_rows < INT_MAX, "num_rows must be in [0, ", INT_MAX, "), got ", num_rows);
  if (num_rows == 0) return;
  constexpr unsigned int kMaxGrid = 128;
  unsigned int blocks = cuda::grid_for(num_rows, int64_t{kThreads} * 8);
  if (blocks > kMaxGrid) blocks = kMaxGrid;
  regroup_index_kernel<<<blocks, kThreads, 0, stream>>>(counts, num_ranks, num_local, inverse, num_rows, src_row);
  FMOE_CHECK_LAUNCH();
}

}  // namespace fastmoe
