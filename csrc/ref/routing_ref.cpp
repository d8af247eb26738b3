#include "ref/routing_ref.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "ref/softmax_ref.h"

namespace fastmoe {

const char* score_fn_name(ScoreFn fn) {
  switch (fn) {
    case ScoreFn::kTopkThenSoftmax: return "topk_softmax";
    case ScoreFn::kSoftmaxThenTopk: return "softmax_topk";
  }
  return "unknown";
}

namespace {

// True when a ranks before b: NaN first, then larger values; equal values keep the lower id first.
template <typename A>
bool ranks_before(A a, int64_t a_id, A b, int64_t b_id) {
  const bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return a_id < b_id;
}

template <typename T>
void route_topk_impl(const T* logits, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn, int64_t* topk_idx,
                     T* topk_score) {
  using A = acc_t<T>;
  std::vector<A> values(num_experts);
  std::vector<int64_t> chosen(k);
  std::vector<A> chosen_values(k);
  std::vector<A> probs(num_experts);
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t e = 0; e < num_experts; ++e) values[e] = to_acc(logits[t * num_experts + e]);
    // Both score functions rank the logits: softmax is monotone, and ranking logits keeps the ids independent of
    // how exp rounds on a given machine. kSoftmaxThenTopk then scores each pick by its full-row probability.
    if (fn == ScoreFn::kSoftmaxThenTopk) {
      probs = values;
      softmax_inplace<wide_acc_t<T>>(probs.data(), num_experts);
    }
    // Partial selection sort: k passes, each picks the best id not yet taken. k <= E is small.
    std::vector<bool> taken(num_experts, false);
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < num_experts; ++e) {
        if (taken[e]) continue;
        if (best < 0 || ranks_before(values[e], e, values[best], best)) best = e;
      }
      taken[best] = true;
      chosen[j] = best;
      chosen_values[j] = fn == ScoreFn::kSoftmaxThenTopk ? probs[best] : values[best];
    }
    if (fn == ScoreFn::kTopkThenSoftmax) softmax_inplace<wide_acc_t<T>>(chosen_values.data(), k);
    for (int64_t j = 0; j < k; ++j) {
      topk_idx[t * k + j] = chosen[j];
      topk_score[t * k + j] = from_acc<T>(chosen_values[j]);
    }
  }
}

template <typename T>
void route_topk_backward_impl(const T* grad_score, const T* logits, const int64_t* topk_idx, const T* topk_score,
                              int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn, T* grad_logits) {
  using A = acc_t<T>;
  std::vector<A> grad(num_experts), probs(num_experts);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t* idx = topk_idx + t * k;
    const T* score = topk_score + t * k;
    const T* g = grad_score + t * k;
    std::fill(grad.begin(), grad.end(), A(0));
    if (fn == ScoreFn::kTopkThenSoftmax) {
      // s = softmax(l_sel): dl_sel[j] = s_j * (g_j - sum_i g_i s_i); unselected logits get nothing.
      A dot = 0;
      for (int64_t j = 0; j < k; ++j) dot += to_acc(g[j]) * to_acc(score[j]);
      for (int64_t j = 0; j < k; ++j) grad[idx[j]] = to_acc(score[j]) * (to_acc(g[j]) - dot);
    } else {
      // p = softmax(l) over all E; score_j = p[idx_j]. With G = g scattered to E: dl = p * (G - <G, p>).
      // p is recomputed from the logits in the accumulation type rather than read from the rounded scores.
      for (int64_t e = 0; e < num_experts; ++e) probs[e] = to_acc(logits[t * num_experts + e]);
      softmax_inplace<wide_acc_t<T>>(probs.data(), num_experts);
      A dot = 0;
      for (int64_t j = 0; j < k; ++j) dot += to_acc(g[j]) * probs[idx[j]];
      for (int64_t e = 0; e < num_experts; ++e) grad[e] = -probs[e] * dot;
      for (int64_t j = 0; j < k; ++j) grad[idx[j]] += probs[idx[j]] * to_acc(g[j]);
    }
    for (int64_t e = 0; e < num_experts; ++e) grad_logits[t * num_experts + e] = from_acc<T>(grad[e]);
  }
}

void check_route_args(int64_t num_tokens, int64_t num_experts, int64_t k) {
  FMOE_CHECK(num_tokens >= 0, "num_tokens must be >= 0, got ", num_tokens);
  FMOE_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  FMOE_CHECK(k >= 1 && k <= num_experts, "k must be in [1, num_experts=", num_experts, "], got ", k);
}

}  // namespace

void route_topk_ref(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn,
                    int64_t* topk_idx, void* topk_score) {
  check_route_args(num_tokens, num_experts, k);
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "route_topk_ref", [&] {
    route_topk_impl(static_cast<const scalar_t*>(logits), num_tokens, num_experts, k, fn, topk_idx,
                    static_cast<scalar_t*>(topk_score));
  });
}

void route_topk_backward_ref(DType dtype, const void* grad_score, const void* logits, const int64_t* topk_idx,
                             const void* topk_score, int64_t num_tokens, int64_t num_experts, int64_t k, ScoreFn fn,
                             void* grad_logits) {
  check_route_args(num_tokens, num_experts, k);
  for (int64_t i = 0; i < num_tokens * k; ++i) {
    FMOE_CHECK(topk_idx[i] >= 0 && topk_idx[i] < num_experts, "topk_idx[", i / k, ", ", i % k, "] = ", topk_idx[i],
               " is outside [0, ", num_experts, ")");
  }
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "route_topk_backward_ref", [&] {
    route_topk_backward_impl(static_cast<const scalar_t*>(grad_score), static_cast<const scalar_t*>(logits), topk_idx,
                             static_cast<const scalar_t*>(topk_score), num_tokens, num_experts, k, fn,
                             static_cast<scalar_t*>(grad_logits));
  });
}

}  // namespace fastmoe
