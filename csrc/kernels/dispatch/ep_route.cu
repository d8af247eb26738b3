// ep_route_cuda: per token, the ranks its slots go to (each once) and the per-destination counts of an
// expert-parallel exchange; see ep_route_ref. One thread per token; the counts are summed in a shared-memory
// histogram per block when they fit, then added to the global counts (integer atomics: deterministic).
#include "kernels/common.cuh"
#include "kernels/dispatch/dispatch.h"

namespace fastmoe {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedCounts = 4096;  // 32 KiB of unsigned long long

__device__ __forceinline__ void add_one(unsigned long long* counter) {
  atomicAdd(counter, 1ull);
}

template <bool kShared>
__global__ void __launch_bounds__(kThreads)
    ep_route_kernel(const int64_t* __restrict__ topk_idx, int64_t num_tokens, int64_t k, int64_t num_local,
                    int64_t world, int64_t* __restrict__ token_ranks, unsigned long long* __restrict__ dest_counts) {
  __shared__ unsigned long long shared[kShared ? kSharedCounts : 1];
  const int64_t num_counts = world * (num_local + 1);
  unsigned long long* counts = kShared ? shared : dest_counts;
  if (kShared) {
    for (int64_t i = threadIdx.x; i < num_counts; i += kThreads) shared[i] = 0;
    __syncthreads();
  }
  const int64_t num_experts = num_local * world;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t* row = token_ranks + t * world;
    for (int64_t p = 0; p < world; ++p) row[p] = -1;
    const int64_t* ids = topk_idx + t * k;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t id = ids[j];
      if (id < 0 || id >= num_experts) continue;
      const int64_t p = id / num_local;
      add_one(&counts[p * (num_local + 1) + id % num_local]);
      bool first = true;  // the first slot of this token on rank p sends the token row
      for (int64_t i = 0; i < j; ++i) {
        const int64_t other = ids[i];
        if (other >= 0 && other < num_experts && other / num_local == p) first = false;
      }
      if (first) {
        row[p] = p;
        add_one(&counts[p * (num_local + 1) + num_local]);
      }
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < num_counts; i += kThreads) {
      if (shared[i] != 0) atomicAdd(&dest_counts[i], shared[i]);
    }
  }
}

}  // namespace

void ep_route_cuda(const int64_t* topk_idx, int64_t num_tokens, int64_t k, int64_t num_local, int64_t world,
                   int64_t* token_ranks, int64_t* dest_counts, cudaStream_t stream) {
  FMOE_CHECK(num_tokens >= 0 && k >= 0, "num_tokens and k must be >= 0, got ", num_tokens, " and ", k);
  FMOE_CHECK(num_local >= 1, "num_local must be >= 1, got ", num_local);
  FMOE_CHECK(world >= 1, "world must be >= 1, got ", world);
  const int64_t num_counts = world * (num_local + 1);
  FMOE_CHECK_CUDA(cudaMemsetAsync(dest_counts, 0, num_counts * sizeof(int64_t), stream));
  if (num_tokens == 0) return;
  auto* counts = reinterpret_cast<unsigned long long*>(dest_counts);
  const unsigned int blocks = cuda::grid_for(num_tokens, kThreads * 4);
  if (num_counts <= kSharedCounts) {
    ep_route_kernel<true>
        <<<blocks, kThreads, 0, stream>>>(topk_idx, num_tokens, k, num_local, world, token_ranks, counts);
  } else {
    ep_route_kernel<false>
        <<<blocks, kThreads, 0, stream>>>(topk_idx, num_tokens, k, num_local, world, token_ranks, counts);
  }
  FMOE_CHECK_LAUNCH();
}

}  // namespace fastmoe
