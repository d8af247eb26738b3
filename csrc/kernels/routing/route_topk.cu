// CUDA routing: logits -> top-k expert ids and scores, and the score backward. Same contract as
// csrc/ref/routing_ref.h; one warp per token.
//
// Selection needs no per-expert "taken" storage: the order (NaN first, then larger, ties to the lower id) is a
// strict total order on (value, id), so after picking a pair every later pick is the best pair that ranks
// strictly after it. Each of the k passes rescans the token's row (L1/L2 resident) and reduces across the warp.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/routing/routing.h"

namespace fastmoe {
namespace {

using cuda::dacc_t;
using cuda::kWarpSize;

constexpr int kWarpsPerBlock = 4;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;

// True when (a, a_id) ranks before (b, b_id): NaN first, then larger values, equal values by lower id. This is
// ranks_before of routing_ref.cpp, and it must stay identical to it for the ids to match bit for bit.
template <typename A>
__device__ __forceinline__ bool ranks_before(A a, int64_t a_id, A b, int64_t b_id) {
  const bool a_nan = isnan(a), b_nan = isnan(b);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return a_id < b_id;
}

// One candidate of the selection; id < 0 means "no candidate" (a lane whose experts are all taken).
template <typename A>
struct Candidate {
  A value;
  int64_t id;
};

template <typename A>
__device__ __forceinline__ Candidate<A> better_of(Candidate<A> a, Candidate<A> b) {
  if (b.id < 0) return a;
  if (a.id < 0) return b;
  return ranks_before(b.value, b.id, a.value, a.id) ? b : a;
}

// Best candidate of the warp, on every lane. The order is total on distinct ids, so both lanes of every shuffle
// pair keep the same winner and all lanes end with the same result.
template <typename A>
__device__ __forceinline__ Candidate<A> warp_best(Candidate<A> mine) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    Candidate<A> other;
    other.value = __shfl_xor_sync(0xffffffffu, mine.value, offset);
    other.id = __shfl_xor_sync(0xffffffffu, mine.id, offset);
    mine = better_of(mine, other);
  }
  return mine;
}

// Max-subtracted softmax normaliser of a full row, over the warp: returns (max, sum of exp(l - max)). A NaN in
// the row makes the sum NaN, so every probability is NaN, as in the reference.
template <typename T>
__device__ __forceinline__ void row_softmax_stats(const T* row, int64_t num_experts, int lane, dacc_t<T>* max_out,
                                                  dacc_t<T>* total_out) {
  using A = dacc_t<T>;
  const A max_value = cuda::warp_row_max(row, num_experts, lane);
  A total = 0;
  for (int64_t e = lane; e < num_experts; e += kWarpSize) total += cuda::exp_acc(cuda::to_acc(row[e]) - max_value);
  *max_out = max_value;
  *total_out = cuda::warp_sum(total);
}

