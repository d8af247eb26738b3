// Backward ops, callable from the C++ autograd functions. Not part of the public API (include/fastmoe/ops.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>

namespace fastmoe::ops {

// True when autograd would record a call on these inputs (grad mode on and one of them requiring grad). The
// backward ops' Autograd kernels take the plain kernel otherwise: a first-order backward runs with grad mode
// off, and building an autograd node there would only cost host time.
inline bool records_graph(std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor& t : inputs) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

// The dtype of the gates' losses and router probabilities: at least fp32 (fp64 stays fp64).
inline at::ScalarType loss_dtype(const at::Tensor& t) {
  return c10::promoteTypes(t.scalar_type(), at::kFloat);
}

// balance_loss's factor coef * E / (pairs * T) for logits [T, E] (1 in place of a zero count of pairs or tokens:
// the loss is 0 then).
inline double balance_scale(int64_t num_tokens, int64_t num_experts, int64_t num_pairs, double coef) {
  return coef * static_cast<double>(num_experts) /
         (static_cast<double>(num_pairs > 0 ? num_pairs : 1) * static_cast<double>(num_tokens > 0 ? num_tokens : 1));
}

// balance_loss_backward's argument checks (the messages name the argument and the value); its Autograd kernel runs
// them before recording the backward as ATen ops, which would not check them.
void check_balance_loss_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& expert_counts,
                                 int64_t num_pairs, double coef);

// swiglu's and swiglu_backward's argument checks; swiglu_backward's Autograd kernel runs them before recording the
// backward as ATen ops.
void check_swiglu(const at::Tensor& h, const std::optional<at::Tensor>& scale = std::nullopt);
void check_swiglu_backward(const at::Tensor& grad, const at::Tensor& h,
                           const std::optional<at::Tensor>& scale = std::nullopt);

at::Tensor route_topk_backward(const at::Tensor& grad_score, const at::Tensor& logits, const at::Tensor& topk_idx,
                               const at::Tensor& topk_score, const std::string& score_fn);

// Returns (grad_y_sorted [T*k, d], grad_score [T, k]); grad_score is empty ([0]) unless need_score_grad.
std::tuple<at::Tensor, at::Tensor> unpermute_combine_backward(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                                                              const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
                                                              const std::optional<at::Tensor>& topk_score,
                                                              bool need_score_grad);

// Returns (grad_x, grad_weight, grad_bias); an output whose mask entry is false is empty ([0]). x's values are read
// only for grad_weight: without it any tensor of x's sizes, dtype and device does (shape_only(x) is not copied out).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                       const at::Tensor& expert_offsets,
                                                                       const at::Tensor& weight,
                                                                       std::array<bool, 3> output_mask);

// A tensor with t's sizes, dtype and device that holds one value (every stride 0): what a backward saves of a tensor
// whose sizes alone it reads (the experts' output, for a combine without weights), so that tensor's memory is
// released after the forward.
inline at::Tensor shape_only(const at::Tensor& t) {
  return t.new_empty({}).expand_symint(t.sym_sizes());
}

// score.reshape(-1)[pairs] with 0 where pairs < 0 ([R] in score's dtype): the routing score of each row of a plan
// (sorted_pair, with its pair_pos) or of an exchange (slot_order, slot_pos). Recorded by autograd when score requires
// grad, also when score is empty (an exchange's backward must run on every rank).
at::Tensor pair_scores(const at::Tensor& score, const at::Tensor& pairs, const at::Tensor& pair_pos);
// The gradient of score [T, k] from that of pair_scores(score, pairs, pair_pos) [R]: the same combine that
// pair_scores' backward runs, for callers that differentiate it by hand (moe_ffn).
at::Tensor pair_scores_backward(const at::Tensor& grad_rows, const at::Tensor& score, const at::Tensor& pairs,
                                const at::Tensor& pair_pos);

// naive_gate's z-loss term on its own (the [0] placeholder when z_loss_coef is 0).
at::Tensor naive_gate_z_loss(const at::Tensor& logits, double z_loss_coef);
// naive_gate's checks of its coefficients (finite and >= 0; the message names the argument and the value).
void check_naive_gate_coefs(double balance_coef, double z_loss_coef);

}  // namespace fastmoe::ops
