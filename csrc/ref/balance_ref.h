// CPU reference for the balance stage: capacity limiting by score, and the load-balancing loss term. Torch-free.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace fastmoe {

// Of the pairs (pair = token * k + slot) routed to expert e, keeps the expert_capacity[e] with the highest score
// and sets the others to -1. Order: larger score first, NaN below every number (a NaN-scored assignment is the
// first to go), ties to the lower pair id, so the result is deterministic.
// topk_idx:        [num_pairs] int64, expert id in [0, num_experts) or -1 (already dropped; stays -1)
// topk_score:      [num_pairs], score_dtype
// expert_capacity: [num_experts] int64, >= 0
// kept_idx:        [num_pairs] int64, written (may alias nothing)
// num_dropped:     [1] int64, written: pairs this call set to -1
// Throws fastmoe::Error naming the position and value of a bad id or capacity.
void capacity_limit_ref(const int64_t* topk_idx, const void* topk_score, DType score_dtype, int64_t num_pairs,
                        const int64_t* expert_capacity, int64_t num_experts, int64_t* kept_idx, int64_t* num_dropped);

// The load-balancing term of the GShard and Switch losses (and the naive gate's):
//   loss = scale * sum_t sum_e p[t, e] * counts[e],   p[t] = softmax(logits[t]) (max subtracted),
// which is coef * E * sum_e f_e P_e when scale = coef * E / (num_pairs * T): f_e = counts[e] / num_pairs is the
// share of the routed (token, slot) pairs on expert e and P_e the mean of p[t, e] over the T tokens.
// logits:    [num_tokens, num_experts] row-major, dtype (any of the four)
// counts:    [num_experts] int64 (>= 0; not checked)
// loss:      one element of loss_dtype, written: float32, or float64 when dtype is float64 (the accumulation type
//            of dtype); 0 when num_tokens == 0
// The reference sums t ascending, and within a token e ascending; the CUDA kernel sums in another fixed order, so
// the two agree within rounding. Throws fastmoe::Error for a negative size or a loss_dtype that is not dtype's
// accumulation type.
// The loss dtype of dtype's logits: their accumulation type, float32, or float64 for float64 logits.
inline DType balance_loss_dtype(DType dtype) {
  return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
}
// The checks of the balance-loss functions (reference and CUDA): sizes, and the loss dtype against the logits'.
// `name` is the function whose message it is.
void check_balance_loss_sizes(const char* name, int64_t num_tokens, int64_t num_experts);
void check_balance_loss_args(const char* name, DType dtype, int64_t num_tokens, int64_t num_experts, DType loss_dtype);

void balance_loss_ref(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts, const int64_t* counts,
                      double scale, DType loss_dtype, void* loss);

// Its gradient with respect to the logits for the upstream gradient g = *grad_loss (one element of loss_dtype):
//   grad_logits[t, e] = p[t, e] * (u_e - sum_j p[t, j] * u_j),   u_e = g * scale * counts[e],
// written as [num_tokens, num_experts] in dtype (computed in the accumulation type, rounded once).
void balance_loss_backward_ref(DType dtype, const void* logits, int64_t num_tokens, int64_t num_experts,
                               const int64_t* counts, double scale, DType loss_dtype, const void* grad_loss,
                               void* grad_logits);

}  // namespace fastmoe