// logits:     [num_tokens, num_experts]
// topk_idx:   [num_tokens, k], written
// topk_score: [num_tokens, k], written
template <typename T, bool kSoftmaxFirst>
__global__ void __launch_bounds__(kThreadsPerBlock)
    route_topk_kernel(const T* __restrict__ logits, int64_t num_tokens, int64_t num_experts, int64_t k,
                      int64_t* __restrict__ topk_idx, T* __restrict__ topk_score) {
  using A = dacc_t<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; token < num_tokens;
       token += warps_total) {
    const T* row = logits + token * num_experts;
    int64_t* idx_out = topk_idx + token * k;
    T* score_out = topk_score + token * k;

    // Both score functions rank the logits (softmax is monotone, and ranking logits keeps the ids independent of
    // how exp rounds); kSoftmaxThenTopk then scores each pick by its full-row probability exp(l - max) / total.
    A max_value = 0, total = 1;
    if (kSoftmaxFirst) row_softmax_stats(row, num_experts, lane, &max_value, &total);
    auto value_of = [&](int64_t e) -> A { return cuda::to_acc(row[e]); };

    Candidate<A> previous{A(0), -1};
    A first_value = 0;
    for (int64_t j = 0; j < k; ++j) {
      Candidate<A> best{A(0), -1};
      for (int64_t e = lane; e < num_experts; e += kWarpSize) {
        const A value = value_of(e);
        // Skip what earlier passes took: exactly the pairs that rank at or before the previous pick.
        if (previous.id >= 0 && !ranks_before(previous.value, previous.id, value, e)) continue;
        best = better_of(best, Candidate<A>{value, e});
      }
      best = warp_best(best);  // k <= num_experts guarantees a candidate somewhere in the warp
      if (lane == 0) {
        idx_out[j] = best.id;
        if (kSoftmaxFirst) score_out[j] = cuda::from_acc<T>(cuda::exp_acc(best.value - max_value) / total);
      }
      if (j == 0) first_value = best.value;
      previous = best;
    }

    if (!kSoftmaxFirst) {
      // Softmax over the k picks. They come out in descending order, so the max is the first pick (NaN if any
      // pick is NaN, which then makes every score NaN, as in the reference).
      __syncwarp();  // lane 0's id stores are visible to the whole warp after this
      A partial = 0;
      for (int64_t j = lane; j < k; j += kWarpSize) partial += cuda::exp_acc(value_of(idx_out[j]) - first_value);
      const A pick_total = cuda::warp_sum(partial);
      for (int64_t j = lane; j < k; j += kWarpSize) {
        score_out[j] = cuda::from_acc<T>(cuda::exp_acc(value_of(idx_out[j]) - first_value) / pick_total);
      }
    }
  }
}

// grad_score, topk_score: [num_tokens, k]; logits: [num_tokens, num_experts]; topk_idx: [num_tokens, k]
// grad_logits: [num_tokens, num_experts], written
// Ids outside [0, num_experts) (the reference rejects them) are skipped so that nothing is written out of bounds.
template <typename T, bool kSoftmaxFirst>
__global__ void __launch_bounds__(kThreadsPerBlock)
    route_topk_backward_kernel(const T* __restrict__ grad_score, const T* __restrict__ logits,
                               const int64_t* __restrict__ topk_idx, const T* __restrict__ topk_score,
                               int64_t num_tokens, int64_t num_experts, int64_t k, T* __restrict__ grad_logits) {
  using A = dacc_t<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; token < num_tokens;
       token += warps_total) {
    const int64_t* idx = topk_idx + token * k;
    const T* grad = grad_score + token * k;
    const T* row = logits + token * num_experts;
    T* out = grad_logits + token * num_experts;
    if (!kSoftmaxFirst) {
      // s = softmax(l_sel): dl_sel[j] = s_j * (g_j - sum_i g_i s_i); unselected logits get zero.
      const T* score = topk_score + token * k;
      A partial = 0;
      for (int64_t j = lane; j < k; j += kWarpSize) partial += cuda::to_acc(grad[j]) * cuda::to_acc(score[j]);
      const A dot = cuda::warp_sum(partial);
      for (int64_t e = lane; e < num_experts; e += kWarpSize) out[e] = cuda::from_acc<T>(A(0));
      __syncwarp();  // the zero fill is ordered before the scatter below, which other lanes may do
      for (int64_t j = lane; j < k; j += kWarpSize) {
        const int64_t id = idx[j];
        if (id < 0 || id >= num_experts) continue;
        out[id] = cuda::from_acc<T>(cuda::to_acc(score[j]) * (cuda::to_acc(grad[j]) - dot));
      }
    } else {
      // p = softmax(l) over all E, recomputed in the accumulation type; with G = g scattered to E:
      // dl = p * (G - <G, p>). Unselected experts get -p * dot; selected ones -p * dot + p * g.
      A max_value, total;
      row_softmax_stats(row, num_experts, lane, &max_value, &total);
      auto prob_of = [&](int64_t e) -> A { return cuda::exp_acc(cuda::to_acc(row[e]) - max_value) / total; };
      A partial = 0;
      for (int64_t j = lane; j < k; j += kWarpSize) {
        const int64_t id = idx[j];
        if (id >= 0 && id < num_experts) partial += cuda::to_acc(grad[j]) * prob_of(id);
      }
      const A dot = cuda::warp_sum(partial);
      for (int64_t e = lane; e < num_experts; e += kWarpSize) out[e] = cuda::from_acc<T>(-prob_of(e) * dot);
      __syncwarp();  // the fill is ordered before the overwrite of the selected entries
      for (int64_t j = lane; j < k; j += kWarpSize) {
        const int64_t id = idx[j];
        if (id < 0 || id >= num_experts) continue;
        const A prob = prob_of(id);
        out[id] = cuda::from_acc<T>(-prob * dot + prob * cuda::to_acc(grad[j]));
      }
    }
  }
}

