// Autograd of permute, unpermute_combine and the combine's backward. Each is the other's backward: permute's
// gradient is an unweighted combine (a gather-sum, deterministic), and the combine's gradient is a permute scaled
// by the scores. The combine's backward op is itself differentiable, written with the same ops, so gradients of
// gradients (create_graph=True) are exact to any order.
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "fastmoe/ops.h"
#include "ops/internal.h"

namespace fastmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class PermuteFunction : public torch::autograd::Function<PermuteFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& sorted_pair,
                            const at::Tensor& pair_pos) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({sorted_pair, pair_pos});
    return ops::permute(x, sorted_pair, pair_pos);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    return {ops::unpermute_combine(grads[0], saved[0], saved[1], std::nullopt), at::Tensor(), at::Tensor()};
  }
};

class UnpermuteCombineFunction : public torch::autograd::Function<UnpermuteCombineFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y_sorted, const at::Tensor& sorted_pair,
                            const at::Tensor& pair_pos, const std::optional<at::Tensor>& topk_score) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool has_score = topk_score.has_value() && topk_score->defined();
    // Without weights the backward is a permute of grad_y and reads only y_sorted's sizes: the experts' output is
    // not kept alive for it.
    ctx->save_for_backward({has_score ? y_sorted : ops::shape_only(y_sorted), sorted_pair, pair_pos,
                            has_score ? *topk_score : at::Tensor()});
    return ops::unpermute_combine(y_sorted, sorted_pair, pair_pos, topk_score);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> topk_score;
    if (saved[3].defined()) topk_score = saved[3];
    const bool need_score_grad = topk_score.has_value() && ctx->needs_input_grad(3);
    auto [grad_y_sorted, grad_score] =
        ops::unpermute_combine_backward(grads[0], saved[0], saved[1], saved[2], topk_score, need_score_grad);
    return {grad_y_sorted, at::Tensor(), at::Tensor(), need_score_grad ? grad_score : at::Tensor()};
  }
};

// unpermute_combine_backward(grad_y [T, d], y_sorted [R, d], plan, s [T, k]) -> (G [R, d], H [T, k]) with
//   G[r] = s[p] grad_y[p / k] (p = sorted_pair[r]),   H[t, j] = <grad_y[t], y_sorted[pair_pos[t, j]]>.
// Both are bilinear, so for upstream (A [R, d], B [T, k]):
//   d grad_y = combine(A, s) + combine(y_sorted, B),   d y_sorted = permute(grad_y) scaled by B,
//   d s[t, j] = <grad_y[t], A[pair_pos[t, j]]>,
// which are unpermute_combine and unpermute_combine_backward again.
class UnpermuteCombineBackwardFunction : public torch::autograd::Function<UnpermuteCombineBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& y_sorted,
                               const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
                               const std::optional<at::Tensor>& topk_score, bool need_score_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool has_score = topk_score.has_value() && topk_score->defined();
    ctx->save_for_backward({grad_y, y_sorted, sorted_pair, pair_pos, has_score ? *topk_score : at::Tensor()});
    auto [grad_y_sorted, grad_score] =
        ops::unpermute_combine_backward(grad_y, y_sorted, sorted_pair, pair_pos, topk_score, need_score_grad);
    ctx->saved_data["need_score_grad"] = need_score_grad;
    if (!need_score_grad) ctx->mark_non_differentiable({grad_score});  // the empty placeholder
    return {grad_y_sorted, grad_score};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_y = saved[0], &y_sorted = saved[1], &sorted_pair = saved[2], &pair_pos = saved[3];
    std::optional<at::Tensor> score;
    if (saved[4].defined()) score = saved[4];
    const at::Tensor& up_rows = grads[0];
    const bool has_score_output = ctx->saved_data["need_score_grad"].toBool();
    const at::Tensor up_score = has_score_output && grads[1].defined() ? grads[1] : at::Tensor();
    at::Tensor d_grad_y, d_y_sorted, d_score;
    if (up_rows.defined() && ctx->needs_input_grad(0)) {
      d_grad_y = ops::unpermute_combine(up_rows, sorted_pair, pair_pos, score);
    }
    if (up_score.defined()) {
      if (ctx->needs_input_grad(0)) {
        at::Tensor term = ops::unpermute_combine(y_sorted, sorted_pair, pair_pos, up_score);
        d_grad_y = d_grad_y.defined() ? d_grad_y + term : term;
      }
      if (ctx->needs_input_grad(1)) {
        d_y_sorted = std::get<0>(ops::unpermute_combine_backward(grad_y, y_sorted, sorted_pair, pair_pos, up_score,
                                                                 /*need_score_grad=*/false));
      }
    }
    if (up_rows.defined() && score.has_value() && ctx->needs_input_grad(4)) {
      d_score = std::get<1>(ops::unpermute_combine_backward(grad_y, up_rows, sorted_pair, pair_pos, score,
                                                            /*need_score_grad=*/true));
    }
    return {d_grad_y, d_y_sorted, at::Tensor(), at::Tensor(), d_score, at::Tensor()};
  }
};

at::Tensor permute_autograd(const at::Tensor& x, const at::Tensor& sorted_pair, const at::Tensor& pair_pos) {
  return PermuteFunction::apply(x, sorted_pair, pair_pos);
}

at::Tensor unpermute_combine_autograd(const at::Tensor& y_sorted, const at::Tensor& sorted_pair,
                                      const at::Tensor& pair_pos, const std::optional<at::Tensor>& topk_score) {
  return UnpermuteCombineFunction::apply(y_sorted, sorted_pair, pair_pos, topk_score);
}

std::tuple<at::Tensor, at::Tensor> unpermute_combine_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& y_sorted, const at::Tensor& sorted_pair, const at::Tensor& pair_pos,
    const std::optional<at::Tensor>& topk_score, bool need_score_grad) {
  if (!ops::records_graph({grad_y, y_sorted, topk_score.value_or(at::Tensor())})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::unpermute_combine_backward(grad_y, y_sorted, sorted_pair, pair_pos, topk_score, need_score_grad);
  }
  auto outputs =
      UnpermuteCombineBackwardFunction::apply(grad_y, y_sorted, sorted_pair, pair_pos, topk_score, need_score_grad);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmoe, Autograd, m) {
  m.impl("permute", &permute_autograd);
  m.impl("unpermute_combine", &unpermute_combine_autograd);
  m.impl("unpermute_combine_backward", &unpermute_combine_backward_autograd);
}

}  // namespace fastmoe
