#include "ref/balance_ref.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "ref/softmax_ref.h"

namespace fastmoe {
namespace {

// True when (a, pair a_id) is kept before (b, b_id): larger score first, NaN last, ties to the lower pair id.
bool keeps_before(double a, int64_t a_id, double b, int64_t b_id) {
  const bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return a_id < b_id;
}

}  // namespace

void capacity_limit_ref(const int64_t* topk_idx, const void* topk_score, DType score_dtype, int64_t num_pairs,
                        const int64_t* expert_capacity, int64_t num_experts, int64_t* kept_idx, int64_t* num_dropped) {
  // 1. Validate ids and capacities.  2. Bucket the pairs by expert (in pair order).  3. Per expert, order its
  // pairs by keeps_before and drop all past its capacity.
  FMOE_CHECK(num_pairs >= 0, "num_pairs must be >= 0, got ", num_pairs);
  FMOE_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  for (int64_t e = 0; e < num_experts; ++e) {
    FMOE_CHECK(expert_capacity[e] >= 0, "expert_capacity[", e, "] = ", expert_capacity[e], " must be >= 0");
  }
  std::vector<double> score(num_pairs);
  FMOE_DISPATCH_FLOAT_TYPES(score_dtype, "capacity_limit_ref", [&] {
    const auto* s = static_cast<const scalar_t*>(topk_score);
    for (int64_t p = 0; p < num_pairs; ++p) score[p] = static_cast<double>(to_acc(s[p]));
  });
  std::vector<std::vector<int64_t>> pairs_of(num_experts);
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t id = topk_idx[p];
    FMOE_CHECK(id >= -1 && id < num_experts, "topk_idx holds expert id ", id, " at flat position ", p,
               ", outside [-1, num_experts=", num_experts, ")");
    kept_idx[p] = id;
    if (id >= 0) pairs_of[id].push_back(p);
  }
  int64_t dropped = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    std::vector<int64_t>& pairs = pairs_of[e];
    if (static_cast<int64_t>(pairs.size()) <= expert_capacity[e]) continue;
    std::sort(pairs.begin(), pairs.end(), [&](int64_t a, int64_t b) { return keeps_before(score[a], a, score[b], b); });
    for (size_t i = static_cast<size_t>(expert_capacity[e]); i < pairs.size(); ++i) {
      kept_idx[pairs[i]] = -1;
      ++dropped;
    }
  }
  *num_dropped = dropped;
}

void check_balance_loss_sizes(const char* name, int64_t num_tokens, int64_t num_experts) {
  FMOE_CHECK(num_tokens >= 0, name, ": num_tokens must be >= 0, got ", num_tokens);
  FMOE_CHECK(num_experts >= 1, name, ": num_experts must be >= 1, got ", num_experts);
}

void check_balance_loss_args(const char* name, DType dtype, int64_t num_tokens, int64_t num_experts, DType loss_dtype) {
  check_balance_loss_sizes(name, num_tokens, num_experts);
  FMOE_CHECK(loss_dtype == balance_loss_dtype(dtype), name, ": loss_dtype must be ",
             dtype_name(balance_loss_dtype(dtype)), " (the accumulation type of ", dtype_name(dtype), " logits), got ",
             dtype_name(loss_dtype));
}

namespace {

// probs = softmax(row) in the accumulation type A (softmax_ref.h, as the routing reference computes it).
template <typename W, typename T>
void row_softmax(const T* row, int64_t num_experts, acc_t<T>* probs) {
  for (int64_t e = 0; e < num_experts; ++e) probs[e] = to_acc(row[e]);
  softmax_inplace<W>(probs, num_experts);
}

template <typename T>
void balance_loss_impl(const T* logits, int64_t num_tokens, int64_t num_experts, const int64_t* counts, double scale,
                       acc_t<T>* loss) {
  // The sums over e and over t are long reductions, so they run in wide_acc_t (docs/numerics.md); the result is
  // rounded once to the accumulation type.
  using A = acc_t<T>;
  using W = wide_acc_t<T>;
  std::vector<A> probs(num_experts);
  W total = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    row_softmax<W>(logits + t * num_experts, num_experts, probs.data());
    W token_sum = 0;
    for (int64_t e = 0; e < num_experts; ++e) token_sum += static_cast<W>(probs[e]) * static_cast<W>(counts[e]);
    total += token_sum;
  }
  *loss = static_cast<A>(total * static_cast<W>(static_cast<A>(scale)));
}

template <typename T>
void balance_loss_backward_impl(const T* logits, int64_t num_tokens, int64_t num_experts, const int64_t* counts,
                                double scale, acc_t<T> grad, T* grad_logits) {
  using A = acc_t<T>;
  using W = wide_acc_t<T>;
  std::vector<A> probs(num_experts), u(num_experts);
  const A grad_scale = grad * static_cast<A>(scale);
  for (int64_t e = 0; e < num_experts; ++e) u[e] = grad_scale * static_cast<A>(counts[e]);
  for (int64_t t = 0; t < num_tokens; ++t) {
    row_softmax<W>(logits + t * num_experts, num_experts, probs.data());
    W dot = 0;
    for (int64_t e = 0; e < num_experts; ++e) dot += static_cast<W>(probs[e]) * static_cast<W>(u[e]);
    for (int64_t e = 0; e < num_experts; ++e) {
      const W value = static_cast<W>(probs[e]) * (static_cast<W>(u[e]) - dot);
      grad_logits[t * num_experts + e] = from_acc<T>(static_cast<A>(value));
    }
  }
}

}  // namespace

void balance_loss_ref(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts, const int64_t* counts,
                      double scale, DType loss_dtype, void* loss) {
  check_balance_loss_args("balance_loss_ref", dtype, num_tokens, num_experts, loss_dtype);
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "balance_loss_ref", [&] {
    using A = acc_t<scalar_t>;
    if (num_tokens == 0) {  // +0 whatever the sign or value of scale, as the CUDA kernel's memset writes
      *static_cast<A*>(loss) = A(0);
      return;
    }
    balance_loss_impl(static_cast<const scalar_t*>(logits), num_tokens, num_experts, counts, scale,
                      static_cast<acc_t<scalar_t>*>(loss));
  });
}

void balance_loss_backward_ref(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts,
                               const int64_t* counts, double scale, DType loss_dtype, const void* grad_loss,
                               void* grad_logits) {
  check_balance_loss_args("balance_loss_backward_ref", dtype, num_tokens, num_experts, loss_dtype);
  FMOE_DISPATCH_FLOAT_TYPES(dtype, "balance_loss_backward_ref", [&] {
    using A = acc_t<scalar_t>;
    if (num_tokens == 0) return;
    balance_loss_backward_impl(static_cast<const scalar_t*>(logits), num_tokens, num_experts, counts, scale,
                               *static_cast<const A*>(grad_loss), static_cast<scalar_t*>(grad_logits));
  });
}

}  // namespace fastmoe