void check_route_args_cuda(int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn) {
  FMOE_CHECK(num_tokens >= 0, "num_tokens must be >= 0, got ", num_tokens);
  FMOE_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  FMOE_CHECK(k >= 1 && k <= num_experts, "k must be in [1, num_experts=", num_experts, "], got ", k);
  FMOE_CHECK(fn == ScoreFn::kTopkThenSoftmax || fn == ScoreFn::kSoftmaxThenTopk, "unknown score function code ",
             static_cast<int>(fn));
}

}  // namespace

void route_topk_cuda(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn,
                     int64_t* topk_idx, void* topk_score, cudaStream_t stream) {
  check_route_args_cuda(num_tokens, num_experts, k, fn);
  if (num_tokens == 0) return;
  const unsigned int blocks = cuda::grid_for(num_tokens, kWarpsPerBlock);
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "route_topk_cuda", T, [&] {
    const T* logits_t = static_cast<const T*>(logits);
    T* score_t = static_cast<T*>(topk_score);
    if (fn == ScoreFn::kSoftmaxThenTopk) {
      route_topk_kernel<T, true>
          <<<blocks, kThreadsPerBlock, 0, stream>>>(logits_t, num_tokens, num_experts, k, topk_idx, score_t);
    } else {
      route_topk_kernel<T, false>
          <<<blocks, kThreadsPerBlock, 0, stream>>>(logits_t, num_tokens, num_experts, k, topk_idx, score_t);
    }
    FMOE_CHECK_LAUNCH();
  });
}

void route_topk_backward_cuda(DType dtype, const void* grad_score, const void* logits, const int64_t* topk_idx,
                              const void* topk_score, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn,
                              void* grad_logits, cudaStream_t stream) {
  check_route_args_cuda(num_tokens, num_experts, k, fn);
  if (num_tokens == 0) return;
  const unsigned int blocks = cuda::grid_for(num_tokens, kWarpsPerBlock);
  FMOE_CUDA_DISPATCH_FLOAT_TYPES(dtype, "route_topk_backward_cuda", T, [&] {
    const T* grad_t = static_cast<const T*>(grad_score);
    const T* logits_t = static_cast<const T*>(logits);
    const T* score_t = static_cast<const T*>(topk_score);
    T* out_t = static_cast<T*>(grad_logits);
    if (fn == ScoreFn::kSoftmaxThenTopk) {
      route_topk_backward_kernel<T, true><<<blocks, kThreadsPerBlock, 0, stream>>>(grad_t, logits_t, topk_idx, score_t,
                                                                                   num_tokens, num_experts, k, out_t);
    } else {
      route_topk_backward_kernel<T, false><<<blocks, kThreadsPerBlock, 0, stream>>>(grad_t, logits_t, topk_idx, score_t,
                                                                                    num_tokens, num_experts, k, out_t);
    }
    FMOE_CHECK_LAUNCH();
  });
}

}  // namespace fastmoe
